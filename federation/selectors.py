"""Reads of the federation domain."""

from __future__ import annotations

from typing import Any

from django.db.models import Prefetch, QuerySet

from fedcore.protocol import BinaryMessage
from federation.models import (
    ModelVersion,
    PlanVersion,
    Round,
    RoundMetric,
    Run,
    Silo,
    TrainingPlan,
)
from federation.plan_spec import run_settings
from federation.signing import authorization_for
from federation.storage import blob_store


def task_message(*, round_id: int, silo_id: int) -> BinaryMessage | None:
    """The task a selected silo must train on, or None when it owes nothing for this round."""
    round_ = (
        Round.objects.select_related("run__plan__consortium", "run__version")
        .filter(pk=round_id)
        .first()
    )
    if (
        round_ is None
        or round_.status != Round.Status.COLLECTING
        or not round_.selected.filter(pk=silo_id).exists()
        or round_.updates.filter(silo_id=silo_id).exists()
    ):
        return None
    run = round_.run
    model = ModelVersion.objects.get(run=run, number=round_.number - 1)
    return BinaryMessage(
        type="task",
        fields={
            "run": run.pk,
            "round": round_.number,
            "rounds": run.rounds,
            "plan_hash": run.plan_hash,
            "plan": run.version.spec,
            "preprocessing": run.preprocessing,
            "deadline": round_.deadline.timestamp(),
            "authorization": authorization_for(run=run, silo=Silo.objects.get(pk=silo_id)),
        },
        payload=blob_store().get(model.blob_key),
    )


def stats_request_fields(*, run_id: int, silo_id: int) -> dict[str, Any] | None:
    """Fields of a stats_request for a silo that still owes its statistics, else None."""
    run = (
        Run.objects.select_related("plan__consortium", "version")
        .filter(pk=run_id, status=Run.Status.STATS)
        .first()
    )
    if run is None or run.silo_statistics.filter(silo_id=silo_id).exists():
        return None
    silo = run.version.silos.filter(pk=silo_id).first()
    if silo is None:
        return None
    return {
        "run": run.pk,
        "plan_hash": run.plan_hash,
        "plan": run.version.spec,
        "authorization": authorization_for(run=run, silo=silo),
    }


def pending_work(*, silo_id: int) -> list[dict[str, Any]]:
    """Channel events a (re)connecting silo's agent still has to act on: offers, then work."""
    offered = TrainingPlan.objects.filter(
        status__in=(TrainingPlan.Status.SUBMITTED, TrainingPlan.Status.APPROVED),
        current_version__silos__pk=silo_id,
    ).values_list("current_version_id", flat=True)
    events: list[dict[str, Any]] = [
        {"type": "plan.offer", "version_id": version_id} for version_id in offered
    ]
    runs = Run.objects.filter(
        status__in=(Run.Status.STATS, Run.Status.RUNNING), version__silos__pk=silo_id
    ).order_by("pk")
    for run in runs:
        if run.status == Run.Status.STATS:
            events.append({"type": "run.stats_request", "run_id": run.pk})
            continue
        current = run.round_set.order_by("-number", "-attempt").first()
        if current is not None and current.status == Round.Status.COLLECTING:
            events.append({"type": "round.task", "round_id": current.pk})
    return events


def plan_offer_fields(*, version_id: int, silo_id: int) -> dict[str, Any] | None:
    """Fields of a plan_offer telling a silo's agent about a plan version that names it."""
    version = (
        PlanVersion.objects.select_related("plan__consortium")
        .filter(pk=version_id, silos__pk=silo_id)
        .first()
    )
    if version is None:
        return None
    return {
        "plan_hash": version.spec_hash,
        "plan": version.spec,
        "name": version.plan.name,
        "version": version.number,
        "consortium": version.plan.consortium.name,
        "status": version.plan.status,
    }


def run_list() -> QuerySet[Run]:
    """Runs, newest first, with their plan, rounds and round-level metrics."""
    return (
        Run.objects.select_related("plan", "plan__consortium", "version")
        .prefetch_related(
            Prefetch("round_set", queryset=Round.objects.order_by("number", "attempt")),
            Prefetch(
                "round_set__metrics",
                queryset=RoundMetric.objects.filter(silo__isnull=True),
                to_attr="summary_metrics",
            ),
        )
        .order_by("-created_at")
    )


def silo_is_online(silo: Silo) -> bool:
    """Whether the silo's agent is connected (as the orchestrator sees it)."""
    return silo.connection_id is not None


def plan_rounds(run: Run) -> int:
    """How many rounds the run's plan asks for."""
    return run_settings(run.version.spec).rounds
