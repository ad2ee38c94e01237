"""The round state machine's decisions under faults, in any order (issue 12 part 6).

A simulated world (silos that connect, disconnect, refuse, send updates and statistics; time
passing deadlines; a decision whose transaction fails to commit; a worker that dies mid-
aggregation; a restart that re-decides from what was persisted) drives ``roundplan.decide`` the
way ``services.rounds.run_step`` does: load the snapshot, decide, apply one decision per
transaction. Hypothesis interleaves the faults; the invariants are what a user relies on:

- no update is counted twice, and rounds complete in order, each once;
- after a sweep, a run with enough silos selectable is never left running without a round in
  progress (the bug: a round failed while its silos were away, and the retry never opened);
- once enough silos are back and cooperate, every run ends completed, failed or stopped within a
  bounded number of sweeps;
- a run completes only after its last round, through the final evaluation phase (or with a note
  that no silo was there to evaluate), and only silos asked to evaluate are counted in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from federation import roundplan as rp

SILOS = (1, 2, 3)
LIMITS = rp.Limits(
    rounds=3,
    min_silos=2,
    round_retries=2,
    round_deadline_seconds=60,
    wait_for_silos_seconds=300,
    aggregation_stale_seconds=120,
)
# Each pass either changes the persisted state or stops; a run has at most
# 2 (statistics) + rounds * (retries + 1) * 3 (open, close/fail, aggregate) transitions.
MAX_PASSES = 8
SWEEPS_TO_FINISH = 2 + LIMITS.rounds * (LIMITS.round_retries + 1) * 3 + 2


@dataclass
class RoundRow:
    id: int
    number: int
    attempt: int
    selected: tuple[int, ...]
    started_at: datetime
    deadline: datetime
    status: str = rp.COLLECTING
    received: list[int] = field(default_factory=list)
    aggregation_started_at: datetime | None = None
    error: str = ""


@dataclass
class Persisted:
    """What the database holds: the only thing that survives a restart."""

    status: str = rp.PENDING
    waiting_since: datetime | None = None
    stats_deadline: datetime | None = None
    stats: set[int] = field(default_factory=set)
    rounds: list[RoundRow] = field(default_factory=list)
    counted: dict[int, list[int]] = field(default_factory=dict)  # round number -> silos
    evaluation_deadline: datetime | None = None
    asked: tuple[int, ...] = ()
    evaluated: set[int] = field(default_factory=set)
    final: list[int] | None = None  # the silos the completed run's final figures pooled
    note: str = ""


class RoundPlanWorld(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = datetime(2026, 1, 1, tzinfo=UTC)
        self.db = Persisted()
        self.connected: set[int] = set()
        self.refusing: set[int] = set()
        self.worker_dies_in_aggregation = False
        self.next_round_id = 1

    # -- the snapshot and the application of a decision, as services.rounds does them --------

    def snapshot(self) -> rp.RunState:
        current = self.db.rounds[-1] if self.db.rounds else None
        return rp.RunState(
            status=self.db.status,
            now=self.now,
            limits=LIMITS,
            online=tuple(sorted(self.connected)),
            waiting_since=self.db.waiting_since,
            stats_deadline=self.db.stats_deadline,
            stats_reported=len(self.db.stats),
            stats_expected=len(SILOS),
            evaluation_deadline=self.db.evaluation_deadline,
            evaluation_asked=len(self.db.asked),
            evaluation_reported=len(self.db.evaluated),
            evaluation_refused=len((set(self.db.asked) - self.db.evaluated) & self.refusing),
            current=None
            if current is None
            else rp.RoundState(
                id=current.id,
                number=current.number,
                attempt=current.attempt,
                status=current.status,
                selected=len(current.selected),
                received=len(current.received),
                started_at=current.started_at,
                deadline=current.deadline,
                aggregation_started_at=current.aggregation_started_at,
                error=current.error,
            ),
        )

    def apply(self, decision: rp.Decision) -> None:
        db = self.db
        match decision:
            case rp.Wait():
                pass
            case rp.StartWaiting():
                db.waiting_since = self.now
            case rp.BeginStatistics():
                db.status, db.waiting_since = rp.STATS, None
                db.stats_deadline = self.now + timedelta(seconds=LIMITS.round_deadline_seconds)
            case rp.FinishStatistics():
                db.status = rp.RUNNING
            case rp.OpenRound(number=number, attempt=attempt, silos=silos):
                assert set(silos) <= self.connected and len(silos) >= LIMITS.min_silos
                db.waiting_since = None
                db.rounds.append(
                    RoundRow(
                        id=self.next_round_id,
                        number=number,
                        attempt=attempt,
                        selected=silos,
                        started_at=self.now,
                        deadline=self.now + timedelta(seconds=LIMITS.round_deadline_seconds),
                    )
                )
                self.next_round_id += 1
            case rp.CloseRound(round_id=round_id):
                row = self.round_by_id(round_id)
                assert row.status == rp.COLLECTING
                row.status, row.aggregation_started_at = rp.AGGREGATING, self.now
            case rp.Aggregate():
                pass
            case rp.FailRound(round_id=round_id, reason=reason):
                row = self.round_by_id(round_id)
                assert row.status == rp.COLLECTING
                row.status, row.error = rp.FAILED, reason
            case rp.BeginEvaluation(silos=silos):
                assert set(silos) <= self.connected and silos
                assert [r.number for r in db.rounds if r.status == rp.COMPLETED][-1:] == [
                    LIMITS.rounds
                ]
                db.status, db.waiting_since, db.asked = rp.EVALUATING, None, silos
                db.evaluation_deadline = self.now + timedelta(seconds=LIMITS.round_deadline_seconds)
            case rp.FinishEvaluation():
                assert db.status == rp.EVALUATING
                db.status, db.final = rp.COMPLETED, sorted(db.evaluated)
            case rp.CompleteRun(note=note):
                assert db.rounds and db.rounds[-1].number == LIMITS.rounds
                assert note and not self.connected  # only when nobody could evaluate
                db.status, db.note = rp.COMPLETED, note
            case rp.FailRun():
                db.status = rp.FAILED
            case _:
                raise AssertionError(f"unknown decision {decision!r}")

    def aggregate(self, round_id: int) -> None:
        """round_aggregate: its own transaction, a no-op unless the round is aggregating."""
        row = self.round_by_id(round_id)
        if row.status != rp.AGGREGATING:
            return
        if self.worker_dies_in_aggregation:
            self.worker_dies_in_aggregation = False
            return  # killed before its commit: the round stays aggregating
        assert row.number not in self.db.counted, f"round {row.number} aggregated twice"
        self.db.counted[row.number] = list(row.received)
        row.status = rp.COMPLETED

    def round_by_id(self, round_id: int) -> RoundRow:
        return next(r for r in self.db.rounds if r.id == round_id)

    def sweep(self, *, failing_pass: int | None = None) -> rp.Decision | None:
        """orchestrator.run_advance: decide and apply until the run waits. A pass numbered
        ``failing_pass`` raises before its commit (PostgreSQL away): nothing of it persists."""
        last = None
        for index in range(MAX_PASSES):
            if self.db.status not in rp.ACTIVE:
                return last
            decision = rp.decide(self.snapshot())
            assert rp.decide(self.snapshot()) == decision  # a decision is a function of state
            if index == failing_pass:
                return None  # rolled back; the next sweep decides again from the same state
            self.apply(decision)
            last = decision
            if not decision.again:
                return last
            if isinstance(decision, rp.CloseRound | rp.Aggregate):
                self.aggregate(decision.round_id)
        return last

    # -- the world ---------------------------------------------------------------------------

    @rule(silo=st.sampled_from(SILOS))
    def connect(self, silo: int) -> None:
        self.connected.add(silo)

    @rule(silo=st.sampled_from(SILOS))
    def disconnect(self, silo: int) -> None:
        self.connected.discard(silo)

    @rule(silo=st.sampled_from(SILOS))
    def refuse_or_relent(self, silo: int) -> None:
        self.refusing ^= {silo}  # its agent refuses every task (clock, policy) or stops refusing

    @rule(silo=st.sampled_from(SILOS))
    def send_statistics(self, silo: int) -> None:
        if self.db.status == rp.STATS and silo in self.connected:
            self.db.stats.add(silo)

    @rule(silo=st.sampled_from(SILOS), again=st.booleans())
    def send_update(self, silo: int, again: bool) -> None:
        row = self.db.rounds[-1] if self.db.rounds else None
        if row is None or row.status != rp.COLLECTING or row.deadline <= self.now:
            return
        if silo not in row.selected or silo not in self.connected or silo in self.refusing:
            return
        if silo in row.received:
            return  # update_receive refuses a second update of the same attempt
        row.received.append(silo)

    @rule(silo=st.sampled_from(SILOS))
    def send_evaluation(self, silo: int) -> None:
        db = self.db
        if db.status != rp.EVALUATING or silo not in db.asked or silo not in self.connected:
            return
        if silo in self.refusing or db.evaluation_deadline <= self.now:  # type: ignore[operator]
            return
        db.evaluated.add(silo)  # evaluation_receive refuses a second report

    @rule(seconds=st.sampled_from([1, 10, 59, 61, 121, 301]))
    def time_passes(self, seconds: int) -> None:
        self.now += timedelta(seconds=seconds)

    @rule()
    def sweep_now(self) -> None:
        self.sweep()

    @rule(failing_pass=st.integers(min_value=0, max_value=2))
    def sweep_with_a_failed_write(self, failing_pass: int) -> None:
        self.sweep(failing_pass=failing_pass)

    @rule()
    def worker_will_die_in_aggregation(self) -> None:
        self.worker_dies_in_aggregation = True

    @rule()
    def restart(self) -> None:
        # Every process dies: in-memory intentions are gone, agents reconnect later.
        self.worker_dies_in_aggregation = False
        self.connected.clear()

    @precondition(lambda self: self.db.status in rp.ACTIVE)
    @rule()
    def stop(self) -> None:
        self.db.status = "stopped"

    @rule()
    def everyone_comes_back_and_cooperates(self) -> None:
        self.connected, self.refusing = set(SILOS), set()
        self.worker_dies_in_aggregation = False
        for _ in range(SWEEPS_TO_FINISH):
            if self.db.status not in rp.ACTIVE:
                break
            for _ in range(3):  # what the agents owe is sent as soon as it is asked for
                self.sweep()
                for silo in SILOS:
                    self.send_statistics(silo)
                    self.send_update(silo, again=False)
                    self.send_evaluation(silo)
            self.now += timedelta(seconds=LIMITS.round_deadline_seconds + 1)
        assert self.db.status in {rp.COMPLETED, rp.FAILED, "stopped"}, self.db

    # -- invariants ----------------------------------------------------------------------------

    @invariant()
    def no_update_is_counted_twice_and_rounds_complete_in_order(self) -> None:
        for silos in self.db.counted.values():
            assert len(silos) == len(set(silos))
        assert sorted(self.db.counted) == list(range(1, len(self.db.counted) + 1))
        completed = [r.number for r in self.db.rounds if r.status == rp.COMPLETED]
        assert completed == sorted(set(completed))

    @invariant()
    def a_completed_run_was_evaluated_by_silos_it_asked_after_its_last_round(self) -> None:
        db = self.db
        if db.status != rp.COMPLETED:
            return
        assert [r.number for r in db.rounds if r.status == rp.COMPLETED] == list(
            range(1, LIMITS.rounds + 1)
        )
        assert (db.final is None) != (not db.note), db  # evaluated, or a note says why not
        assert set(db.final or ()) <= set(db.asked)

    @invariant()
    def a_run_with_enough_silos_is_never_left_running_idle(self) -> None:
        # Checked on the state a sweep would leave: decide once more from it, as a sweep would.
        state = self.snapshot()
        if state.status != rp.RUNNING or len(state.online) < LIMITS.needed_to_open:
            return
        probe = RoundPlanWorld.__new__(RoundPlanWorld)
        probe.__dict__.update(
            {**self.__dict__, "db": _copy(self.db), "worker_dies_in_aggregation": False}
        )
        probe.sweep()
        after = probe.db
        if after.status == rp.RUNNING:
            assert after.rounds and after.rounds[-1].status in {rp.COLLECTING, rp.AGGREGATING}, (
                f"running with {len(state.online)} silos online and no round in progress: "
                f"{after.rounds[-1] if after.rounds else None}"
            )


def _copy(db: Persisted) -> Persisted:
    return replace(
        db,
        stats=set(db.stats),
        evaluated=set(db.evaluated),
        rounds=[replace(r, received=list(r.received)) for r in db.rounds],
        counted={k: list(v) for k, v in db.counted.items()},
    )


RoundPlanWorld.TestCase.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_round_state_machine_under_faults = RoundPlanWorld.TestCase


def test_a_failed_round_is_retried_when_its_silos_are_back() -> None:
    """The reproduction of the stuck run, on the decision function alone."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    failed = rp.RoundState(
        id=7,
        number=1,
        attempt=1,
        status=rp.FAILED,
        selected=2,
        received=0,
        started_at=now,
        deadline=now,
        error="0 of 2 selected silos sent an update by the deadline",
    )
    away = rp.RunState(status=rp.RUNNING, now=now, limits=LIMITS, online=(), current=failed)
    assert rp.decide(away) == rp.StartWaiting(online=0, needed=2)
    waiting = replace(away, waiting_since=now, now=now + timedelta(seconds=30))
    assert isinstance(rp.decide(waiting), rp.Wait)
    back = replace(waiting, online=(1, 2))
    assert rp.decide(back) == rp.OpenRound(number=1, attempt=2, silos=(1, 2))
    too_late = replace(waiting, now=now + timedelta(seconds=301))
    assert rp.decide(too_late) == rp.FailRun(
        "round 1 could not start: only 0 of the minimum 2 silos were online within 300 s"
    )


