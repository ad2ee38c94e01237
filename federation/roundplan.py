"""The round state machine's decisions: pure functions of a snapshot of a run, no database.

``decide(state)`` looks at a :class:`RunState` (what ``federation.services.rounds`` loaded in the
run's transaction: statuses, counts, deadlines, the selectable silos, the time, the plan's
limits) and returns the one thing to do next, a :class:`Decision`. The service applies it and
asks again; nothing here remembers anything between calls, so a decision taken after a crash,
twice, or by another process from the same state is the same decision::

    pending --(enough silos online)--> stats --(all statistics in, or deadline with the minimum)-->
    running: round k collecting --(all selected answered, or deadline with the minimum)-->
             aggregating --> completed --> round k+1 ... --> last round completed -->
    evaluating: the final model at every selectable site --(all asked answered, or deadline)-->
    run completed

A round that misses its minimum fails; a failed current round is retried (a new attempt of the
same number) while the plan's ``round_retries`` allows, as soon as enough silos are selectable,
or the run fails once it waited ``wait_for_silos_seconds`` for them. Then the run fails.

The evaluation phase never fails a trained run: it asks the selectable silos (waiting for the
plan's minimum up to ``wait_for_silos_seconds``, then taking whoever is there), waits for their
answers until its deadline, and completes the run with the reports that came in -- or, when no
silo was there to ask, completes it with a note that the final model was not evaluated.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

# Run and round statuses (the values of federation.models.Run.Status / Round.Status).
PENDING, STATS, RUNNING, EVALUATING = "pending", "stats", "running", "evaluating"
COLLECTING, AGGREGATING, COMPLETED, FAILED = "collecting", "aggregating", "completed", "failed"
ACTIVE = (PENDING, STATS, RUNNING, EVALUATING)


@dataclass(frozen=True)
class Limits:
    """The plan's orchestration settings, and the server's."""

    rounds: int
    min_silos: int
    round_retries: int
    round_deadline_seconds: float
    wait_for_silos_seconds: float
    aggregation_stale_seconds: float
    secure: bool = False
    # Since when the deciding process is the only one that aggregates (None: unknown): an
    # aggregation begun before then belongs to a process that is gone.
    sole_aggregator_since: datetime | None = None

    @property
    def needed_to_open(self) -> int:
        """The fewest selectable silos a round can start with."""
        return needed_to_open(self.min_silos, secure=self.secure)


def needed_to_open(min_silos: int, *, secure: bool) -> int:
    """The fewest selectable silos a round can start with: the plan's minimum; secure rounds
    at least 2 (a sum of one masked update is that update)."""
    return max(min_silos, 2) if secure else min_silos


@dataclass(frozen=True)
class SecureOutcome:
    """How a finished secure round attempt ended (its coordinator's word)."""

    ok: bool
    contributors: int = 0
    error: str | None = None


@dataclass(frozen=True)
class RoundState:
    """The run's current round attempt (the highest number, then the highest attempt)."""

    id: int
    number: int
    attempt: int
    status: str
    selected: int
    received: int
    started_at: datetime
    deadline: datetime
    aggregation_started_at: datetime | None = None
    error: str = ""
    # Selected silos without an update whose agent refused the run: not waited for (they will
    # not answer; federation.services.refusals).
    refused: int = 0
    # Secure rounds still collecting: None while the coordinator runs, else how it ended.
    secure_outcome: SecureOutcome | None = None


@dataclass(frozen=True)
class RunState:
    """Everything a decision about a run may depend on."""

    status: str
    now: datetime
    limits: Limits
    online: tuple[int, ...]  # ids of the selectable silos (connected, admitted, with budget)
    waiting_since: datetime | None = None
    stats_deadline: datetime | None = None
    stats_reported: int = 0
    stats_expected: int = 0
    current: RoundState | None = None
    # The evaluation phase: when it ends, how many silos were asked, answered, refused the run.
    evaluation_deadline: datetime | None = None
    evaluation_asked: int = 0
    evaluation_reported: int = 0
    evaluation_refused: int = 0


@dataclass(frozen=True)
class Decision:
    """What to do next. ``again``: the caller should decide once more right after applying it."""

    again = False


@dataclass(frozen=True)
class Wait(Decision):
    """Nothing to do until something changes (an answer, a deadline, a connection)."""

    reason: str


@dataclass(frozen=True)
class StartWaiting(Decision):
    """Too few silos are selectable: note since when the run waits for them."""

    online: int
    needed: int


@dataclass(frozen=True)
class BeginStatistics(Decision):
    """Ask these silos for their local statistics."""

    silos: tuple[int, ...]


@dataclass(frozen=True)
class FinishStatistics(Decision):
    """Merge the reported statistics into the preprocessing and build model version 0."""

    again = True


@dataclass(frozen=True)
class OpenRound(Decision):
    """Open attempt ``attempt`` of round ``number`` with these silos."""

    number: int
    attempt: int
    silos: tuple[int, ...]


@dataclass(frozen=True)
class CloseRound(Decision):
    """The collecting round is due: mark it aggregating, then aggregate it."""

    round_id: int
    again = True


@dataclass(frozen=True)
class Aggregate(Decision):
    """An aggregation that started long ago (its worker died): run it again (idempotent)."""

    round_id: int
    again = True


@dataclass(frozen=True)
class FailRound(Decision):
    """The round attempt missed its minimum."""

    round_id: int
    reason: str
    again = True


@dataclass(frozen=True)
class BeginEvaluation(Decision):
    """Every round is completed: ask these silos to evaluate the final model."""

    silos: tuple[int, ...]


@dataclass(frozen=True)
class FinishEvaluation(Decision):
    """Every asked silo answered or the deadline passed: pool the reports, complete the run."""


@dataclass(frozen=True)
class CompleteRun(Decision):
    """The run is over and its model stands; ``note`` says what could not be done."""

    note: str = ""


@dataclass(frozen=True)
class FailRun(Decision):
    """The run cannot go on."""

    reason: str


def decide(state: RunState) -> Decision:
    """The one thing to do next for a run in ``state``."""
    if state.status not in ACTIVE:
        return Wait(f"the run is {state.status}")
    if state.status == PENDING:
        return _begin_statistics(state)
    if state.status == STATS:
        return _finish_statistics(state)
    if state.status == EVALUATING:
        return _finish_evaluation(state)
    return _advance_rounds(state)


def _wait_or_fail(state: RunState, needed: int, what: str) -> Decision:
    online, limits = len(state.online), state.limits
    if state.waiting_since is None:
        return StartWaiting(online=online, needed=needed)
    if (state.now - state.waiting_since).total_seconds() > limits.wait_for_silos_seconds:
        return FailRun(
            f"{what}: only {online} of the minimum {needed} silos were online "
            f"within {limits.wait_for_silos_seconds:.0f} s"
        )
    return Wait(f"{what} yet: {online} of the minimum {needed} silos are online")


def _begin_statistics(state: RunState) -> Decision:
    if len(state.online) < state.limits.min_silos:
        return _wait_or_fail(state, state.limits.min_silos, "federated statistics could not start")
    return BeginStatistics(silos=state.online)


def _finish_statistics(state: RunState) -> Decision:
    deadline_passed = state.stats_deadline is not None and state.now >= state.stats_deadline
    if state.stats_reported < state.stats_expected and not deadline_passed:
        return Wait(
            f"federated statistics: {state.stats_reported} of {state.stats_expected} silos answered"
        )
    if state.stats_reported < state.limits.min_silos:
        return FailRun(
            f"federated statistics: {state.stats_reported} of the minimum "
            f"{state.limits.min_silos} silos answered by the deadline"
        )
    return FinishStatistics()


def _advance_rounds(state: RunState) -> Decision:
    current, limits = state.current, state.limits
    if current is None:
        return _open_round(state, number=1, attempt=1)
    if current.status == COLLECTING:
        return _close_if_due(state, current)
    if current.status == AGGREGATING:
        started = current.aggregation_started_at or current.started_at
        orphaned = limits.sole_aggregator_since is not None and started < (
            limits.sole_aggregator_since
        )
        if orphaned or (state.now - started).total_seconds() > limits.aggregation_stale_seconds:
            return Aggregate(round_id=current.id)
        return Wait(f"round {current.number} is being aggregated")
    if current.status == COMPLETED:
        if current.number >= limits.rounds:
            return _begin_evaluation(state)
        return _open_round(state, number=current.number + 1, attempt=1)
    # FAILED: retried for as long as the plan allows -- on every pass, so a retry that had to
    # wait for silos opens as soon as they are back (or the run fails when waiting ran out).
    if current.attempt <= limits.round_retries:
        return _open_round(state, number=current.number, attempt=current.attempt + 1)
    return FailRun(f"round {current.number} failed {current.attempt} times: {current.error}")


def _open_round(state: RunState, *, number: int, attempt: int) -> Decision:
    needed = state.limits.needed_to_open
    if len(state.online) < needed:
        return _wait_or_fail(state, needed, f"round {number} could not start")
    return OpenRound(number=number, attempt=attempt, silos=state.online)


def _close_if_due(state: RunState, round_: RoundState) -> Decision:
    minimum = state.limits.min_silos
    if state.limits.secure:
        # A secure round closes when its coordinator has the unmasked sum, or has given up.
        outcome = round_.secure_outcome
        if outcome is None:  # every stage has a deadline: the coordinator ends by itself
            return Wait(f"round {round_.number}: secure aggregation in progress")
        if outcome.ok and outcome.contributors >= minimum:
            return CloseRound(round_id=round_.id)
        return FailRound(
            round_id=round_.id,
            reason=outcome.error
            or (
                f"{outcome.contributors} of {round_.selected} selected silos contributed to "
                f"the secure sum; the plan needs at least {minimum}"
            ),
        )
    if round_.received + round_.refused < round_.selected and state.now < round_.deadline:
        return Wait(
            f"round {round_.number}: {round_.received} of {round_.selected} updates received"
        )
    if round_.received >= minimum:
        return CloseRound(round_id=round_.id)
    return FailRound(
        round_id=round_.id,
        reason=(
            f"{round_.received} of {round_.selected} selected silos sent an update by the "
            f"deadline; the plan needs at least {minimum}"
        ),
    )


def _begin_evaluation(state: RunState) -> Decision:
    """Ask the selectable silos to evaluate the final model: the plan's minimum of them, or
    whoever is there once waiting ran out (an exact figure on fewer sites beats none)."""
    online, limits = len(state.online), state.limits
    if online >= limits.min_silos:
        return BeginEvaluation(silos=state.online)
    if state.waiting_since is None:
        return StartWaiting(online=online, needed=limits.min_silos)
    if (state.now - state.waiting_since).total_seconds() <= limits.wait_for_silos_seconds:
        return Wait(
            f"the final evaluation waits: {online} of the minimum {limits.min_silos} silos "
            "are online"
        )
    if online:
        return BeginEvaluation(silos=state.online)
    return CompleteRun(
        note=f"the final model was not evaluated: no silo was online within "
        f"{limits.wait_for_silos_seconds:.0f} s of the last round"
    )


def _finish_evaluation(state: RunState) -> Decision:
    answered = state.evaluation_reported + state.evaluation_refused
    deadline_passed = (
        state.evaluation_deadline is not None and state.now >= state.evaluation_deadline
    )
    if answered < state.evaluation_asked and not deadline_passed:
        return Wait(
            f"final evaluation: {state.evaluation_reported} of {state.evaluation_asked} silos "
            "answered"
        )
    return FinishEvaluation()
