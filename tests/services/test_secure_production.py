"""Secure aggregation in the production profile: two ASGI servers, a Celery worker and beat,
PostgreSQL and Redis, agents on both servers.

A secure round attempt's coordinator is a ``SecAggAttempt`` row that whichever process handles a
message locks, advances and writes back (federation/secagg_rounds.py), so no process holds the
round: killing one loses its uncommitted transaction and, for an ASGI server, its agents'
connections (they become dropouts). Throughout, the tests sample what the server stores -- the
attempt rows, the blob folder, every Redis key -- and check that no individual update is ever in
clear anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from federation.models import AuditEvent, Round, Run, SecAggAttempt, Update
from tests.factories import start_run
from tests.services.federations import (
    Federation,
    assert_run_consistent,
    describe,
    federation,
    online,
    run_over,
)
from tests.services.harness import Stack, Supervisor, kill, wait_until

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]

# The public parts of a SecAggServer snapshot: nothing else may ever be in an attempt's row.
PUBLIC_STATE = {
    "stage",
    "deadline",
    "awaited",
    "answered",
    "c_public",
    "s_public",
    "graph",
    "relay",
    "shared",
    "contributors",
    "asked",
    "s_shares",
    "b_shares",
}
P = 5  # logistic regression on 3 features: 3 weights, the bias, the weight coordinate


@dataclass
class Storage:
    """What the stack stored for secure rounds, sampled while the run goes on."""

    redis_url: str
    stages: dict[tuple[int, int], set[str]] = field(default_factory=dict)  # (round, attempt)
    keys: dict[tuple[int, int], set[str]] = field(default_factory=dict)  # advertised c-keys
    vectors: int = 0
    redis_values: int = 0

    def sample(self, run: Run) -> None:
        for row in SecAggAttempt.objects.filter(round__run=run).select_related("round"):
            attempt = (row.round.number, row.round.attempt)
            assert set(row.state) == PUBLIC_STATE, sorted(row.state)
            self.stages.setdefault(attempt, set()).add(row.state["stage"])
            self.keys.setdefault(attempt, set()).update(row.state["c_public"].values())
            if row.vector is not None:
                # One P-vector: the running sum of the masked vectors (then the aggregate).
                assert len(bytes(row.vector)) == 4 * (P + len(row.params["layout"]))
                assert row.state["stage"] in ("masked_input", "unmasking", "done")
                self.vectors += 1
        client = redis.Redis.from_url(self.redis_url)
        try:
            for key in client.scan_iter(count=1000):
                kind = client.type(key)
                values: list[bytes] = []
                if kind == b"string":
                    values = [client.get(key) or b""]
                elif kind == b"zset":
                    values = [v for v, _ in client.zrange(key, 0, -1, withscores=True)]
                elif kind == b"list":
                    values = client.lrange(key, 0, -1)
                for value in values:
                    self.redis_values += 1
                    # Stage requests pass through the channel layer; a masked vector never does,
                    # and no update (masked or not) is ever a Redis value.
                    assert b"masked_update" not in value and b"masked_vector" not in value
        finally:
            client.close()


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


def secure_federation(stack: Stack, tmp_path: Path, **kwargs: Any) -> Federation:
    return federation(
        stack,
        tmp_path,
        [0, 0, 1, 1],
        secure_aggregation=True,
        secagg={"stage_timeout_seconds": 10.0},
        min_silos=3,
        rounds=2,
        round_deadline_seconds=25,
        **kwargs,
    )


def wait_run_over(run: Run, storage: Storage, *, timeout: float, procs: list) -> None:
    """Until the run ends, sampling what is stored; a timeout says where every attempt stands."""

    def over() -> bool:
        storage.sample(run)
        return run_over(run.pk)

    try:
        wait_until(over, timeout=timeout, what="the run to end", procs=procs)
    except AssertionError as exc:
        raise AssertionError(f"{describe(run.pk)}\n{exc}") from None


def stage_of(run: Run, number: int, attempt: int) -> str | None:
    row = SecAggAttempt.objects.filter(
        round__run=run, round__number=number, round__attempt=attempt
    ).first()
    return None if row is None else row.state["stage"]


def assert_nothing_in_clear(stack: Stack, run: Run, storage: Storage) -> None:
    """No update blob, every update row masked, no attempt row left, the audit chain intact."""
    updates = list(Update.objects.filter(round__run=run))
    assert updates and all(u.blob_key == "" and not u.fairness for u in updates)
    stored = sorted(str(p.relative_to(stack.blob_dir)) for p in stack.blob_dir.rglob("*.*"))
    mine = [p for p in stored if p.startswith(f"runs/{run.pk}/")]
    assert mine and all("/models/" in p or "/strategy/" in p for p in mine), mine
    accepted = AuditEvent.objects.filter(action="update.accepted", object_id=str(run.pk))
    assert accepted.count() == len(updates) and all(e.data["masked"] for e in accepted)
    assert not SecAggAttempt.objects.filter(round__run=run).exists()  # deleted with the round
    assert storage.redis_values > 0  # the sampler saw the channel layer's keys
    assert_run_consistent(run)


def test_a_secure_run_with_agents_on_both_servers_survives_a_killed_agent(
    stack: Stack, tmp_path: Path
) -> None:
    # The victim (on server 1) is still training round 1 when it is killed after sharing its
    # keys: the others' shares remove its masks, round 1 completes with 3 contributors and
    # round 2 runs without it.
    fed = secure_federation(stack, tmp_path, slow={3: "1=30", 0: "1=2", 1: "1=2", 2: "1=2"})
    victim = fed.silos[3]
    storage = Storage(stack.redis_url)
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)

        def masking() -> bool:
            storage.sample(run)
            return stage_of(run, 1, 1) == "masked_input"

        wait_until(masking, timeout=40, what="round 1 in its masked-input stage", procs=procs)
        kill(fed.agents[3])

        wait_run_over(run, storage, timeout=120, procs=procs)
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, describe(run.pk) + stack.tails(fed.agents)
        rounds = list(run.round_set.order_by("number", "attempt"))
        assert [(r.number, r.attempt, r.status) for r in rounds] == [
            (1, 1, Round.Status.COMPLETED),
            (2, 1, Round.Status.COMPLETED),
        ]
        first = sorted(rounds[0].updates.values_list("silo_id", flat=True))
        assert first == sorted(s.pk for s in fed.silos[:3])
        assert rounds[0].selected.filter(pk=victim.pk).exists()
        assert "masked_input" in storage.stages[(1, 1)]
        # The worker ran the orchestration; both servers fed the coordinator agents' messages.
        assert "round 2 aggregated from 3 updates" in stack.worker.log.read_text()
        assert_nothing_in_clear(stack, run, storage)
    finally:
        for agent in fed.agents:
            agent.stop(timeout=3)


def test_killing_the_processes_of_a_secure_round_mid_stage_retries_it_with_fresh_keys(
    stack: Stack, tmp_path: Path
) -> None:
    # Mid masked-input stage of round 1, server 1 (holding two of the four agents and taking
    # their messages) and the Celery worker (running the orchestration and the stage timers)
    # are killed with -9 and restarted. Two of four left is below the threshold of 3: the
    # attempt cannot complete, fails with its reason and is retried with new keys.
    fed = secure_federation(stack, tmp_path, slow={i: "1=4" for i in range(4)}, round_retries=2)
    for agent in fed.agents:  # back within a second of their server, as a site's agent would be
        agent.env = {**agent.env, "QUORUM_TEST_BACKOFF_CAP": "1"}
    server, worker = stack.servers[1], stack.worker
    assert worker is not None
    storage = Storage(stack.redis_url)
    try:
        procs = start_agents(stack, fed)
        run = start_run(fed.plan)

        def masking() -> bool:
            storage.sample(run)
            return stage_of(run, 1, 1) == "masked_input"

        wait_until(masking, timeout=40, what="round 1 in its masked-input stage", procs=procs)
        with Supervisor([server, worker]) as supervisor:
            kill(server)
            kill(worker)

            wait_run_over(run, storage, timeout=150, procs=procs)
        assert len(supervisor.restarted) == 2, supervisor.restarted
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, describe(run.pk) + stack.tails(fed.agents)
        rounds = list(run.round_set.order_by("number", "attempt"))
        assert [(r.number, r.attempt, r.status) for r in rounds][0] == (
            1,
            1,
            Round.Status.FAILED,
        ), describe(run.pk)
        assert rounds[-1].number == 2 and rounds[-1].status == Round.Status.COMPLETED
        failed = rounds[0]
        assert "secure aggregation stopped at stage masked_input" in failed.error, failed.error
        aborted = AuditEvent.objects.get(
            action="secagg.aborted", object_id=str(run.pk), data__round=1, data__attempt=1
        )
        assert aborted.data["reason"] == failed.error
        # Never a fallback to plain aggregation: the failed attempt left no update in clear and
        # no model; the retry ran secure aggregation again, with keys never seen before.
        retry = rounds[1]
        assert (retry.number, retry.attempt, retry.status) == (1, 2, Round.Status.COMPLETED)
        assert storage.keys[(1, 1)] and storage.keys[(1, 2)]
        assert not storage.keys[(1, 1)] & storage.keys[(1, 2)]
        assert len(retry.updates.all()) >= 3
        assert storage.vectors > 0  # the masked sum was sampled while the attempt waited
        assert_nothing_in_clear(stack, run, storage)
    finally:
        for proc in (server, worker):
            if proc.popen is not None and proc.popen.poll() is not None:
                proc.start()
        stack.wait_server(1)
        for agent in fed.agents:
            agent.stop(timeout=3)