def _evaluating(now: datetime, **fields: object) -> rp.RunState:
    state = rp.RunState(
        status=rp.EVALUATING,
        now=now,
        limits=LIMITS,
        online=(1, 2, 3),
        evaluation_deadline=now + timedelta(seconds=60),
        evaluation_asked=3,
    )
    return replace(state, **fields)  # type: ignore[arg-type]


def test_the_last_round_completed_opens_the_final_evaluation_not_the_end() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    last = rp.RoundState(
        id=3, number=3, attempt=1, status=rp.COMPLETED, selected=3, received=3,
        started_at=now, deadline=now,
    )  # fmt: skip
    running = rp.RunState(status=rp.RUNNING, now=now, limits=LIMITS, online=(1, 2, 3), current=last)
    assert rp.decide(running) == rp.BeginEvaluation(silos=(1, 2, 3))
    # fewer than the minimum: wait for them, then evaluate with whoever is there
    one = replace(running, online=(2,))
    assert rp.decide(one) == rp.StartWaiting(online=1, needed=2)
    assert isinstance(rp.decide(replace(one, waiting_since=now)), rp.Wait)
    late = replace(one, waiting_since=now, now=now + timedelta(seconds=301))
    assert rp.decide(late) == rp.BeginEvaluation(silos=(2,))
    # nobody at all: the trained run still completes, saying the model was not evaluated
    assert rp.decide(replace(late, online=())) == rp.CompleteRun(
        note="the final model was not evaluated: no silo was online within 300 s of the last round"
    )


def test_the_evaluation_waits_for_every_asked_silo_until_its_deadline() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert rp.decide(_evaluating(now, evaluation_reported=2)) == rp.Wait(
        "final evaluation: 2 of 3 silos answered"
    )
    assert rp.decide(_evaluating(now, evaluation_reported=3)) == rp.FinishEvaluation()
    # a silo that refused the run is not waited for
    assert rp.decide(_evaluating(now, evaluation_reported=2, evaluation_refused=1)) == (
        rp.FinishEvaluation()
    )


def test_a_silo_vanishing_during_the_evaluation_is_left_out_at_the_deadline() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    vanished = _evaluating(now, evaluation_reported=2, online=(1, 2))
    assert isinstance(rp.decide(vanished), rp.Wait)
    after = replace(vanished, now=now + timedelta(seconds=60))
    assert rp.decide(after) == rp.FinishEvaluation()
    # even with no answer at all: the phase ends, it never fails the trained run
    assert rp.decide(replace(after, evaluation_reported=0, online=())) == rp.FinishEvaluation()
