"""Writes about refused agent connections: one aggregated audit event, never one per attempt."""

from __future__ import annotations

from typing import Any

from django.db import transaction

from federation.services.audit import audit_append


@transaction.atomic
def agent_auth_failures_record(*, data: dict[str, Any]) -> None:
    """Audit a batch of refused agent tokens (counts per address; see federation/throttle.py)."""
    audit_append(
        actor="anonymous",
        action="agent.auth_failures",
        object_type="websocket",
        object_id="/ws/agent/",
        data=data,
    )
