"""Silo writes: admission and tokens (governance), and the agent connection's life cycle."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.utils import timezone

from fedcore.tabular import DatasetSchema, SchemaError, schema_hash
from federation import dispatch, permissions, selectors
from federation.models import Organization, Role, Silo
from federation.services import agent_reports
from federation.services import secagg as secagg_services
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict
from federation.services.refusals import silo_refusals_lift


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
def silo_connect(
    *,
    silo_id: int,
    connection_id: str,
    agent_version: str,
    model_kinds: list[dict[str, str]] | None = None,
) -> str | None:
    """Register an agent connection and the installed model kinds it announced (checked,
    ``fedcore.model_kinds.check_announcement``); returns the connection it replaces, if any."""
    silo = Silo.objects.select_for_update().get(pk=silo_id)
    previous = silo.connection_id
    silo.connection_id = connection_id
    silo.last_heartbeat = timezone.now()
    silo.agent_version = agent_version[:50]
    silo.model_kinds = model_kinds or []
    silo.save(update_fields=["connection_id", "last_heartbeat", "agent_version", "model_kinds"])
    # A new hello is the agent saying it may accept work again (a fixed clock or policy takes a
    # restart): the runs it refused may select it again (federation.services.refusals).
    silo_refusals_lift(silo_id=silo.pk, why="the agent connected again (hello)")
    return previous if previous and previous != connection_id else None


def silo_heartbeat(*, silo_id: int, connection_id: str) -> None:
    """Record a heartbeat of the silo's current connection."""
    Silo.objects.filter(pk=silo_id, connection_id=connection_id).update(
        last_heartbeat=timezone.now()
    )


@transaction.atomic
def silo_heartbeats_record(*, beats: dict[int, str]) -> None:
    """Record a batch of heartbeats (silo id -> connection id) in one transaction."""
    for silo_id, connection_id in beats.items():
        silo_heartbeat(silo_id=silo_id, connection_id=connection_id)


def silo_connections_forget_stale(*, older_than: timedelta) -> int:
    """Forget connections whose last heartbeat is older than ``older_than``; how many."""
    stale = timezone.now() - older_than
    return Silo.objects.filter(connection_id__isnull=False, last_heartbeat__lt=stale).update(
        connection_id=None
    )


def silo_disconnect(*, silo_id: int, connection_id: str) -> None:
    """Forget a connection, unless a newer one has replaced it."""
    Silo.objects.filter(pk=silo_id, connection_id=connection_id).update(connection_id=None)


@dataclass(frozen=True)
class AgentWelcome:
    """What the agent websocket answers a hello with."""

    replaced: str | None  # the connection this one replaces (it is told to close)
    silo_id: int
    silo_name: str
    consortium: str
    pending: list[dict[str, Any]]  # channel events the agent still has to act on


def agent_hello(
    *,
    silo_id: int,
    connection_id: str,
    agent_version: str,
    model_kinds: list[dict[str, str]] | None = None,
) -> AgentWelcome:
    """An agent said hello: register its connection and announced model kinds (committed
    first), end its secure-aggregation part in attempts in progress, and gather the welcome
    and the work it owes."""
    replaced = silo_connect(
        silo_id=silo_id,
        connection_id=connection_id,
        agent_version=agent_version,
        model_kinds=model_kinds,
    )
    secagg_services.secagg_session_started(silo_id=silo_id)
    silo = Silo.objects.select_related("consortium").get(pk=silo_id)
    return AgentWelcome(
        replaced=replaced,
        silo_id=silo.pk,
        silo_name=silo.name,
        consortium=silo.consortium.name,
        pending=selectors.pending_work(silo_id=silo_id),
    )


def agent_goodbye(*, silo_id: int, connection_id: str, greeted: bool, replaced: bool) -> None:
    """An agent connection ended: forget it, and what that means for secure rounds."""
    silo_disconnect(silo_id=silo_id, connection_id=connection_id)
    secagg_services.secagg_session_ended(silo_id=silo_id, greeted=greeted, replaced=replaced)
    agent_reports.agent_reports_flush(silo_id=silo_id)


def agent_error(
    *, silo_id: int, code: str, reason: str, run_id: int | None, round_number: int | None
) -> None:
    """An agent reported a problem or a refusal: a secure round stops waiting for it, and the
    audit log records it."""
    secagg_services.secagg_round_refused(silo_id=silo_id, run_id=run_id, number=round_number)
    agent_reports.agent_report(
        silo_id=silo_id, code=code, reason=reason, run_id=run_id, round_number=round_number
    )


