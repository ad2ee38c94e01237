"""The hash-chained audit log: appends link up, and verify_audit finds tampering."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from io import StringIO
from pathlib import Path

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import close_old_connections, connection, transaction

from federation.models import AuditEvent
from federation.services.audit import (
    GENESIS_HASH,
    audit_append,
    audit_head,
    audit_verify,
    event_hash,
)

REPO = Path(__file__).resolve().parents[2]


def _log(n: int) -> list[AuditEvent]:
    return [
        audit_append(
            actor="user:alice",
            action="plan.approved",
            consortium_id=1,
            object_type="plan",
            object_id=i,
            data={"version": i, "lr": 0.01 * i, "orgs": ["a", "b"]},
        )
        for i in range(1, n + 1)
    ]


def verify_audit() -> tuple[int, str]:
    """Run the command as manage.py would: (exit status, everything it printed)."""
    out = StringIO()
    try:
        call_command("verify_audit", stdout=out)
    except CommandError as exc:
        # manage.py prints "CommandError: <message>" to stderr and exits with exc.returncode.
        return exc.returncode, str(exc)
    return 0, out.getvalue()


def _rehash(event: AuditEvent) -> str:
    """What a tamperer who knows the hash function would write into the hash column."""
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


@pytest.mark.django_db
def test_events_chain_from_the_genesis_hash() -> None:
    events = _log(3)

    assert [e.index for e in events] == [1, 2, 3]
    assert events[0].prev_hash == GENESIS_HASH
    assert events[1].prev_hash == events[0].hash
    assert events[2].prev_hash == events[1].hash
    assert audit_head() == {"index": 3, "hash": events[2].hash}


@pytest.mark.django_db
def test_empty_log_head_and_verification() -> None:
    assert audit_head() == {"index": 0, "hash": GENESIS_HASH}
    assert verify_audit() == (0, f"audit chain OK: 0 events, head #0 {GENESIS_HASH}\n")


@pytest.mark.django_db
def test_verify_audit_reports_an_intact_chain() -> None:
    events = _log(4)

    status, output = verify_audit()

    assert status == 0
    assert output == f"audit chain OK: 4 events, head #4 {events[-1].hash}\n"


@pytest.mark.django_db
def test_hash_survives_the_database_round_trip() -> None:
    """Values the JSON column reads back differently (int keys, tuples, NaN, whole floats)."""
    audit_append(actor="system", action="update.accepted", data={1: (2.0, float("nan")), "x": 1e20})

    event = AuditEvent.objects.get()

    assert event.data == {"1": [2.0, None], "x": 1e20}
    assert audit_verify().ok


@pytest.mark.django_db
def test_a_modified_event_is_found() -> None:
    _log(8)
    AuditEvent.objects.filter(index=7).update(data={"version": 7, "lr": 0.5, "orgs": ["a", "b"]})

    status, message = verify_audit()

    assert status == 1
    assert "event #7: hash does not match its content (modified?)" in message
    result = audit_verify()
    assert (result.ok, result.checked, result.broken_index) == (False, 6, 7)


@pytest.mark.django_db
def test_a_modified_event_with_a_recomputed_hash_breaks_the_next_link() -> None:
    _log(8)
    event = AuditEvent.objects.get(index=5)
    event.actor = "user:mallory"
    AuditEvent.objects.filter(pk=event.pk).update(actor=event.actor, hash=_rehash(event))

    status, message = verify_audit()

    assert status == 1
    assert "event #6: prev_hash does not match event #5's hash (reordered or rewritten?)" in message


@pytest.mark.django_db
def test_a_deleted_event_is_found() -> None:
    _log(6)
    AuditEvent.objects.filter(index=5).delete()

    status, message = verify_audit()

    assert status == 1
    assert "event #5 missing: indices jump from 4 to 6 (deleted?)" in message


@pytest.mark.django_db
def test_deleting_the_first_events_is_found() -> None:
    _log(4)
    AuditEvent.objects.filter(index__lte=2).delete()

    status, message = verify_audit()

    assert status == 1
    assert "event #1 missing" in message


def _swap_indices(a: int, b: int) -> None:
    with transaction.atomic():
        AuditEvent.objects.filter(index=a).update(index=10_000)
        AuditEvent.objects.filter(index=b).update(index=a)
        AuditEvent.objects.filter(index=10_000).update(index=b)


@pytest.mark.django_db
def test_reordered_events_are_found() -> None:
    _log(8)
    _swap_indices(5, 6)

    status, message = verify_audit()

    assert status == 1
    assert message.endswith("event #5: hash does not match its content (modified?)")


@pytest.mark.django_db
def test_reordered_events_with_recomputed_hashes_are_found() -> None:
    """Even a tamperer who recomputes each moved event's own hash cannot fix the links."""
    _log(8)
    _swap_indices(5, 6)
    for event in AuditEvent.objects.filter(index__in=[5, 6]):
        AuditEvent.objects.filter(pk=event.pk).update(hash=_rehash(event))

    status, message = verify_audit()

    assert status == 1
    assert "event #5: prev_hash does not match event #4's hash (reordered or rewritten?)" in message


@pytest.mark.django_db
def test_an_append_rolls_back_with_its_transaction() -> None:
    _log(2)

    with pytest.raises(RuntimeError), transaction.atomic():
        audit_append(actor="system", action="run.started")
        raise RuntimeError("the change failed")
    event = audit_append(actor="system", action="run.stopped")

    assert event.index == 3
    assert audit_verify().ok


@pytest.mark.django_db(transaction=True)
def test_concurrent_appends_form_one_chain() -> None:
    """Writers in parallel threads (own connections) never fork or skip an index."""
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(10):
                with transaction.atomic():
                    audit_append(actor=f"user:w{n}", action="stats.received", data={"i": i})
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)
        finally:
            close_old_connections()
            connection.close()

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert errors == []
    assert list(AuditEvent.objects.values_list("index", flat=True)) == list(range(1, 61))
    result = audit_verify()
    assert (result.ok, result.checked) == (True, 60)


@pytest.mark.django_db(transaction=True)
def test_manage_py_verify_audit_exits_1_on_a_broken_chain() -> None:
    """The real process exit status, as a cron job or CI step sees it."""
    if connection.vendor != "sqlite":
        pytest.skip("the subprocess reaches the test database through its SQLite file")
    _log(3)
    AuditEvent.objects.filter(index=2).delete()
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{connection.settings_dict['NAME']}"}

    broken = subprocess.run(
        [sys.executable, "manage.py", "verify_audit"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert broken.returncode == 1
    assert "event #2 missing: indices jump from 1 to 3 (deleted?)" in broken.stderr
