"""Run writes: starting a run from an approved plan version, stopping it."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.utils import timezone

from fedcore.plan import plan_errors, plan_hash, run_settings
from federation import dispatch, governance, permissions
from federation.fairness_outcome import unavailable_mitigation_error
from federation.models import Run, TrainingPlan
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict


@transaction.atomic
def run_start(*, actor: Any, plan: TrainingPlan) -> Run:
    """Start a run of an approved plan; the orchestrator takes it from there.

    Only an approved plan whose current version's approvals satisfy the consortium's rules (every
    participating silo's steward, the organisation quorum) can run; the run is bound to that
    version's hash, and every agent gets a grant signed for exactly that hash.
    """
    plan = (  # of=self: PostgreSQL cannot lock the nullable side of the outer join
        TrainingPlan.objects.select_for_update(of=("self",))
        .select_related("current_version")
        .get(pk=plan.pk)
    )
    roles = permissions.require_roles(
        actor, plan.consortium_id, permissions.CAN_START_RUNS, "starting a run"
    )
    if permissions.Role.CONSORTIUM_ADMIN not in roles and plan.proposed_by_id != actor.pk:
        raise PermissionDenied("only the plan's proposer or a consortium admin can start its run")
    version = plan.current_version
    if plan.status != TrainingPlan.Status.APPROVED or version is None:
        raise Conflict(f"plan '{plan.name}' is {plan.status}; only an approved plan can run")
    if version.spec_hash != plan_hash(version.spec):
        raise Conflict(
            f"plan '{plan.name}' v{version.number}: its content no longer matches its hash"
        )
    # Approved under another server version's rules: refused here as at proposal, never run
    # to have every site refuse it or, for a mitigation, run as if unmitigated.
    refused = plan_errors(version.spec)
    if refused:
        problems = "; ".join(f"spec.{key}: {message}" for key, message in refused.items())
        raise Conflict(
            f"plan '{plan.name}' v{version.number} is refused by this server version's plan "
            f"language: {problems}; propose a new version"
        )
    unavailable = unavailable_mitigation_error(version.spec)
    if unavailable:
        raise Conflict(
            f"plan '{plan.name}' v{version.number}: fairness.mitigation.kind {unavailable}"
        )
    state = governance.approval_state(version)
    if not state.satisfied:
        missing = ", ".join(state.stewards_missing) or "none"
        raise Conflict(
            f"plan '{plan.name}' v{version.number} lacks approvals: stewards missing for "
            f"silos [{missing}], organisations: {state.parts[-1].progress}"
            + (f", rejected by {', '.join(state.rejected_by)}" if state.rejected_by else "")
        )
    run = Run.objects.create(
        plan=plan,
        version=version,
        plan_hash=version.spec_hash,
        rounds=run_settings(version.spec).rounds,
        started_by=actor,
    )
    plan.status = TrainingPlan.Status.RUNNING
    plan.updated_at = timezone.now()
    plan.save(update_fields=["status", "updated_at"])
    audit_append(
        actor=actor_label(actor),
        action="run.started",
        consortium_id=plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data={"plan": plan.pk, "version": version.number, "plan_hash": version.spec_hash},
    )
    dispatch.enqueue_advance(run.pk)
    return run


@transaction.atomic
def run_stop(*, actor: Any, run: Run) -> Run:
    """Stop an active run: no further round opens; agents are told the run is over."""
    run = Run.objects.select_for_update().select_related("plan").get(pk=run.pk)
    roles = permissions.require_roles(
        actor, run.plan.consortium_id, permissions.CAN_START_RUNS, "stopping a run"
    )
    if permissions.Role.CONSORTIUM_ADMIN not in roles and run.plan.proposed_by_id != actor.pk:
        raise PermissionDenied("only the plan's proposer or a consortium admin can stop its run")
    if not run.active:
        raise Conflict(f"run {run.pk} is already {run.status}")
    run.status = Run.Status.STOPPED
    run.finished_at = timezone.now()
    run.error = f"stopped by {actor.get_username()}"
    run.save(update_fields=["status", "finished_at", "error"])
    TrainingPlan.objects.filter(pk=run.plan_id).update(status=TrainingPlan.Status.STOPPED)
    audit_append(
        actor=actor_label(actor),
        action="run.stopped",
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
    )
    for silo_id in run.version.silos.values_list("pk", flat=True):
        dispatch.send_to_silo(
            silo_id, {"type": "run.finished", "run_id": run.pk, "status": run.status}
        )
    return run
