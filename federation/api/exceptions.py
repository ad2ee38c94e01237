"""Error responses of the API: one JSON shape per failure, whoever raised it.

Services raise Django's exceptions and ``Conflict``; views never translate them by hand:

- ``django.core.exceptions.ValidationError`` -> 400 ``{field: [messages]}``
  (messages not tied to a field under ``non_field_errors``);
- ``PermissionDenied`` -> 403 ``{"detail": why}``;
- ``Http404`` -> 404 ``{"detail": "Not found."}``, the same body for a missing object and for one
  of another consortium (no existence leak);
- ``federation.services.errors.Conflict`` -> 409 ``{"detail": message}``;
- a body over ``DATA_UPLOAD_MAX_MEMORY_SIZE`` -> 413 ``{"detail": ...}``.
"""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import NON_FIELD_ERRORS, PermissionDenied, RequestDataTooBig
from django.core.exceptions import ValidationError as DjangoValidationError
from django.http import Http404
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.settings import api_settings
from rest_framework.views import exception_handler

from federation.services.errors import Conflict


class ConflictError(exceptions.APIException):
    """The object's state forbids the action (409)."""

    status_code = status.HTTP_409_CONFLICT
    default_detail = "The object's current state does not allow this action."
    default_code = "conflict"


class RequestTooLarge(exceptions.APIException):
    """The request body is larger than the server accepts (413)."""

    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "request_too_large"

    def __init__(self, limit: int | None = None) -> None:
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE if limit is None else limit
        super().__init__(f"Request body too large: the limit is {limit} bytes.")


def validation_detail(exc: DjangoValidationError) -> dict[str, list[str]]:
    """A Django ValidationError as DRF's field -> messages mapping."""
    if hasattr(exc, "error_dict"):
        detail: dict[str, list[str]] = {}
        for field, messages in exc.message_dict.items():
            key = api_settings.NON_FIELD_ERRORS_KEY if field == NON_FIELD_ERRORS else field
            detail.setdefault(key, []).extend(messages)
        return detail
    return {api_settings.NON_FIELD_ERRORS_KEY: exc.messages}


def api_exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    """DRF's handler, after mapping the domain's exceptions to API exceptions."""
    if isinstance(exc, Http404):
        # Never pass the message on: "no such plan" vs "no such silo" is fine, but one body for
        # every 404 keeps a foreign object indistinguishable from a missing one.
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied(*exc.args)
    elif isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(validation_detail(exc))
    elif isinstance(exc, Conflict):
        exc = ConflictError(str(exc) or None)
    elif isinstance(exc, RequestDataTooBig):
        exc = RequestTooLarge()
    return exception_handler(exc, context)
