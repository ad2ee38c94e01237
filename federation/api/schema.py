"""OpenAPI generation: every operation documents the error bodies it can return."""

from __future__ import annotations

from typing import Any

from drf_spectacular.openapi import AutoSchema
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse

from federation.api.serializers import ErrorDetailSerializer

_DETAIL = ErrorDetailSerializer
ERRORS_ANY = {
    "400": OpenApiResponse(
        OpenApiTypes.OBJECT,
        description='Bad input: {"field": ["message", ...]} or {"detail": "message"}',
    ),
    "401": OpenApiResponse(_DETAIL, description="Not authenticated"),
    "403": OpenApiResponse(_DETAIL, description="A member whose roles do not allow this"),
    "404": OpenApiResponse(_DETAIL, description="No such object, or one of another consortium"),
}
ERRORS_WRITE = {
    "409": OpenApiResponse(_DETAIL, description="The object's state forbids the action"),
    "413": OpenApiResponse(_DETAIL, description="Request body over 1 MiB"),
    "415": OpenApiResponse(_DETAIL, description="Body is not application/json"),
}


class QuorumAutoSchema(AutoSchema):
    """drf-spectacular's schema plus the error responses of docs/api.md."""

    def _get_response_bodies(self, direction: Any = "response") -> dict[str, Any]:
        bodies = super()._get_response_bodies(direction)
        errors = dict(ERRORS_ANY)
        if self.method in ("POST", "PUT", "PATCH"):
            errors.update(ERRORS_WRITE)
        for code, response in errors.items():
            if code not in bodies:
                bodies[code] = self._get_response_for_code(response, code, direction=direction)
        return bodies
