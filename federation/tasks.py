"""Celery tasks: take ids, load, call one orchestrator step (production profile)."""

from __future__ import annotations

from typing import Any

from celery import shared_task

from federation import orchestrator


@shared_task(name="federation.run_advance", acks_late=True)
def run_advance_task(run_id: int) -> None:
    """Move a run forward."""
    orchestrator.run_advance(run_id)


@shared_task(name="federation.sweep")
def sweep_task() -> None:
    """Move every active run forward (deadlines) and forget dead connections."""
    orchestrator.sweep()


TASKS_BY_STEP: dict[str, Any] = {"run_advance": run_advance_task, "sweep": sweep_task}
