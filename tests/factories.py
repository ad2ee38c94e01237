"""factory_boy factories for the federation domain."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import factory
from django.utils import timezone

from fedcore import tensors
from fedcore.models import build_model
from fedcore.plan import plan_hash, run_settings
from federation import models, orchestrator
from federation.services.rounds import _signature_json
from federation.storage import blob_store, model_key

SCHEMA = {
    "columns": [
        {"name": "x1", "type": "numeric", "transform": "none", "missing": "impute"},
        {"name": "x2", "type": "numeric", "transform": "none", "missing": "impute"},
        {"name": "x3", "type": "numeric", "transform": "none", "missing": "impute"},
    ],
    "target": {"column": "y", "positive": ["1"]},
    "sensitive": [],
}


def plan_spec(**overrides: Any) -> dict[str, Any]:
    """A small valid plan spec: logistic regression on three numeric columns."""
    spec = {
        "model": {"kind": "logistic_regression"},
        "schema": SCHEMA,
        "training": {
            "rounds": 2,
            "local_epochs": 1,
            "batch_size": 16,
            "optimizer": "adam",
            "lr": 0.05,
        },
        "evaluation": {"test_fraction": 0.2, "seed": 0},
        "aggregation": {"strategy": "fedavg"},
        "min_silos": 1,
        "round_deadline_seconds": 60,
        "seed": 0,
    }
    spec.update(overrides)
    return spec


class ConsortiumFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Consortium

    name = factory.Sequence(lambda n: f"Consortium {n}")


class OrganizationFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Organization

    consortium = factory.SubFactory(ConsortiumFactory)
    name = factory.Sequence(lambda n: f"Hospital {n}")
    kind = models.Organization.Kind.HOSPITAL


class SiloFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Silo

    organization = factory.SubFactory(OrganizationFactory)
    consortium = factory.SelfAttribute("organization.consortium")
    name = factory.Sequence(lambda n: f"silo-{n}")
    schema = SCHEMA
    row_count = 100
    admission = models.Silo.Admission.ADMITTED


def PlanFactory(  # noqa: N802 - reads like the other factories at call sites
    *,
    consortium: models.Consortium | None = None,
    spec: dict[str, Any] | None = None,
    silos: list[models.Silo] | None = None,
    status: str = models.TrainingPlan.Status.APPROVED,
    **fields: Any,
) -> models.TrainingPlan:
    """A plan with one version (status approved by default), shaped by `spec` and `silos`."""
    consortium = consortium or ConsortiumFactory()
    spec = spec or plan_spec()
    plan = models.TrainingPlan.objects.create(
        consortium=consortium,
        name=fields.pop("name", f"Plan {models.TrainingPlan.objects.count() + 1}"),
        status=status,
        **fields,
    )
    version = models.PlanVersion.objects.create(
        plan=plan, number=1, spec=spec, spec_hash=plan_hash(spec)
    )
    version.silos.set(silos or [])
    plan.current_version = version
    plan.save(update_fields=["current_version"])
    return plan


def approve_by_stewards(plan: models.TrainingPlan) -> list[models.Approval]:
    """Record an approval of the current version by a steward of every participating silo's org."""
    from django.contrib.auth import get_user_model

    version = plan.current_version
    approvals = []
    for org in {s.organization for s in version.silos.select_related("organization")}:
        user = get_user_model().objects.create(username=f"steward-{org.pk}-{plan.pk}")
        models.Membership.objects.create(user=user, organization=org, role=models.Role.DATA_STEWARD)
        approvals.append(
            models.Approval.objects.create(
                version=version,
                plan_hash=version.spec_hash,
                user=user,
                organization=org,
                role=models.Role.DATA_STEWARD,
                decision=models.Approval.Decision.APPROVE,
            )
        )
    return approvals


def start_run(plan: models.TrainingPlan, **fields: Any) -> models.Run:
    """A run of the plan's current version, created directly (the state machine's tests)."""
    version = plan.current_version
    defaults = {
        "plan": plan,
        "version": version,
        "plan_hash": version.spec_hash,
        "rounds": run_settings(version.spec).rounds,  # as services.runs.run_start
    }
    return models.Run.objects.create(**{**defaults, **fields})


def running_round(silos: list[models.Silo], *, n_features: int = 3, **spec: Any) -> models.Round:
    """A run in training with round 1 collecting from the given silos, and its model v0 stored."""
    plan = PlanFactory(consortium=silos[0].consortium, spec=plan_spec(**spec), silos=silos)
    run = start_run(
        plan, status=models.Run.Status.RUNNING, preprocessing={}, started_at=timezone.now()
    )
    state = build_model(run.version.spec["model"], n_features, seed=0).state_dict()
    data = tensors.encode_state_dict(state)
    key = model_key(run_id=run.pk, number=0)
    blob_store().put(key, data)
    models.ModelVersion.objects.create(
        run=run,
        number=0,
        checksum=tensors.sha256_hex(data),
        size_bytes=len(data),
        blob_key=key,
        signature=_signature_json(state),
    )
    round_ = models.Round.objects.create(
        run=run, number=1, deadline=timezone.now() + timedelta(seconds=60)
    )
    round_.selected.set(silos)
    return round_


def end_final_evaluation(run: models.Run) -> models.Run:
    """Let a run that is evaluating its final model reach its evaluation deadline and complete
    (with whatever evaluations arrived: none from tests that drive rounds without agents)."""
    models.Run.objects.filter(pk=run.pk, status=models.Run.Status.EVALUATING).update(
        evaluation_deadline=timezone.now() - timedelta(seconds=1)
    )
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    return run
