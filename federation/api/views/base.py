"""What every API view shares: JSON bodies with a size limit, documented error responses."""

from __future__ import annotations

from typing import Any

from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, generics
from rest_framework.request import Request
from rest_framework.views import APIView

from federation.api.parsers import LimitedJSONParser
from federation.api.schema import QuorumAutoSchema
from federation.api.serializers import StrictSerializer


# Base classes carry no docstring: drf-spectacular would show it on every operation.
class ApiView(APIView):
    # A single-object or action endpoint.

    parser_classes = [LimitedJSONParser]
    schema = QuorumAutoSchema()


class ApiListView(generics.ListAPIView):
    # A paginated, filterable list (settings.REST_FRAMEWORK).

    parser_classes = [LimitedJSONParser]
    schema = QuorumAutoSchema()

    @property
    def schema_only(self) -> bool:
        """True while drf-spectacular inspects the view (no user, no URL object to fetch)."""
        return getattr(self, "swagger_fake_view", False)


class NoBodySerializer(StrictSerializer):
    """An action that takes no input: any key sent is refused as unknown."""


def validated(serializer_class: type, request: Request, **context: Any) -> dict[str, Any]:
    """The request body validated by the serializer (400 with field messages otherwise)."""
    serializer = serializer_class(data=request.data, context={"request": request, **context})
    serializer.is_valid(raise_exception=True)
    return serializer.validated_data


@extend_schema(exclude=True)
class ApiNotFoundView(APIView):
    """Any other path under /api/v1/: a JSON 404, whatever the method."""

    permission_classes: list[type] = []

    def http_method_not_allowed(self, request: Request, *args: Any, **kwargs: Any) -> None:
        raise exceptions.NotFound()

    options = http_method_not_allowed
