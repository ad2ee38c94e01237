"""API tokens: created (shown once), used, revoked. Only a token's SHA-256 is stored, with an
expiry, so a database reader (a backup, a stolen disk) cannot act as a user."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from federation.models import ApiToken
from federation.services.audit import actor_label, audit_append

TOKEN_PREFIX = "qrm_"


def api_token_digest(token: str) -> str:
    """The stored form of an API token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class CreatedToken:
    """A new token's row and the token itself: the only time the token is known."""

    row: ApiToken
    token: str


@transaction.atomic
def api_token_create(
    *, actor: Any, user: Any, name: str = "", days: int | None = None
) -> CreatedToken:
    """Create an API token for ``user``; the token is in the result and nowhere else."""
    if actor is not None and actor != user and not getattr(actor, "is_superuser", False):
        raise PermissionDenied("only the user themselves or a superuser may create their tokens")
    days = settings.QUORUM_API_TOKEN_DAYS if days is None else days
    if not 1 <= days <= settings.QUORUM_API_TOKEN_MAX_DAYS:
        raise ValidationError(
            {"days": f"must be between 1 and {settings.QUORUM_API_TOKEN_MAX_DAYS}, got {days}"}
        )
    if len(name) > 100:
        raise ValidationError({"name": "at most 100 characters"})
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    row = ApiToken.objects.create(
        user=user,
        name=name,
        prefix=token[:12],
        digest=api_token_digest(token),
        expires_at=timezone.now() + timedelta(days=days),
    )
    audit_append(
        actor=actor_label(actor) if actor is not None else "operator",
        action="api_token.created",
        object_type="user",
        object_id=user.pk,
        data={"token": row.pk, "prefix": row.prefix, "name": name, "expires": str(row.expires_at)},
    )
    return CreatedToken(row=row, token=token)


@transaction.atomic
def api_token_revoke(*, actor: Any, token: ApiToken) -> None:
    """Delete a token: it stops working at once."""
    if actor is not None and actor.pk != token.user_id and not actor.is_superuser:
        raise PermissionDenied("only the token's user or a superuser may revoke it")
    audit_append(
        actor=actor_label(actor) if actor is not None else "operator",
        action="api_token.revoked",
        object_type="user",
        object_id=token.user_id,
        data={"token": token.pk, "prefix": token.prefix, "name": token.name},
    )
    token.delete()


class TokenRefused(Exception):
    """The token is unknown, expired or its user inactive: the reason says which (401)."""


def api_token_use(*, token: str) -> ApiToken:
    """The token's row (user loaded) if the token is valid now; records when it was last used
    (at most once per QUORUM_API_TOKEN_TOUCH_SECONDS: not a write per request)."""
    row = ApiToken.objects.select_related("user").filter(digest=api_token_digest(token)).first()
    if row is None:
        raise TokenRefused("invalid token: it is unknown or was revoked")
    now = timezone.now()
    if now >= row.expires_at:
        raise TokenRefused(
            f"token {row.prefix}… expired on {row.expires_at:%Y-%m-%d %H:%M} UTC; create a new "
            "one (POST /api/v1/me/tokens/ or manage.py api_token create)"
        )
    if not row.user.is_active:
        raise TokenRefused("the token's user is inactive or deleted")
    touch = timedelta(seconds=settings.QUORUM_API_TOKEN_TOUCH_SECONDS)
    if row.last_used_at is None or now - row.last_used_at >= touch:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        row.last_used_at = now
    return row
