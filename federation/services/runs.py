"""Plan and run writes needed to train: creating a plan version and starting a run."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from django.core.exceptions import ValidationError
from django.db import transaction

from fedcore.models import ModelSpecError, validate_model_spec
from fedcore.plans import plan_hash
from fedcore.tabular import DatasetSchema, SchemaError
from federation import dispatch
from federation.models import Consortium, Run, Silo, TrainingPlan
from federation.plan_spec import run_settings


def plan_spec_errors(spec: dict[str, Any]) -> dict[str, str]:
    """Field-level problems of a plan spec (empty when it is valid)."""
    errors: dict[str, str] = {}
    try:
        validate_model_spec(spec.get("model", {}))
    except ModelSpecError as exc:
        errors["model"] = str(exc)
    try:
        DatasetSchema.from_dict(spec.get("schema", {}))
    except (SchemaError, TypeError, KeyError) as exc:
        errors["schema"] = str(exc)
    training = spec.get("training")
    if not isinstance(training, dict):
        errors["training"] = "training must be an object with rounds, local_epochs, batch_size, lr"
    else:
        for key, kind, low in (
            ("rounds", int, 1),
            ("local_epochs", int, 1),
            ("batch_size", int, 1),
        ):
            value = training.get(key)
            if isinstance(value, bool) or not isinstance(value, kind) or value < low:
                errors[f"training.{key}"] = f"must be an integer >= {low}"
        lr = training.get("lr")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < 10:
            errors["training.lr"] = "must be a number in (0, 10)"
        if training.get("optimizer", "adam") not in {"adam", "sgd"}:
            errors["training.optimizer"] = "must be 'adam' or 'sgd'"
    for key in ("min_silos", "round_deadline_seconds"):
        value = spec.get(key, 1)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            errors[key] = "must be a positive number"
    return errors


@transaction.atomic
def plan_create(
    *,
    consortium: Consortium,
    name: str,
    spec: dict[str, Any],
    silos: Iterable[Silo],
    status: str = TrainingPlan.Status.DRAFT,
) -> TrainingPlan:
    """Create version 1 of a plan after validating its spec."""
    errors = plan_spec_errors(spec)
    silos = list(silos)
    if not errors and len(silos) < run_settings(spec).min_silos:
        errors["silos"] = (
            f"{len(silos)} silos take part; the plan needs at least {spec['min_silos']}"
        )
    if errors:
        raise ValidationError(errors)
    plan = TrainingPlan.objects.create(
        consortium=consortium, name=name, spec=spec, spec_hash=plan_hash(spec), status=status
    )
    plan.silos.set(silos)
    return plan


@transaction.atomic
def run_start(*, plan: TrainingPlan) -> Run:
    """Start a run of an approved plan; the orchestrator takes it from there."""
    plan = TrainingPlan.objects.select_for_update().get(pk=plan.pk)
    if plan.status != TrainingPlan.Status.APPROVED:
        raise ValidationError(f"plan {plan} is {plan.status}; only an approved plan can run")
    if plan.spec_hash != plan_hash(plan.spec):
        raise ValidationError(f"plan {plan}: its content no longer matches its hash")
    run = Run.objects.create(
        plan=plan, plan_hash=plan.spec_hash, rounds=run_settings(plan.spec).rounds
    )
    plan.status = TrainingPlan.Status.RUNNING
    plan.save(update_fields=["status"])
    dispatch.enqueue_advance(run.pk)
    return run
