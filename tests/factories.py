"""factory_boy factories for the federation domain."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import factory
from django.utils import timezone

from fedcore import tensors
from fedcore.models import build_model
from fedcore.plans import plan_hash
from federation import models
from federation.orchestrator import _signature_json
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


class PlanFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.TrainingPlan

    consortium = factory.SubFactory(ConsortiumFactory)
    name = factory.Sequence(lambda n: f"Plan {n}")
    spec = factory.LazyFunction(plan_spec)
    spec_hash = factory.LazyAttribute(lambda o: plan_hash(o.spec))
    status = models.TrainingPlan.Status.APPROVED


def running_round(silos: list[models.Silo], *, n_features: int = 3, **spec: Any) -> models.Round:
    """A run in training with round 1 collecting from the given silos, and its model v0 stored."""
    plan = PlanFactory(consortium=silos[0].consortium, spec=plan_spec(**spec))
    plan.silos.set(silos)
    run = models.Run.objects.create(
        plan=plan,
        plan_hash=plan.spec_hash,
        rounds=plan.spec["training"]["rounds"],
        status=models.Run.Status.RUNNING,
        preprocessing={},
        started_at=timezone.now(),
    )
    state = build_model(plan.spec["model"], n_features, seed=0).state_dict()
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