# --------------------------------------------------------------------------------------------
# Admission and tokens (governance): stewards register, the consortium admin admits or rejects.


def _lock_silo(silo: Silo) -> Silo:
    """The silo's row, locked until the transaction ends (admission and tokens change under it)."""
    return Silo.objects.select_for_update().get(pk=silo.pk)


def _require_token_manager(actor: Any, silo: Silo, action: str) -> None:
    """A consortium admin, or a data steward of the silo's own organisation (else 403/404)."""
    roles = permissions.require_roles(
        actor, silo.consortium_id, permissions.CAN_MANAGE_TOKENS, action
    )
    if Role.CONSORTIUM_ADMIN in roles:
        return
    stewarded = permissions.organizations_with_role(actor, silo.consortium_id, {Role.DATA_STEWARD})
    if not stewarded.filter(pk=silo.organization_id).exists():
        raise PermissionDenied(
            f"{action}: you are not a data steward of the organisation owning silo '{silo.name}'"
        )


def _audit_silo(actor: Any, silo: Silo, action: str, **data: Any) -> None:
    audit_append(
        actor=actor_label(actor),
        action=action,
        consortium_id=silo.consortium_id,
        object_type="silo",
        object_id=silo.pk,
        data={"silo": silo.name, "organization_id": silo.organization_id, **data},
    )


def _close_agent_after_commit(silo: Silo) -> None:
    """Disconnect the silo's agent once the token change is committed (its session is void)."""
    if silo.connection_id:
        dispatch.send_to_silo(silo.pk, {"type": "session.replaced"})


@transaction.atomic
def silo_register(
    *,
    actor: Any,
    organization: Organization,
    name: str,
    description: str,
    schema: dict[str, Any],
    row_count: int,
    location: str,
) -> Silo:
    """Register a silo of the actor's organisation; it waits for the consortium admin (pending)."""
    consortium_id = organization.consortium_id
    permissions.require_roles(
        actor, consortium_id, permissions.CAN_REGISTER_SILOS, "registering a silo"
    )
    stewarded = permissions.organizations_with_role(actor, consortium_id, {Role.DATA_STEWARD})
    if not stewarded.filter(pk=organization.pk).exists():
        raise PermissionDenied(
            f"you are not a data steward of {organization.name}; stewards register silos for "
            "their own organisation"
        )
    errors: dict[str, str] = {}
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        errors["name"] = "required"
    elif len(name) > 100:
        errors["name"] = "at most 100 characters"
    elif Silo.objects.filter(consortium_id=consortium_id, name=name).exists():
        errors["name"] = f"the consortium already has a silo named '{name}'"
    if not isinstance(description, str):
        errors["description"] = "must be text"
    try:
        normalised_schema = DatasetSchema.from_dict(schema).to_dict()
    except (SchemaError, TypeError, KeyError, AttributeError) as exc:
        errors["schema"] = str(exc)
    if isinstance(row_count, bool) or not isinstance(row_count, int) or row_count < 0:
        errors["row_count"] = "must be an integer >= 0"
    if not isinstance(location, str):
        errors["location"] = "must be text"
    elif len(location) > 500:
        errors["location"] = "at most 500 characters"
    if errors:
        raise ValidationError(errors)
    silo = Silo.objects.create(
        consortium_id=consortium_id,
        organization=organization,
        name=name,
        description=description,
        schema=normalised_schema,
        row_count=row_count,
        location=location,
        admission=Silo.Admission.PENDING,
    )
    _audit_silo(
        actor,
        silo,
        "silo.registered",
        schema_hash=schema_hash(DatasetSchema.from_dict(normalised_schema)),
        row_count=row_count,
    )
    return silo


@transaction.atomic
def silo_admit(*, actor: Any, silo: Silo) -> str:
    """Admit a pending (or previously rejected) silo; returns its agent token, shown only once."""
    permissions.require_roles(
        actor, silo.consortium_id, permissions.CAN_ADMIT_SILOS, "admitting a silo"
    )
    locked = _lock_silo(silo)
    if locked.admission == Silo.Admission.ADMITTED:
        raise Conflict(f"silo '{locked.name}' is already admitted; rotate its token for a new one")
    locked.admission = Silo.Admission.ADMITTED
    locked.save(update_fields=["admission"])
    token = silo_issue_token(silo=locked)
    _audit_silo(actor, locked, "silo.admitted")
    silo.admission, silo.token_hash = locked.admission, locked.token_hash
    return token


