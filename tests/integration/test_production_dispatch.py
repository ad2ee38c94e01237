"""The production dispatch path without the services: which Celery task a step becomes, with what
countdown, only after commit, and what happens when the broker or Redis is down.

tests/services runs the same path against real PostgreSQL, Redis and Celery processes.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from django.db import transaction
from kombu.exceptions import OperationalError

from config.celery import app
from federation import dispatch, orchestrator, tasks

pytestmark = pytest.mark.django_db


class Sent:
    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Sent:
    """Record apply_async instead of talking to a broker."""
    record = Sent()
    for task in (tasks.run_advance_task, tasks.sweep_task, tasks.secagg_tick_task):

        def apply_async(*, _name: str = task.name, **options: Any) -> None:
            record.calls.append((_name, options))

        monkeypatch.setattr(task, "apply_async", apply_async)
    return record


def test_tasks_are_registered_on_the_configured_app_with_late_acks() -> None:
    from django.conf import settings

    assert tasks.run_advance_task.app is app  # not Celery's default app with its default broker
    assert app.conf.broker_url == settings.CELERY_BROKER_URL
    advance, sweep = app.tasks["federation.run_advance"], app.tasks["federation.sweep"]
    assert advance.name == tasks.run_advance_task.name and sweep.name == tasks.sweep_task.name
    assert advance.acks_late is True and advance.reject_on_worker_lost is True
    assert advance.ignore_result is True
    assert sweep.acks_late is False  # beat sends a fresh one every interval


def test_beat_sends_the_sweep_every_sweep_interval_and_drops_stale_ones() -> None:
    from django.conf import settings

    app.loader.import_default_modules()
    entry = app.conf.beat_schedule["quorum-sweep"]
    assert entry["task"] == "federation.sweep"
    assert entry["schedule"] == settings.QUORUM_SWEEP_SECONDS
    assert entry["options"]["expires"] >= settings.QUORUM_SWEEP_SECONDS


def test_a_step_becomes_its_task_with_the_countdown(sent: Sent) -> None:
    backend = dispatch.CeleryBackend()
    backend.enqueue(dispatch.RUN_ADVANCE, 42, countdown=30.05)
    backend.enqueue(dispatch.SWEEP)
    backend.enqueue(dispatch.RUN_ADVANCE, 7, countdown=-3)
    assert [(name, o["args"], o["countdown"]) for name, o in sent.calls] == [
        ("federation.run_advance", [42], 30.05),
        ("federation.sweep", [], 0.0),
        ("federation.run_advance", [7], 0.0),
    ]
    assert all(o["retry_policy"]["max_retries"] <= 3 for _, o in sent.calls)


def test_a_step_without_a_task_is_a_clear_error(sent: Sent) -> None:
    # Heartbeats are written by the process that holds the connections: no Celery task.
    with pytest.raises(LookupError, match="silo.heartbeats has no Celery task"):
        dispatch.CeleryBackend().enqueue(dispatch.SILO_HEARTBEATS, {1: "c"})
    assert sent.calls == []


def test_a_secure_round_stage_timer_is_a_celery_task(sent: Sent) -> None:
    # The coordinator's state is in the database: any worker can close a stage at its deadline.
    dispatch.CeleryBackend().enqueue(dispatch.SECAGG_TICK, 9, "share_keys", countdown=30.05)
    assert [(name, o["args"], o["countdown"]) for name, o in sent.calls] == [
        ("federation.secagg_tick", [9, "share_keys"], 30.05)
    ]


def test_the_production_profile_enqueues_only_after_commit(
    settings: Any, sent: Sent, django_capture_on_commit_callbacks: Any
) -> None:
    settings.QUORUM_PROFILE = "production"
    assert isinstance(dispatch.backend(), dispatch.CeleryBackend)
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():
            dispatch.enqueue_advance(5, countdown=2.0)
            assert sent.calls == []  # nothing leaves before the transaction commits
    assert [(name, o["args"], o["countdown"]) for name, o in sent.calls] == [
        ("federation.run_advance", [5], 2.0)
    ]


def test_a_broker_outage_is_logged_not_raised_into_the_request(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def down(**_: Any) -> None:
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr(tasks.run_advance_task, "apply_async", down)
    with caplog.at_level(logging.ERROR, logger="quorum.dispatch"):
        dispatch.CeleryBackend().enqueue(dispatch.RUN_ADVANCE, 3)
    assert "the sweep will catch up" in caplog.text


def test_a_channel_layer_outage_is_logged_not_raised(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    class Down:
        async def group_send(self, group: str, event: dict[str, Any]) -> None:
            raise ConnectionError("Redis is down")

    monkeypatch.setattr(dispatch, "get_channel_layer", Down)
    with caplog.at_level(logging.ERROR, logger="quorum.dispatch"):
        dispatch.CeleryBackend().send("silo-1", {"type": "round.task", "round_id": 1})
    assert "channel layer send to silo-1 failed" in caplog.text


def test_the_worker_task_runs_the_orchestrator_step(monkeypatch: pytest.MonkeyPatch) -> None:
    # federation.apps registered the orchestrator's entry points as the tasks' steps.
    assert dispatch.steps.function(dispatch.RUN_ADVANCE) is orchestrator.run_advance
    assert dispatch.steps.function(dispatch.SWEEP) is orchestrator.sweep
    assert dispatch.steps.task(dispatch.RUN_ADVANCE) is tasks.run_advance_task
    calls: list[tuple[str, tuple[Any, ...]]] = []
    functions = dispatch.steps.functions
    monkeypatch.setitem(functions, dispatch.RUN_ADVANCE, lambda *a: calls.append(("advance", a)))
    monkeypatch.setitem(functions, dispatch.SWEEP, lambda: calls.append(("sweep", ())))
    tasks.run_advance_task.apply(args=[9])
    tasks.sweep_task.apply()
    assert calls == [("advance", (9,)), ("sweep", ())]
