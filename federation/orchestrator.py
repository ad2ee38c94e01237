"""The orchestrator's entry points: the steps dispatch runs (``run.advance``, ``sweep``).

The state machine itself is split in two: ``federation.roundplan`` decides the next transition
from a snapshot of the run (pure, no database), ``federation.services.rounds`` loads that
snapshot in the run's transaction, applies the decision, and aggregates rounds. This module
only repeats the step until the run waits, and sweeps every active run.
"""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings

from federation import roundplan, selectors
from federation.services import rounds as round_services
from federation.services import silos as silo_services

# Bounded: each pass either makes progress or stops (fail a round, open its retry, aggregate,
# open the next round: a handful of passes).
MAX_PASSES = 8


def sweep() -> None:
    """Move every active run forward and forget connections whose heartbeats stopped."""
    silo_services.silo_connections_forget_stale(
        older_than=timedelta(seconds=3 * settings.QUORUM_SILO_OFFLINE_AFTER)
    )
    for run_id in selectors.active_run_ids():
        run_advance(run_id)


def run_advance(run_id: int) -> None:
    """Move a run forward as far as it can go now."""
    for _ in range(MAX_PASSES):
        decision = round_services.run_step(run_id=run_id)
        if decision is None or not decision.again:
            return
        if isinstance(decision, roundplan.CloseRound | roundplan.Aggregate):
            round_services.round_aggregate(decision.round_id)
