"""Faults in the production profile, each bounded in time: an agent, an ASGI server or the Celery
worker dies mid-run, or too few silos answer by the deadline. Whatever happens, every accepted
update is counted exactly once and the audit chain stays intact (assert_run_consistent).
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from django.utils import timezone

from federation.models import AuditEvent, ModelVersion, Round, Run, Update
from tests.factories import start_run
from tests.services.federations import (
    Federation,
    assert_run_consistent,
    describe,
    federation,
    online,
    run_over,
)
from tests.services.harness import Stack, kill, wait_until
from tests.services.tcp_proxy import BLACKHOLE, PASS, REFUSE

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def start_agents(stack: Stack, fed: Federation) -> list:
    procs = [*stack.procs, *fed.agents]
    for agent in fed.agents:
        agent.start()
    wait_until(
        lambda: len(online(fed.silos)) == len(fed.silos),
        timeout=60,
        what=f"{len(fed.silos)} agents online",
        procs=procs,
    )
    return procs


def stop_agents(fed: Federation) -> None:
    for agent in fed.agents:
        agent.stop(timeout=3)  # a slowed agent may be asleep in training: no long goodbye


def rounds_of(run: Run) -> list[tuple[int, int, str]]:
    return list(
        run.round_set.order_by("number", "attempt").values_list("number", "attempt", "status")
    )


def contributors(round_: Round) -> list[int]:
    return sorted(round_.updates.values_list("silo_id", flat=True))


ROUNDS_2_TO_8 = ",".join(f"{n}=4" for n in range(2, 9))


def test_an_agent_killed_mid_round_is_left_out_then_rejoins_a_later_round(
    stack: Stack, tmp_path: Path
) -> None:
    # The victim is still training round 1 when it dies. The others take up to 4 s in each
    # later round (under the 6 s deadline) until the test opens the gate, once the restarted
    # victim is online: the rounds wait for the restart however long it takes on a loaded
    # machine (up to 7 rounds, 28 s), and go fast after it.
    gate = tmp_path / "victim-back"
    fed = federation(
        stack,
        tmp_path,
        [0, 0, 1],
        slow={0: ROUNDS_2_TO_8, 1: ROUNDS_2_TO_8, 2: "1=60"},
        gate=gate,
        min_silos=2,
        rounds=8,
        round_deadline_seconds=6,
    )
    a, b, victim = fed.silos
    victim_agent = fed.agents[2]
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)
        wait_until(
            lambda: Round.objects.filter(run=run, number=1).exists(),
            timeout=30,
            what="round 1 to open",
            procs=procs,
        )
        kill(victim_agent)
        assert not Update.objects.filter(round__run=run, silo=victim).exists()
        wait_until(
            lambda: victim.pk not in online(fed.silos),
            timeout=10,
            what="the killed agent's silo to be offline",
            procs=procs,
        )
        wait_until(
            lambda: Round.objects.filter(run=run, number=1, status=Round.Status.COMPLETED).exists(),
            timeout=30,
            what="round 1 to complete without the killed agent",
            procs=procs,
        )
        first = Round.objects.get(run=run, number=1)
        assert first.attempt == 1
        assert first.selected.filter(pk=victim.pk).exists()
        assert contributors(first) == sorted([a.pk, b.pk])

        victim_agent.start()
        wait_until(
            lambda: victim.pk in online(fed.silos),
            timeout=30,
            what="the restarted agent online",
            procs=procs,
        )
        back = timezone.now()
        gate.touch()
        wait_until(lambda: run_over(run.pk), timeout=90, what="the run to end", procs=procs)
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + stack.tails(fed.agents)
        assert [r[:2] for r in rounds_of(run)] == [(n, 1) for n in range(1, 9)]
        later = list(run.round_set.filter(started_at__gt=back))
        assert later, "no round opened after the silo came back: " + stack.tails(fed.agents)
        for round_ in later:
            assert round_.selected.filter(pk=victim.pk).exists(), f"round {round_.number}"
            assert victim.pk in contributors(round_), f"round {round_.number}"
        assert_run_consistent(run)
    finally:
        stop_agents(fed)


def test_a_worker_killed_while_aggregating_is_replaced_and_the_round_is_counted_once(
    stack: Stack, tmp_path: Path
) -> None:
    fed = federation(stack, tmp_path, [0, 1], min_silos=2, rounds=2, round_deadline_seconds=60)
    worker = stack.worker
    assert worker is not None
    gate = stack.slow_aggregation_gate
    reached = Path(f"{gate}.reached")
    reached.unlink(missing_ok=True)
    gate.write_text("armed")  # tests/services/worker.py: sleep after writing round 1's model
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)
        wait_until(
            reached.exists, timeout=60, what="the worker inside round 1's aggregation", procs=procs
        )
        round_1 = Round.objects.get(run=run, number=1)
        assert round_1.status == Round.Status.AGGREGATING
        assert (stack.blob_dir / reached.read_text()).exists()  # the model blob is written...
        assert not ModelVersion.objects.filter(run=run, number=1).exists()  # ...not committed

        kill(worker)
        gate.unlink()
        readiness = worker.log.read_text().count(" ready.")
        worker.start()
        stack.wait_worker(readiness=readiness + 1)
        wait_until(lambda: run_over(run.pk), timeout=60, what="the run to end", procs=procs)
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + stack.tails(fed.agents)
        assert rounds_of(run) == [
            (1, 1, Round.Status.COMPLETED),
            (2, 1, Round.Status.COMPLETED),
        ]
        for round_ in run.round_set.all():
            assert contributors(round_) == sorted(s.pk for s in fed.silos)
        after_restart = worker.log.read_text().split(" ready.")[-1]
        assert f"run {run.pk}: round 1 aggregated from 2 updates" in after_restart
        assert_run_consistent(run)
    finally:
        gate.unlink(missing_ok=True)
        reached.unlink(missing_ok=True)
        if worker.popen is not None and worker.popen.poll() is not None:
            readiness = worker.log.read_text().count(" ready.")
            worker.start()
            stack.wait_worker(readiness=readiness + 1)
        stop_agents(fed)


def test_a_server_killed_mid_round_comes_back_and_the_run_resumes(
    stack: Stack, tmp_path: Path
) -> None:
    # Both agents of server 1 are still training round 2 when it dies.
    fed = federation(
        stack,
        tmp_path,
        [0, 1, 1],
        slow={1: "2=2", 2: "2=2"},
        min_silos=3,
        rounds=3,
        round_deadline_seconds=30,
    )
    server = stack.servers[1]
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)
        wait_until(
            lambda: Round.objects.filter(run=run, number=2).exists(),
            timeout=30,
            what="round 2 to open",
            procs=procs,
        )
        kill(server)
        accepted = set(Update.objects.filter(round__run=run).values_list("round__number", "silo"))
        server.start()
        stack.wait_server(1)
        wait_until(lambda: run_over(run.pk), timeout=60, what="the run to end", procs=procs)
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + stack.tails(fed.agents)
        # Resumed where it was: no round repeated, none lost, every silo counted once per round.
        assert rounds_of(run) == [(n, 1, Round.Status.COMPLETED) for n in (1, 2, 3)]
        for round_ in run.round_set.all():
            assert contributors(round_) == sorted(s.pk for s in fed.silos)
        assert accepted <= set(
            Update.objects.filter(round__run=run).values_list("round__number", "silo")
        )
        for agent in fed.agents[1:]:
            assert "retrying in" in agent.log.read_text(), agent.tail()
        assert_run_consistent(run)
    finally:
        if server.popen is not None and server.popen.poll() is not None:
            server.start()
            stack.wait_server(1)
        stop_agents(fed)


def test_too_few_silos_by_the_deadline_fail_the_round_its_retry_then_the_run(
    stack: Stack, tmp_path: Path
) -> None:
    # One of two silos never finishes round 1 in time; the plan needs both and allows one retry.
    fed = federation(
        stack,
        tmp_path,
        [0, 1],
        slow={1: "1=30"},
        min_silos=2,
        rounds=2,
        round_deadline_seconds=3,
        round_retries=1,
    )
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)
        wait_until(lambda: run_over(run.pk), timeout=40, what="the run to end", procs=procs)
        run.refresh_from_db()
        assert run.status == Run.Status.FAILED
        assert "round 1 failed 2 times" in run.error
        assert rounds_of(run) == [(1, 1, Round.Status.FAILED), (1, 2, Round.Status.FAILED)]
        for round_ in run.round_set.all():
            assert "1 of 2 selected silos sent an update by the deadline" in round_.error
            assert contributors(round_) == [fed.silos[0].pk]
        assert list(ModelVersion.objects.filter(run=run).values_list("number", flat=True)) == [0]
        finished = AuditEvent.objects.get(action="run.finished", object_id=str(run.pk))
        assert finished.data["status"] == Run.Status.FAILED
        wait_until(
            lambda: f"run {run.pk} finished: failed" in fed.agents[0].log.read_text(),
            timeout=10,
            what="the agent told the run failed",
            procs=procs,
        )
        assert_run_consistent(run)
    finally:
        stop_agents(fed)


def accepted_updates(run: Run) -> set[tuple[int, int]]:
    return set(Update.objects.filter(round__run=run).values_list("round__number", "silo"))


def assert_completed_once_each(run: Run, fed: Federation, accepted: set[tuple[int, int]]) -> None:
    """The run completed, no accepted update was lost, and every completed round counted each
    silo at most once (assert_run_consistent checks the audit trail too)."""
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED, run.error + describe(run.pk)
    assert accepted <= accepted_updates(run)
    numbers = [r.number for r in run.round_set.filter(status=Round.Status.COMPLETED)]
    assert sorted(numbers) == list(range(1, run.rounds + 1))
    assert_run_consistent(run)


def test_postgresql_unreachable_for_30_s_mid_round_the_run_still_completes(
    stack: Stack, tmp_path: Path
) -> None:
    """Issue 12: with the database gone for longer than the round's deadline, the round fails
    while no agent can be connected; the run used to stay "running" forever."""
    proxy = stack.db_proxy
    assert proxy is not None
    fed = federation(
        stack,
        tmp_path,
        [0, 1, 1],
        slow={0: "1=3", 1: "1=3", 2: "1=3"},
        min_silos=3,
        rounds=2,
        round_deadline_seconds=15,
        round_retries=2,
        wait_for_silos_seconds=180,
    )
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)
        wait_until(
            lambda: Round.objects.filter(run=run, number=1).exists(),
            timeout=30,
            what="round 1 to open",
            procs=procs,
        )
        proxy.set_state(REFUSE)  # every process of the stack loses PostgreSQL
        try:
            time.sleep(30)
            accepted = accepted_updates(run)
            for index in range(len(stack.servers)):
                status, body = stack.healthz(index)
                assert status == 503 and body["checks"]["database"]["ok"] is False, body
        finally:
            proxy.set_state(PASS)
        wait_until(lambda: run_over(run.pk), timeout=150, what="the run to end", procs=procs)
        assert_completed_once_each(run, fed, accepted)
    finally:
        proxy.set_state(PASS)
        stop_agents(fed)


def test_both_servers_and_the_worker_killed_mid_round_then_restarted_the_run_completes(
    stack: Stack, tmp_path: Path
) -> None:
    fed = federation(
        stack,
        tmp_path,
        [0, 1, 1],
        slow={1: "1=4", 2: "1=4"},
        min_silos=3,
        rounds=2,
        round_deadline_seconds=20,
        round_retries=2,
    )
    worker = stack.worker
    assert worker is not None
    killed = [*stack.servers, worker]
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)
        wait_until(
            lambda: Update.objects.filter(round__run=run, round__number=1).exists(),
            timeout=60,
            what="a first update of round 1",
            procs=procs,
        )
        for proc in killed:
            kill(proc)
        accepted = accepted_updates(run)
        readiness = worker.log.read_text().count(" ready.")
        for proc in killed:
            proc.start()
        for index in range(len(stack.servers)):
            stack.wait_server(index)
        stack.wait_worker(readiness=readiness + 1)
        wait_until(lambda: run_over(run.pk), timeout=150, what="the run to end", procs=procs)
        assert_completed_once_each(run, fed, accepted)
    finally:
        for proc in killed:
            if proc.popen is not None and proc.popen.poll() is not None:
                proc.start()
        for index in range(len(stack.servers)):
            stack.wait_server(index)
        stop_agents(fed)


def test_a_hung_database_answers_healthz_within_seconds_and_the_api_503(
    stack: Stack, tmp_path: Path
) -> None:
    """A database host that accepts connections and never answers: /healthz says so within its
    2 s (not the pool's timeout) and the API answers 503 with Retry-After (not 500 after 30 s).
    stack.healthz() gives up after 5 s (status 0), the API request after 20 s."""
    from federation.services.api_tokens import api_token_create
    from tests.governance_factories import governed_consortium

    proxy = stack.db_proxy
    assert proxy is not None
    scientist = governed_consortium(1).scientists[0]
    token = api_token_create(actor=scientist, user=scientist, name="fault test").token
    proxy.set_state(BLACKHOLE)
    try:
        status, body = stack.healthz(0)
        assert status == 503, body
        assert body["checks"]["database"]["ok"] is False
        assert body["checks"]["channel_layer"]["ok"] is True
        request = urllib.request.Request(
            stack.http_url(1, "/api/v1/runs/"), headers={"Authorization": f"Token {token}"}
        )
        with pytest.raises(urllib.error.HTTPError) as answer:
            urllib.request.urlopen(request, timeout=20)
        assert answer.value.code == 503
        assert answer.value.headers["Retry-After"] == "10"
        assert json.loads(answer.value.read())["code"] == "database_unavailable"
    finally:
        proxy.set_state(PASS)
    for index in range(len(stack.servers)):
        stack.wait_server(index, timeout=30)
