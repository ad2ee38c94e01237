"""The round state machine's services and database under faults, in any order (issue 12 part 6).

A smaller sibling of tests/unit/test_roundplan_stateful.py that drives the real path: the
services the agent websocket calls (``stats_receive``, ``update_receive``), connections coming
and going, deadlines passing (the run's timestamps moved into the past), and
``orchestrator.run_advance`` deciding from what the database holds.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db.models import F
from django.utils import timezone
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
    run_state_machine_as_test,
)

from fedcore.models import build_model
from federation import orchestrator
from federation.models import ModelVersion, Round, Run, Silo, Update
from federation.services.updates import Refused
from tests.integration.test_orchestrator import make_plan, send_stats, submit

pytestmark = pytest.mark.django_db

FINISHED = {Run.Status.COMPLETED, Run.Status.FAILED, Run.Status.STOPPED}
ROUNDS, RETRIES = 2, 1
SWEEPS_TO_FINISH = 2 + ROUNDS * (RETRIES + 1) * 3


class DatabaseWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.silos, self.run = make_plan(
            3,
            min_silos=2,
            round_retries=RETRIES,
            wait_for_silos_seconds=300,
            training={
                "rounds": ROUNDS,
                "local_epochs": 1,
                "batch_size": 16,
                "optimizer": "adam",
                "lr": 0.05,
            },
        )
        self.connected = {s.pk for s in self.silos}
        self.state = build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()

    @initialize()
    def statistics_done(self) -> None:
        """Every example starts with round 1 open: the faults of interest are in the rounds."""
        self.heartbeat()
        orchestrator.run_advance(self.run.pk)
        send_stats(self.run, self.silos)
        orchestrator.run_advance(self.run.pk)
        assert self.current() is not None

    def silo(self, index: int) -> Silo:
        return self.silos[index]

    def heartbeat(self) -> None:
        now = timezone.now()
        Silo.objects.filter(pk__in=self.connected).update(connection_id="c", last_heartbeat=now)
        others = [s.pk for s in self.silos if s.pk not in self.connected]
        Silo.objects.filter(pk__in=others).update(connection_id=None)

    def current(self) -> Round | None:
        return self.run.round_set.order_by("-number", "-attempt").first()

    @rule(index=st.integers(0, 2))
    def connect(self, index: int) -> None:
        self.connected.add(self.silo(index).pk)
        self.heartbeat()

    @rule(index=st.integers(0, 2))
    def disconnect(self, index: int) -> None:
        self.connected.discard(self.silo(index).pk)
        self.heartbeat()

    @rule()
    def every_connection_drops(self) -> None:  # both ASGI processes killed, say
        self.connected = set()
        self.heartbeat()

    @rule(index=st.integers(0, 2))
    def send(self, index: int) -> None:
        silo = self.silo(index)
        self.run.refresh_from_db()
        if silo.pk not in self.connected:
            return
        if self.run.status == Run.Status.STATS:
            if not self.run.silo_statistics.filter(silo=silo).exists():
                send_stats(self.run, [silo])
            return
        current = self.current()
        if current is None or current.status != Round.Status.COLLECTING:
            return
        try:
            submit(self.run, silo, current.number, self.state, 10)
        except Refused:
            pass  # not selected, past the deadline, or already sent: refused, counted once

    @rule(seconds=st.sampled_from([30, 61, 301]))
    def time_passes(self, seconds: int) -> None:
        shift = timedelta(seconds=seconds)
        Round.objects.filter(run=self.run).update(
            deadline=F("deadline") - shift, started_at=F("started_at") - shift
        )
        Round.objects.filter(run=self.run, aggregation_started_at__isnull=False).update(
            aggregation_started_at=F("aggregation_started_at") - shift
        )
        Run.objects.filter(pk=self.run.pk, waiting_since__isnull=False).update(
            waiting_since=F("waiting_since") - shift
        )
        Run.objects.filter(pk=self.run.pk, stats_deadline__isnull=False).update(
            stats_deadline=F("stats_deadline") - shift
        )
        Run.objects.filter(pk=self.run.pk, evaluation_deadline__isnull=False).update(
            evaluation_deadline=F("evaluation_deadline") - shift
        )  # the final evaluation: nobody answers it here, its deadline ends it
        self.heartbeat()

    @rule()
    def advance(self) -> None:
        self.heartbeat()  # connected agents beat every few seconds, however slow this machine
        orchestrator.run_advance(self.run.pk)
        self.check()

    @rule()
    def everyone_comes_back(self) -> None:
        self.connected = {s.pk for s in self.silos}
        self.heartbeat()
        for _ in range(SWEEPS_TO_FINISH):
            self.run.refresh_from_db()
            if self.run.status in FINISHED:
                break
            for _ in range(3):
                self.heartbeat()
                orchestrator.run_advance(self.run.pk)
                for index in range(3):
                    self.send(index)
            self.time_passes(61)
        self.run.refresh_from_db()
        assert self.run.status in FINISHED

    def check(self) -> None:
        self.run.refresh_from_db()
        # No update counted twice: one per silo and attempt, one model version per round.
        per_attempt = Update.objects.filter(round__run=self.run).values_list("round_id", "silo_id")
        assert len(per_attempt) == len(set(per_attempt))
        numbers = list(ModelVersion.objects.filter(run=self.run).values_list("number", flat=True))
        assert len(numbers) == len(set(numbers))
        online = Silo.objects.filter(pk__in=self.connected).count()
        if self.run.status == Run.Status.RUNNING and online >= 2:
            current = self.current()
            assert current is not None and current.status in {
                Round.Status.COLLECTING,
                Round.Status.AGGREGATING,
            }, f"running with {online} silos online and round {current} not in progress"

    def teardown(self) -> None:
        Run.objects.filter(pk=self.run.pk).update(status=Run.Status.STOPPED)


def test_the_round_services_under_faults_end_every_run() -> None:
    run_state_machine_as_test(
        DatabaseWorld,
        settings=settings(
            max_examples=25,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
        ),
    )
