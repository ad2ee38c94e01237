"""Celery tasks: take ids, run one named step (production profile).

Each task runs a step of the registry that ``federation.apps`` fills at start-up
(``federation.dispatch.run_step``), and is registered there as that step's task, so
``dispatch.CeleryBackend`` sends it without importing this module. The tasks hold no state between
calls: every step re-reads the database, so any worker may run any step, twice or late.
"""

from __future__ import annotations

from celery import shared_task
from django.db import InterfaceError, OperationalError

from federation import dispatch

# A lost database connection or a deadlock is worth another try; anything else is logged by Celery
# and left to the next sweep.
_TRANSIENT = (OperationalError, InterfaceError)


@shared_task(
    name="federation.run_advance",
    acks_late=True,  # a worker that dies mid-step leaves the message to be delivered again
    reject_on_worker_lost=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=5,
    ignore_result=True,
)
def run_advance_task(run_id: int) -> None:
    """Move a run forward (and aggregate a round that is due: idempotent)."""
    dispatch.run_step(dispatch.RUN_ADVANCE, run_id)


@shared_task(name="federation.sweep", acks_late=False, ignore_result=True)
def sweep_task() -> None:
    """Move every active run forward (deadlines) and forget dead connections.

    Not acked late: beat sends another one within QUORUM_SWEEP_SECONDS.
    """
    dispatch.run_step(dispatch.SWEEP)


@shared_task(
    name="federation.secagg_tick",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=_TRANSIENT,
    retry_backoff=1,
    retry_backoff_max=30,
    max_retries=5,
    ignore_result=True,
)
def secagg_tick_task(round_pk: int, stage: str) -> None:
    """Close a secure round's stage whose deadline passed (the state is in the database)."""
    dispatch.run_step(dispatch.SECAGG_TICK, round_pk, stage)


# Step name -> its Celery task; federation.apps registers them with the steps' functions.
TASKS_BY_STEP = {
    dispatch.RUN_ADVANCE: run_advance_task,
    dispatch.SWEEP: sweep_task,
    dispatch.SECAGG_TICK: secagg_tick_task,
}
