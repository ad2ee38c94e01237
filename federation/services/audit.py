"""The append-only, hash-chained audit log: appending, the chain's head, and verification.

Every event's ``hash`` is the SHA-256 of the canonical JSON of its content (index, created_at,
actor, action, consortium_id, object_type, object_id, data) together with ``prev_hash``, the hash
of the event before it ("0" * 64 for the first). Changing an event breaks its own hash; deleting
one leaves a gap in the indices; moving one breaks the link to its predecessor. What a chain alone
cannot show is the loss of its newest events: compare ``audit_head()`` with a copy kept elsewhere
(a daily log line, a ticket) to cover that.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from fedcore.plan import canonical_json
from federation.models import AuditEvent, Silo

GENESIS_HASH = "0" * 64
# Concurrent appends that both read the same head collide on the unique index; the loser retries.
_APPEND_ATTEMPTS = 10


def actor_label(user: Any) -> str:
    """How an actor appears in the log: "user:<username>", "silo:<name>" or "system"."""
    if user is None:
        return "system"
    if isinstance(user, Silo):
        return f"silo:{user.name}"
    if not getattr(user, "is_authenticated", False):
        return "anonymous"
    return f"user:{user.get_username()}"


def _json_data(data: dict[str, Any] | None) -> dict[str, Any]:
    """The data as it will read back from the JSON column: str keys, lists, no NaN/Infinity."""
    if not data:
        return {}
    text = json.dumps(data, default=str, allow_nan=True)
    # NaN and ±Infinity are not JSON (PostgreSQL refuses them): record them as null.
    loaded = json.loads(text, parse_constant=lambda _name: None)
    if not isinstance(loaded, dict):
        raise TypeError(f"audit data must be a dict, got {type(data).__name__}")
    return loaded


def _hashable(value: Any) -> Any:
    """Numbers in one canonical form: a float that is a whole number hashes as that integer.

    PostgreSQL's jsonb keeps numbers as decimals and prints 1e20 as 100000000000000000000 (read
    back as an int) and -0.0 as 0, so the hash must not depend on int-versus-float.
    """
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {key: _hashable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_hashable(item) for item in value]
    return value


def event_hash(
    *,
    index: int,
    created_at: datetime,
    actor: str,
    action: str,
    consortium_id: int | None,
    object_type: str,
    object_id: str,
    data: dict[str, Any],
    prev_hash: str,
) -> str:
    """The SHA-256 of an event's content and its predecessor's hash."""
    content = {
        "index": index,
        "created_at": created_at.isoformat(),
        "actor": actor,
        "action": action,
        "consortium_id": consortium_id,
        "object_type": object_type,
        "object_id": object_id,
        "data": _hashable(data),
        "prev_hash": prev_hash,
    }
    return hashlib.sha256(canonical_json(content).encode("utf-8")).hexdigest()


def _stored_hash(event: AuditEvent) -> str:
    """Recompute the hash of an event as stored."""
    return event_hash(
        index=event.index,
        created_at=event.created_at,
        actor=event.actor,
        action=event.action,
        consortium_id=event.consortium_id,
        object_type=event.object_type,
        object_id=event.object_id,
        data=event.data,
        prev_hash=event.prev_hash,
    )


def _locked_head() -> AuditEvent | None:
    """The newest event, locked until the transaction ends.

    On PostgreSQL the row lock queues concurrent appenders behind the newest event. A waiter
    wakes up holding the row it queued on, which the previous holder may have appended after
    (READ COMMITTED: the next statement sees that commit), so it re-reads until the row it holds
    is the head. SQLite takes its write lock at BEGIN (IMMEDIATE transactions), which serialises
    writers anyway. An empty table has no row to lock: two first appends then race, and the
    unique index on ``index`` lets only one of them win (the caller retries the other).
    """
    head = AuditEvent.objects.select_for_update().order_by("-index").first()
    while head is not None and AuditEvent.objects.filter(index__gt=head.index).exists():
        head = AuditEvent.objects.select_for_update().order_by("-index").first()
    return head


def audit_append(
    *,
    actor: str,
    action: str,
    consortium_id: int | None = None,
    object_type: str = "",
    object_id: str | int = "",
    data: dict[str, Any] | None = None,
) -> AuditEvent:
    """Append one event to the chain, in the caller's transaction (it commits or rolls back with
    the change it records)."""
    fields = {
        "actor": str(actor)[:200],
        "action": str(action)[:100],
        "consortium_id": consortium_id,
        "object_type": str(object_type)[:50],
        "object_id": str(object_id)[:100],
        "data": _json_data(data),
    }
    for attempt in range(_APPEND_ATTEMPTS):
        try:
            # A savepoint, so that losing a race on the unique index leaves the caller's
            # transaction usable for the retry.
            with transaction.atomic():
                head = _locked_head()
                index = head.index + 1 if head else 1
                prev_hash = head.hash if head else GENESIS_HASH
                created_at = timezone.now()
                event = AuditEvent(
                    index=index, created_at=created_at, prev_hash=prev_hash, **fields
                )
                event.hash = event_hash(
                    index=index, created_at=created_at, prev_hash=prev_hash, **fields
                )
                event.save(force_insert=True)
                return event
        except IntegrityError:
            if attempt == _APPEND_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def audit_head() -> dict[str, Any]:
    """The newest event's index and hash ({"index": 0, "hash": "0" * 64} when the log is empty)."""
    head = AuditEvent.objects.order_by("-index").values("index", "hash").first()
    if head is None:
        return {"index": 0, "hash": GENESIS_HASH}
    return {"index": head["index"], "hash": head["hash"]}


@dataclass
class AuditVerification:
    """The result of recomputing the chain: ok, or the first broken event and what is wrong."""

    ok: bool
    checked: int
    broken_index: int | None = None
    problem: str = ""
    head_index: int = 0
    head_hash: str = GENESIS_HASH


def audit_verify() -> AuditVerification:
    """Recompute the whole chain in index order and report the first break."""
    checked = 0
    expected_index = 1
    prev_hash = GENESIS_HASH
    for event in AuditEvent.objects.order_by("index").iterator(chunk_size=2000):
        if event.index != expected_index:
            if expected_index == 1:
                problem = f"event #1 missing: the log starts at #{event.index} (deleted?)"
            else:
                missing = (
                    f"event #{expected_index}"
                    if event.index == expected_index + 1
                    else f"events #{expected_index}..#{event.index - 1}"
                )
                problem = (
                    f"{missing} missing: indices jump from {expected_index - 1} to {event.index} "
                    "(deleted?)"
                )
            return AuditVerification(
                ok=False, checked=checked, broken_index=expected_index, problem=problem
            )
        if _stored_hash(event) != event.hash:
            return AuditVerification(
                ok=False,
                checked=checked,
                broken_index=event.index,
                problem=f"event #{event.index}: hash does not match its content (modified?)",
            )
        if event.prev_hash != prev_hash:
            before = f"event #{event.index - 1}'s hash" if event.index > 1 else "the genesis hash"
            return AuditVerification(
                ok=False,
                checked=checked,
                broken_index=event.index,
                problem=(
                    f"event #{event.index}: prev_hash does not match {before} "
                    "(reordered or rewritten?)"
                ),
            )
        checked += 1
        expected_index += 1
        prev_hash = event.hash
    return AuditVerification(
        ok=True, checked=checked, head_index=expected_index - 1, head_hash=prev_hash
    )