@transaction.atomic
def silo_reject(*, actor: Any, silo: Silo, reason: str) -> Silo:
    """Reject a pending silo, with a reason (recorded in the audit log)."""
    permissions.require_roles(
        actor, silo.consortium_id, permissions.CAN_ADMIT_SILOS, "rejecting a silo"
    )
    reason = reason.strip() if isinstance(reason, str) else ""
    if not reason:
        raise ValidationError({"reason": "a rejection needs a reason"})
    locked = _lock_silo(silo)
    if locked.admission != Silo.Admission.PENDING:
        raise Conflict(
            f"silo '{locked.name}' is {locked.admission}; only a pending silo can be rejected "
            "(revoke an admitted silo's token instead)"
        )
    locked.admission = Silo.Admission.REJECTED
    locked.token_hash = None
    locked.save(update_fields=["admission", "token_hash"])
    _audit_silo(actor, locked, "silo.rejected", reason=reason)
    silo.admission, silo.token_hash = locked.admission, locked.token_hash
    return locked


@transaction.atomic
def silo_rotate_token(*, actor: Any, silo: Silo) -> str:
    """Give an admitted silo a new token; the old one stops working at once.

    A connected agent is closed too: its session was opened with the old token.
    """
    _require_token_manager(actor, silo, "rotating a silo token")
    locked = _lock_silo(silo)
    if locked.admission != Silo.Admission.ADMITTED:
        raise Conflict(
            f"silo '{locked.name}' is {locked.admission}; only admitted silos get tokens"
        )
    token = silo_issue_token(silo=locked)
    _audit_silo(actor, locked, "silo.token_rotated")
    _close_agent_after_commit(locked)
    silo.token_hash = locked.token_hash
    return token


@transaction.atomic
def silo_revoke_token(*, actor: Any, silo: Silo) -> Silo:
    """Revoke a silo's token: no agent connects until it is rotated; a connected one is closed."""
    _require_token_manager(actor, silo, "revoking a silo token")
    locked = _lock_silo(silo)
    if locked.token_hash is None:
        raise Conflict(f"silo '{locked.name}' has no token to revoke")
    locked.token_hash = None
    locked.save(update_fields=["token_hash"])
    _audit_silo(actor, locked, "silo.token_revoked")
    _close_agent_after_commit(locked)
    silo.token_hash = None
    return locked


@transaction.atomic
def silo_set_budget(*, actor: Any, silo: Silo, epsilon: float | None, delta: float | None) -> Silo:
    """Set (or clear, with None) a silo's privacy budget; consortium admin only, audited.

    A budget below what the silo has already spent is allowed (it stops the silo from taking
    part in further DP rounds) but never rewrites the ledger.
    """
    permissions.require_roles(
        actor, silo.consortium_id, permissions.CAN_ADMIT_SILOS, "setting a privacy budget"
    )
    errors: dict[str, str] = {}
    if epsilon is not None and (isinstance(epsilon, bool) or not 0 < float(epsilon) < 1e6):
        errors["epsilon"] = "must be a number > 0 (or null for no budget)"
    if delta is not None and (isinstance(delta, bool) or not 0 < float(delta) < 1):
        errors["delta"] = "must be a number in (0, 1) (or null for the plan's delta)"
    if errors:
        raise ValidationError(errors)
    silo = Silo.objects.select_for_update().get(pk=silo.pk)
    old = {"epsilon": silo.epsilon_budget, "delta": silo.delta_budget}
    silo.epsilon_budget = None if epsilon is None else float(epsilon)
    silo.delta_budget = None if delta is None else float(delta)
    silo.save(update_fields=["epsilon_budget", "delta_budget"])
    audit_append(
        actor=actor_label(actor),
        action="silo.budget_set",
        consortium_id=silo.consortium_id,
        object_type="silo",
        object_id=silo.pk,
        data={"old": old, "new": {"epsilon": silo.epsilon_budget, "delta": silo.delta_budget}},
    )
    return silo
