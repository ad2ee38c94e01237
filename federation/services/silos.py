"""Silo writes: tokens and the agent connection's life cycle."""

from __future__ import annotations

import hashlib
import secrets

from django.db import transaction
from django.utils import timezone

from federation.models import Silo


def hash_token(token: str) -> str:
    """The stored form of an agent token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@transaction.atomic
def silo_issue_token(*, silo: Silo) -> str:
    """Give a silo a new agent token (256 bits from `secrets`); returns it once, stores its hash."""
    token = secrets.token_urlsafe(32)
    silo.token_hash = hash_token(token)
    silo.save(update_fields=["token_hash"])
    return token


def silo_authenticate(*, token: str) -> Silo | None:
    """The admitted silo holding this token, or None."""
    if not token or len(token) > 200:
        return None
    return (
        Silo.objects.select_related("consortium")
        .filter(token_hash=hash_token(token), admission=Silo.Admission.ADMITTED)
        .first()
    )


@transaction.atomic
def silo_connect(*, silo_id: int, connection_id: str, agent_version: str) -> str | None:
    """Register an agent connection; returns the connection it replaces, if any."""
    silo = Silo.objects.select_for_update().get(pk=silo_id)
    previous = silo.connection_id
    silo.connection_id = connection_id
    silo.last_heartbeat = timezone.now()
    silo.agent_version = agent_version[:50]
    silo.save(update_fields=["connection_id", "last_heartbeat", "agent_version"])
    return previous if previous and previous != connection_id else None


def silo_heartbeat(*, silo_id: int, connection_id: str) -> None:
    """Record a heartbeat of the silo's current connection."""
    Silo.objects.filter(pk=silo_id, connection_id=connection_id).update(
        last_heartbeat=timezone.now()
    )


def silo_disconnect(*, silo_id: int, connection_id: str) -> None:
    """Forget a connection, unless a newer one has replaced it."""
    Silo.objects.filter(pk=silo_id, connection_id=connection_id).update(connection_id=None)
