"""Reweighing through a whole run: the agent's own code answers the statistics request (with
its training rows' (group, label) counts), trains every round on the tasks the server builds
(carrying the Kamiran-Calders weights under the signed grant) and evaluates the final model;
the server's services and orchestrator in between. On a skewed fixture the final model's
demographic parity difference drops against the same run without mitigation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from django.utils import timezone

from clientagent.data import LocalData
from clientagent.trainer import handle_stats_request, handle_task
from fedcore import fairness_mitigation, signing, tensors
from federation import orchestrator, selectors
from federation.models import AuditEvent, ModelVersion, Round, Run, Silo
from federation.reports import model_card
from federation.services.evaluation import evaluation_receive
from federation.services.updates import Refused, stats_receive, update_receive
from tests.factories import (
    SCHEMA,
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    plan_spec,
    start_run,
)
from tests.integration.test_final_evaluation import evaluate_at

pytestmark = pytest.mark.django_db

SKEWED_SCHEMA = {
    **SCHEMA,
    "columns": [
        *SCHEMA["columns"],
        {"name": "sex", "type": "categorical", "categories": ["f", "m"], "missing": "error"},
    ],
    "sensitive": ["sex"],
}


def skewed_site(seed: int, n: int = 400) -> pd.DataFrame:
    """Men have far more positive labels, and x2 is a proxy of sex: an unmitigated model
    selects men much more often."""
    rng = np.random.default_rng(seed)
    male = rng.random(n) < 0.5
    x1 = rng.normal(size=n)
    x2 = rng.normal(loc=np.where(male, 1.0, -1.0), scale=0.7)
    x3 = rng.normal(size=n)
    y = (x1 + 1.6 * male + rng.normal(scale=0.8, size=n) > 0.9).astype(int)
    return pd.DataFrame({"x1": x1, "x2": x2, "x3": x3, "y": y, "sex": np.where(male, "m", "f")})


def online(silos: list[Silo]) -> None:
    for s in silos:
        s.connection_id = f"conn-{s.pk}"
        s.last_heartbeat = timezone.now()
        s.save()


def run_with(
    tmp_path: Path,
    kind: str,
    mitigation: dict[str, Any] | None = None,
    rounds: int = 4,
    dp_epsilon: float | None = None,
) -> Run:
    """A whole run of 2 silos and ``rounds`` rounds, the agent's code at every step
    (``mitigation``: the plan's parameters of the kind beyond ``kind``; ``dp_epsilon``: the
    plan's fairness.dp_epsilon)."""
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(2, organization__consortium=consortium, schema=SKEWED_SCHEMA)
    fairness: dict[str, Any] = {
        "sensitive_attribute": "sex",
        "max_demographic_parity_difference": 0.1,
    }
    if kind != "none":
        fairness["mitigation"] = {"kind": kind, **(mitigation or {})}
    if dp_epsilon is not None:
        fairness["dp_epsilon"] = dp_epsilon
    training = {**plan_spec()["training"], "rounds": rounds, "local_epochs": 2}
    spec = plan_spec(schema=SKEWED_SCHEMA, fairness=fairness, training=training)
    plan = PlanFactory(consortium=consortium, spec=spec, silos=silos)
    online(silos)
    run = start_run(plan)
    files = {}
    for i, silo in enumerate(silos):
        files[silo.pk] = tmp_path / f"{kind}-site{i}.csv"
        skewed_site(i).to_csv(files[silo.pk], index=False)
    orchestrator.run_advance(run.pk)
    for silo in silos:
        fields = selectors.stats_request_fields(run_id=run.pk, silo_id=silo.pk)
        reply = handle_stats_request(fields, LocalData(files[silo.pk]))
        assert ("label_counts" in reply) == (kind in ("reweighing", "constraint"))
        stats_receive(
            silo_id=silo.pk,
            run_id=run.pk,
            stats=reply["stats"],
            label_counts=reply.get("label_counts"),
        )
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING, run.error
    for number in range(1, rounds + 1):
        round_ = Round.objects.get(run=run, number=number)
        for silo in silos:
            task = selectors.task_message(round_id=round_.pk, silo_id=silo.pk)
            grant = task.fields["authorization"]["payload"]
            signing.check_request_scope(  # what the agent's policy checks before training
                grant,
                kind=signing.TASK_KIND,
                plan_rounds=rounds,
                round=number,
                rounds=task.fields["rounds"],
                weights_sha256=tensors.sha256_hex(task.payload),
                preprocessing=task.fields["preprocessing"],
                example_weights=task.fields.get("example_weights"),
            )
            update = handle_task(task, LocalData(files[silo.pk]))
            update_receive(silo_id=silo.pk, fields=update.fields, payload=update.payload)
        orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED, run.error
    return run


def final_dpd(run: Run) -> float:
    return run.evaluation["fairness"]["attributes"]["sex"]["report"][
        "demographic_parity_difference"
    ]


def test_reweighing_lowers_the_final_models_demographic_parity_difference(
    tmp_path: Path,
) -> None:
    plain = run_with(tmp_path, "none")
    reweighed = run_with(tmp_path, "reweighing")

    # The weights are Kamiran-Calders' of the summed counts of both sites' training rows.
    counts = reweighed.mitigation["counts"]
    assert reweighed.mitigation["example_weights"] == (
        fairness_mitigation.reweighing_weights(counts).to_json()
    )
    assert sum(sum(c.values()) for c in counts.values()) == sum(
        s.stats["n_rows"] for s in reweighed.silo_statistics.all()
    )
    assert AuditEvent.objects.filter(
        action="mitigation.computed", object_id=str(reweighed.pk)
    ).exists()
    assert plain.mitigation is None
    card = model_card(ModelVersion.objects.get(run=reweighed, number=4))
    assert card["fairness"]["mitigation"]["kind"] == "reweighing"
    assert card["fairness"]["mitigation"]["applied"] is True
    assert card["fairness"]["mitigation"]["computed"] == reweighed.mitigation
    before, after = final_dpd(plain), final_dpd(reweighed)
    print(f"final demographic parity difference: none {before:.4f}, reweighing {after:.4f}")
    assert after < before - 0.05


def test_counts_a_reweighing_plan_needs_are_checked_and_refused_with_the_reason(
    tmp_path: Path,
) -> None:
    consortium = ConsortiumFactory()
    silo = SiloFactory(organization__consortium=consortium, schema=SKEWED_SCHEMA)
    fairness = {"sensitive_attribute": "sex", "mitigation": {"kind": "reweighing"}}
    plan = PlanFactory(
        consortium=consortium,
        spec=plan_spec(schema=SKEWED_SCHEMA, fairness=fairness),
        silos=[silo],
    )
    online([silo])
    run = start_run(plan)
    orchestrator.run_advance(run.pk)
    path = tmp_path / "site.csv"
    skewed_site(0).to_csv(path, index=False)
    fields = selectors.stats_request_fields(run_id=run.pk, silo_id=silo.pk)
    reply = handle_stats_request(fields, LocalData(path))

    with pytest.raises(Refused, match="no label_counts came with the statistics"):
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=reply["stats"])
    forged = {**reply["label_counts"], "<script>": {"negatives": 1, "positives": 0}}
    with pytest.raises(Refused, match="did not release"):
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=reply["stats"], label_counts=forged)
    assert AuditEvent.objects.filter(action="stats.refused").count() == 2
    # Every row in one group: 'm' has no row at any site, so the weights cannot be computed;
    # the run ends before round 1 with the reason (never trains unmitigated).
    only_f = {"f": {"negatives": reply["stats"]["n_rows"], "positives": 0}}
    stats_receive(silo_id=silo.pk, run_id=run.pk, stats=reply["stats"], label_counts=only_f)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error.startswith("the plan's bias mitigation could not be computed: ")
    assert "group 'm' has no rows at any site" in run.error
    assert not Round.objects.filter(run=run).exists()
