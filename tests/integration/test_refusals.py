"""A site that refuses a run's work leaves that run's selection until its agent says otherwise,
and a round stuck behind too few silos still ends (issue 12, liveness under faults)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone

from fedcore.models import build_model
from federation import orchestrator
from federation.models import AuditEvent, Round, Run, Silo, SiloRefusal
from federation.services.agent_reports import agent_report
from federation.services.silos import silo_connect
from tests.api_factories import active_run, client_for
from tests.factories import plan_spec
from tests.governance_factories import governed_consortium
from tests.integration.test_orchestrator import (
    current_round,
    make_plan,
    online,
    send_stats,
    submit,
)

pytestmark = pytest.mark.django_db

THREE_ROUNDS = {**plan_spec()["training"], "rounds": 3}
CLOCK = "the authorization expired 2 days ago (issued_at is in the future by this clock)"


def running(n_silos: int, **spec: object) -> tuple[list[Silo], Run]:
    silos, run = make_plan(n_silos, **spec)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    return silos, run


def refuse(silo: Silo, run: Run, round_number: int | None, code: str = "not_authorized") -> None:
    agent_report(silo_id=silo.pk, code=code, reason=CLOCK, run_id=run.pk, round_number=round_number)


def model(seed: int) -> dict:
    return build_model({"kind": "logistic_regression"}, 3, seed=seed).state_dict()


def test_a_refusing_silo_is_not_waited_for_and_not_selected_again() -> None:
    silos, run = running(3, min_silos=2, training=THREE_ROUNDS)
    submit(run, silos[0], 1, model(1), 10)
    submit(run, silos[1], 1, model(2), 10)
    refuse(silos[2], run, 1)
    orchestrator.run_advance(run.pk)  # the deadline is a minute away: it does not wait for it

    assert Round.objects.get(run=run, number=1).status == Round.Status.COMPLETED
    round2 = current_round(run)
    assert round2.number == 2 and set(round2.selected.all()) == set(silos[:2])
    refusal = SiloRefusal.objects.get(run=run)
    assert (refusal.silo, refusal.code, refusal.round_number) == (silos[2], "not_authorized", 1)
    assert AuditEvent.objects.filter(action="silo.excluded", object_id=str(run.pk)).count() == 1


def test_a_round_whose_remaining_silos_all_refused_closes_at_once() -> None:
    silos, run = running(3, min_silos=1)
    submit(run, silos[0], 1, model(1), 10)
    orchestrator.run_advance(run.pk)
    assert current_round(run).number == 1  # two silos still owe an answer
    refuse(silos[1], run, 1, code="policy_refused")
    refuse(silos[2], run, 1)
    orchestrator.run_advance(run.pk)
    assert Round.objects.get(run=run, number=1).status == Round.Status.COMPLETED
    assert set(current_round(run).selected.all()) == {silos[0]}


def test_other_agent_errors_do_not_exclude_a_silo() -> None:
    silos, run = running(2, min_silos=1)
    agent_report(
        silo_id=silos[1].pk, code="training_failed", reason="nan", run_id=run.pk, round_number=1
    )
    assert not SiloRefusal.objects.exists()
    orchestrator.run_advance(run.pk)
    assert current_round(run).status == Round.Status.COLLECTING  # still waits for silo 1


def test_a_new_hello_makes_the_silo_selectable_again() -> None:
    silos, run = running(2, min_silos=1, training=THREE_ROUNDS)
    submit(run, silos[0], 1, model(1), 10)
    refuse(silos[1], run, 1)
    orchestrator.run_advance(run.pk)
    assert set(current_round(run).selected.all()) == {silos[0]}

    silo_connect(silo_id=silos[1].pk, connection_id="conn-new", agent_version="test")
    assert not SiloRefusal.objects.exists()
    assert AuditEvent.objects.get(action="silo.readmitted").data["why"].startswith("the agent")
    submit(run, silos[0], 2, model(2), 10)
    orchestrator.run_advance(run.pk)
    assert set(current_round(run).selected.all()) == set(silos)


def test_too_few_accepting_silos_make_the_run_wait_then_fail_with_the_reason() -> None:
    silos, run = running(2, min_silos=2, round_retries=0, wait_for_silos_seconds=30)
    submit(run, silos[0], 1, model(1), 10)
    refuse(silos[1], run, 1)
    orchestrator.run_advance(run.pk)  # closes now: 1 update, the minimum is 2 -> fails, waits
    run.refresh_from_db()
    assert Round.objects.get(run=run, number=1).status == Round.Status.FAILED
    Run.objects.filter(pk=run.pk).update(waiting_since=timezone.now() - timedelta(seconds=31))
    orchestrator.sweep()
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED


def test_a_failed_round_retries_once_enough_silos_are_back() -> None:
    """The reproduction of issue 12: two silos, min_silos=2, both drop, the deadline passes."""
    silos, run = running(2, min_silos=2, round_retries=2)
    Silo.objects.filter(pk__in=[s.pk for s in silos]).update(connection_id=None)
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert current_round(run).status == Round.Status.FAILED and run.waiting_since is not None

    online(silos)
    orchestrator.sweep()
    retry = current_round(run)
    assert (retry.number, retry.attempt, retry.status) == (1, 2, Round.Status.COLLECTING)
    assert set(retry.selected.all()) == set(silos)


def test_a_failed_round_with_no_silos_back_fails_the_run_after_the_wait() -> None:
    silos, run = running(2, min_silos=2, round_retries=2, wait_for_silos_seconds=30)
    Silo.objects.filter(pk__in=[s.pk for s in silos]).update(connection_id=None)
    Round.objects.filter(run=run).update(deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)
    orchestrator.sweep()
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    Run.objects.filter(pk=run.pk).update(waiting_since=timezone.now() - timedelta(seconds=31))
    orchestrator.sweep()
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert "only 0 of the minimum 2 silos" in run.error


def test_the_api_and_the_run_page_say_which_silo_refused_and_why(settings: object) -> None:
    gov = governed_consortium(1)
    run = active_run(gov)
    refuse(gov.silos[0], run, 1, code="policy_refused")

    body = client_for(gov.scientists[0]).get(f"/api/v1/runs/{run.pk}/").json()
    (refusal,) = body["refusals"]
    assert refusal["silo"] == gov.silos[0].pk and refusal["silo_name"] == gov.silos[0].name
    assert (refusal["code"], refusal["reason"], refusal["round"]) == ("policy_refused", CLOCK, 1)
    assert refusal["since"]

    web = client_for(gov.scientists[0])
    web.force_login(gov.scientists[0])
    html = web.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="refusals"' in html and gov.silos[0].name in html and "policy_refused" in html


async def round_trip(comm: Any) -> None:
    """A heartbeat and its ack: every message sent before it has been handled."""
    from fedcore import protocol

    await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
    while True:
        frame = await comm.receive_from(timeout=5)  # the task's binary frames come first
        if isinstance(frame, str) and protocol.decode_control(frame)["type"] == "heartbeat_ack":
            return


@pytest.mark.django_db(transaction=True)
async def test_a_ready_message_from_the_agent_lifts_the_exclusion(settings: object) -> None:
    from channels.db import database_sync_to_async

    from fedcore import protocol
    from tests.integration.test_agent_consumer import connect, hello, make_round

    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False  # type: ignore[attr-defined]
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    await comm.send_to(
        text_data=protocol.encode_error("policy_refused", CLOCK, run=round_.run_id, round=1)
    )
    await round_trip(comm)
    refusals = database_sync_to_async(lambda: list(SiloRefusal.objects.values_list("silo_id")))
    assert await refusals() == [(silo.pk,)]

    await comm.send_to(text_data=protocol.encode_control("ready"))
    await round_trip(comm)
    assert await refusals() == []
    readmitted = await database_sync_to_async(AuditEvent.objects.get)(action="silo.readmitted")
    assert "ready" in readmitted.data["why"]
    await comm.disconnect()
