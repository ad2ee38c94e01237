"""Celery tasks: take ids, load, call one orchestrator step (production profile).

Each task is one orchestrator function; ``federation.dispatch.CeleryBackend`` finds the task of a
step in ``TASKS_BY_STEP`` by the function's qualified name. The tasks hold no state between
calls: every step re-reads the database, so any worker may run any step, twice or late.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import shared_task
from django.db import InterfaceError, OperationalError

from federation import orchestrator, secagg_rounds

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
    orchestrator.run_advance(run_id)


@shared_task(name="federation.sweep", acks_late=False, ignore_result=True)
def sweep_task() -> None:
    """Move every active run forward (deadlines) and forget dead connections.

    Not acked late: beat sends another one within QUORUM_SWEEP_SECONDS.
    """
    orchestrator.sweep()


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
    secagg_rounds.tick(round_pk, stage)


def step_name(fn: Callable[..., Any]) -> str:
    """The key of an orchestrator function in TASKS_BY_STEP: ``module.qualname``."""
    return f"{fn.__module__}.{fn.__qualname__}"


TASKS_BY_STEP: dict[str, Any] = {
    step_name(orchestrator.run_advance): run_advance_task,
    step_name(orchestrator.sweep): sweep_task,
    step_name(secagg_rounds.tick): secagg_tick_task,
}


def task_for(fn: Callable[..., Any]) -> Any:
    """The Celery task that runs orchestrator step ``fn``; LookupError names an unknown step."""
    try:
        return TASKS_BY_STEP[step_name(fn)]
    except KeyError:
        raise LookupError(
            f"{step_name(fn)} has no Celery task: only {sorted(TASKS_BY_STEP)} can run in the "
            "production profile"
        ) from None
