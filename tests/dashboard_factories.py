"""Data for the dashboard's tests: a governed consortium with a plan that went through the real
governance services, and a finished run with rounds, metrics, updates and stored models."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.utils import timezone

from fedcore import tensors
from fedcore.models import build_model
from federation import models
from federation.services.audit import audit_append
from federation.services.plans import plan_approve, plan_propose
from federation.services.rounds import _signature_json
from federation.services.runs import run_start
from federation.storage import blob_store, model_key
from tests.factories import plan_spec
from tests.governance_factories import Governed, governed_consortium


def propose(gov: Governed, *, name: str = "Readmission risk", submit: bool = True, **spec: Any):
    """A plan proposed by the first data scientist over every silo of the consortium."""
    return plan_propose(
        actor=gov.scientists[0],
        consortium=gov.consortium,
        name=name,
        description="Predict 30-day readmission.",
        spec=plan_spec(**spec),
        silos=gov.silos,
        submit=submit,
    )


def approve_all(gov: Governed, plan: models.TrainingPlan) -> models.TrainingPlan:
    """Every organisation's steward approves the current version (the plan becomes approved)."""
    for steward in gov.stewards:
        plan.refresh_from_db()
        plan_approve(actor=steward, plan=plan, plan_hash=plan.current_version.spec_hash)
    plan.refresh_from_db()
    return plan


def store_model(run: models.Run, number: int, round_: models.Round | None) -> models.ModelVersion:
    """Model v`number` of the run: the plan's model, stored in the blob store."""
    state = build_model(run.version.spec["model"], 3, seed=number).state_dict()
    data = tensors.encode_state_dict(state)
    key = model_key(run_id=run.pk, number=number)
    blob_store().put(key, data)
    return models.ModelVersion.objects.create(
        run=run,
        number=number,
        round=round_,
        checksum=tensors.sha256_hex(data),
        size_bytes=len(data),
        blob_key=key,
        signature=_signature_json(state),
    )


def fitted_preprocessing(schema: dict[str, Any]) -> dict[str, Any]:
    """The merged statistics of 20 rows with numeric x1..x3 (the run's fitted preprocessing)."""
    import numpy as np
    import pandas as pd

    from fedcore import tabular

    parsed = tabular.DatasetSchema.from_dict(schema)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(20, 3)), columns=["x1", "x2", "x3"]).astype(str)
    frame["y"] = "1"
    for name in schema.get("sensitive") or []:
        frame[name] = "F"
    return tabular.merge_statistics([tabular.local_statistics(frame, parsed)], parsed)


def add_round(run: models.Run, number: int, *, answered: int | None = None) -> models.Round:
    """A completed round in which the first `answered` selected silos sent an update, with
    per-silo and summary metrics and the model version it produced."""
    silos = list(run.version.silos.order_by("name"))
    answered = len(silos) if answered is None else answered
    start = timezone.now() - timedelta(minutes=30 - number)
    round_ = models.Round.objects.create(
        run=run,
        number=number,
        status=models.Round.Status.COMPLETED,
        started_at=start,
        deadline=start + timedelta(seconds=60),
        finished_at=start + timedelta(seconds=2 + number),
    )
    round_.selected.set(silos)
    for i, silo in enumerate(silos[:answered]):
        models.Update.objects.create(
            round=round_,
            silo=silo,
            num_examples=80 + i,
            nonce=secrets.token_hex(8),
            sha256="0" * 64,
            size_bytes=100,
            blob_key=f"runs/{run.pk}/rounds/{number}-1/silo-{silo.pk}.safetensors",
        )
        for scope, auc in (("global", 0.6 + 0.05 * number), ("local", 0.7 + 0.05 * number)):
            models.RoundMetric.objects.create(
                round=round_, silo=silo, scope=scope, name="auc", value=auc + 0.01 * i
            )
    for scope, name, value in (
        ("global", "auc", 0.6 + 0.05 * number),
        ("global", "accuracy", 0.7 + 0.02 * number),
        ("global", "loss", 0.7 - 0.1 * number),
        ("local", "auc", 0.7 + 0.05 * number),
        ("train", "train_loss", 0.5 - 0.1 * number),
    ):
        models.RoundMetric.objects.create(
            round=round_, silo=None, scope=scope, name=name, value=value
        )
    store_model(run, number, round_)
    audit_append(
        actor="system",
        action="round.completed",
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data={"round": number, "updates": answered},
    )
    return round_


def finished_run(gov: Governed, *, rounds: int = 2, **spec: Any) -> models.Run:
    """A run of an approved plan (plan_spec with `spec` overrides), started through the
    service, that completed `rounds` rounds."""
    plan = approve_all(
        gov, propose(gov, training={**plan_spec()["training"], "rounds": rounds}, **spec)
    )
    run = run_start(actor=gov.scientists[0], plan=plan)
    now = timezone.now()
    models.Run.objects.filter(pk=run.pk).update(
        status=models.Run.Status.RUNNING, started_at=now - timedelta(minutes=31), preprocessing={}
    )
    run.refresh_from_db()
    store_model(run, 0, None)
    for number in range(1, rounds + 1):
        add_round(run, number)
    models.Run.objects.filter(pk=run.pk).update(status=models.Run.Status.COMPLETED, finished_at=now)
    models.TrainingPlan.objects.filter(pk=plan.pk).update(
        status=models.TrainingPlan.Status.COMPLETED
    )
    audit_append(
        actor="system",
        action="run.finished",
        consortium_id=gov.consortium.pk,
        object_type="run",
        object_id=run.pk,
        data={"status": "completed"},
    )
    run.refresh_from_db()
    return run


@dataclass
class World:
    """A consortium with a submitted plan and a finished run, and an unrelated consortium."""

    gov: Governed
    other: Governed
    run: models.Run
    submitted: models.TrainingPlan

    def user(self, role: str) -> Any:
        """A user by role name; "outsider" is a steward of the other consortium."""
        return {
            "admin": self.gov.admin,
            "steward": self.gov.stewards[0],
            "scientist": self.gov.scientists[0],
            "auditor": self.gov.auditors[0],
            "org_admin": self.gov.org_admins[0],
            "outsider": self.other.stewards[0],
        }[role]


def build_world() -> World:
    """The data every page test reads."""
    gov = governed_consortium(3)
    run = finished_run(gov)
    submitted = propose(gov, name="Sepsis early warning")
    other = governed_consortium(2)
    return World(gov=gov, other=other, run=run, submitted=submitted)
