"""API token authentication against hashed, expiring tokens (federation.services.api_tokens)."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions
from rest_framework.request import Request

from federation.services import api_tokens


class ApiTokenAuthentication(authentication.BaseAuthentication):
    """``Authorization: Token <token>``; an unknown, revoked or expired token is a 401 that says
    which."""

    keyword = "Token"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        """(user, token row), None without a token header, or AuthenticationFailed (401)."""
        header = authentication.get_authorization_header(request).split()
        if not header or header[0].lower() != self.keyword.lower().encode():
            return None
        if len(header) != 2:
            raise exceptions.AuthenticationFailed(
                "invalid token header: send 'Authorization: Token <token>', one token, no spaces"
            )
        try:
            token = header[1].decode("ascii")
        except UnicodeDecodeError:
            raise exceptions.AuthenticationFailed("invalid token header: not ASCII") from None
        try:
            row = api_tokens.api_token_use(token=token)
        except api_tokens.TokenRefused as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return row.user, row

    def authenticate_header(self, request: Request) -> str:
        """The WWW-Authenticate value: makes refusals 401, not 403."""
        return self.keyword


class ApiTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """How the OpenAPI schema describes ApiTokenAuthentication (as it described DRF's)."""

    target_class = "federation.api.authentication.ApiTokenAuthentication"
    name = "tokenAuth"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        """An API key in the Authorization header, prefixed with 'Token '."""
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": 'Token-based authentication with required prefix "Token"',
        }
