"""The final evaluation phase through the services the agent websocket calls, with the agent's
own evaluation code (clientagent.trainer.handle_evaluate) on real site files."""

from __future__ import annotations

import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from django.utils import timezone

from clientagent.data import LocalData
from clientagent.trainer import handle_evaluate
from fedcore import metrics, tabular, tensors, training
from fedcore.evaluation import SCORE_BINS
from fedcore.models import build_model
from fedcore.plan import parse_plan
from federation import orchestrator, selectors
from federation.models import AuditEvent, ModelVersion, RoundMetric, Run, Silo, SiloEvaluation
from federation.reports import model_card, run_fairness
from federation.services.evaluation import evaluation_receive
from federation.services.updates import Refused, stats_receive, update_receive
from federation.storage import blob_store
from tests.factories import (
    SCHEMA,
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    plan_spec,
    start_run,
)

pytestmark = pytest.mark.django_db

SENSITIVE_SCHEMA = {
    **SCHEMA,
    "columns": [
        *SCHEMA["columns"],
        {"name": "sex", "type": "categorical", "categories": ["f", "m"], "missing": "error"},
    ],
    "sensitive": ["sex"],
}


def site_frame(seed: int, n: int = 80) -> pd.DataFrame:
    """Non-IID sites: each its own base rate and feature shift, so cross-site pairs matter."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.6 * seed, size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.8, size=n) > 0.9 * seed).astype(int)
    sex = np.where(rng.random(n) < 0.5, "f", "m")
    return pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y, "sex": sex})


def online(silos: list[Silo]) -> None:
    for s in silos:
        s.connection_id = f"conn-{s.pk}"
        s.last_heartbeat = timezone.now()
        s.save()


def train_to_the_last_round(tmp_path: Path, n_silos: int = 3, **spec: Any):
    """A run through its statistics and both rounds (dense random updates), its sites' files."""
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n_silos, organization__consortium=consortium)
    plan = PlanFactory(consortium=consortium, spec=plan_spec(**spec), silos=silos)
    online(silos)
    run = start_run(plan)
    files = {}
    for i, silo in enumerate(silos):
        files[silo.pk] = tmp_path / f"site{i}.csv"
        site_frame(i).to_csv(files[silo.pk], index=False)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
    for silo in silos:
        split = LocalData(files[silo.pk]).split(run.version.spec)
        stats = tabular.local_statistics(split.train, schema)
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=stats)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    n_features = len(tabular.feature_names(schema, run.preprocessing))
    for rnd in (1, 2):
        for i, silo in enumerate(silos):
            state = build_model({"kind": "logistic_regression"}, n_features, seed=10 * rnd + i)
            update_receive(
                silo_id=silo.pk,
                fields={
                    "run": run.pk,
                    "round": rnd,
                    "nonce": secrets.token_hex(16),
                    "num_examples": 64,
                    "metrics": {"global": {"auc": 0.7, "accuracy": 0.6, "n": 16 + 4 * i}},
                },
                payload=tensors.encode_state_dict(state.state_dict()),
            )
        orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    return run, silos, files


def evaluate_at(run: Run, silo: Silo, files: dict[int, Path]) -> dict[str, Any]:
    """What the silo's agent answers: the server's evaluate message through the agent's code."""
    message = selectors.evaluate_message(run_id=run.pk, silo_id=silo.pk)
    assert message is not None
    return handle_evaluate(message, LocalData(files[silo.pk]))


def pooled_truth(run: Run, files: dict[int, Path]) -> tuple[float, float, float]:
    """The final model's exact AUC and accuracy on the union of the held-out rows, from the raw
    scores, and the example-weighted mean of the per-site AUCs (the old "global AUC")."""
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    plan = parse_plan(run.version.spec)
    ys, ps, aucs = [], [], []
    for path in files.values():
        data = LocalData(path)
        test = data.arrays(data.split(run.version.spec), run.preprocessing).test
        model = build_model(plan.model, int(test.X.shape[1]), seed=0)
        model.load_state_dict(state)
        ys.append(test.y)
        ps.append(training.predict_proba(model, test.X))
        aucs.append((metrics.roc_auc(ys[-1], ps[-1]), len(ys[-1])))
    y, p = np.concatenate(ys), np.concatenate(ps)
    mean = sum(a * n for a, n in aucs) / sum(n for _, n in aucs)
    return metrics.roc_auc(y, p), float(np.mean((p >= 0.5) == (y == 1))), mean


def test_the_last_round_opens_the_evaluation_and_the_run_ends_with_the_final_models_pooled_figures(
    tmp_path: Path,
) -> None:
    run, silos, files = train_to_the_last_round(tmp_path)
    assert run.status == Run.Status.EVALUATING
    asked = SiloEvaluation.objects.filter(run=run)
    assert sorted(asked.values_list("silo_id", flat=True)) == sorted(s.pk for s in silos)
    assert set(asked.values_list("model_version", flat=True)) == {2}
    message = selectors.evaluate_message(run_id=run.pk, silo_id=silos[0].pk)
    assert message.fields["model_version"] == 2
    assert message.fields["authorization"]["payload"]["kind"] == "evaluate"
    assert (
        tensors.sha256_hex(message.payload) == ModelVersion.objects.get(run=run, number=2).checksum
    )

    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)

    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    final = run.evaluation
    exact_auc, exact_accuracy, old_mean = pooled_truth(run, files)
    assert final["model_version"] == 2 and final["missing"] == []
    assert final["metrics"]["bins"] == SCORE_BINS
    assert abs(final["metrics"]["auc"] - exact_auc) <= final["metrics"]["auc_error_bound"] + 1e-12
    assert final["metrics"]["auc_error_bound"] < 0.05  # 48 rows of a barely trained model
    assert final["metrics"]["accuracy"] == pytest.approx(exact_accuracy, abs=1e-12)
    assert abs(old_mean - exact_auc) > final["metrics"]["auc_error_bound"]  # the mean is not it
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    assert card["model"]["final"] is True
    assert card["metrics"]["evaluation"]["auc"] == final["metrics"]["auc"]
    assert "union of the silos' held-out rows" in card["metrics"]["evaluation_note"]
    finished = AuditEvent.objects.get(action="run.finished", object_id=str(run.pk))
    assert finished.data["final_model"]["auc"] == final["metrics"]["auc"]


def test_the_per_round_summary_reports_no_count_as_a_metric(tmp_path: Path) -> None:
    run, _, _ = train_to_the_last_round(tmp_path)
    summary = RoundMetric.objects.filter(round__run=run, silo__isnull=True)
    assert summary.filter(scope="global", name="auc").exists()
    assert not summary.filter(name="n").exists()  # was global/n = the mean evaluation size


def test_a_silo_that_vanishes_is_left_out_at_the_deadline(tmp_path: Path) -> None:
    run, silos, files = train_to_the_last_round(tmp_path)
    for silo in silos[:2]:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.EVALUATING  # waits for the third until the deadline

    Run.objects.filter(pk=run.pk).update(evaluation_deadline=timezone.now() - timedelta(seconds=1))
    orchestrator.run_advance(run.pk)

    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    assert run.evaluation["missing"] == [silos[2].name]
    assert run.evaluation["note"].startswith("evaluated by 2 of 3 silos asked")
    assert sorted(run.evaluation["by_silo"]) == sorted(s.name for s in silos[:2])


def test_a_bad_histogram_is_refused_with_its_reason_and_the_phase_goes_on(tmp_path: Path) -> None:
    run, silos, files = train_to_the_last_round(tmp_path, n_silos=2)
    good = evaluate_at(run, silos[0], files)
    bad = {**good, "evaluation": {**good["evaluation"], "positives": [1] * 10}}

    with pytest.raises(Refused) as caught:
        evaluation_receive(silo_id=silos[0].pk, fields=bad)
    assert caught.value.code == "invalid_update"
    assert "positives must be a list of 2000 counts, got 10" in caught.value.reason
    assert SiloEvaluation.objects.get(run=run, silo=silos[0]).report is None
    refused = AuditEvent.objects.get(action="evaluation.refused")
    assert refused.data["code"] == "invalid_update"

    with pytest.raises(Refused, match="wrong_round: evaluation of model v1 refused"):
        evaluation_receive(silo_id=silos[0].pk, fields={**good, "model_version": 1})
    evaluation_receive(silo_id=silos[0].pk, fields=good)  # the same silo, a good report
    with pytest.raises(Refused, match="duplicate_update"):
        evaluation_receive(silo_id=silos[0].pk, fields=good)
    evaluation_receive(silo_id=silos[1].pk, fields=evaluate_at(run, silos[1], files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED and run.evaluation["missing"] == []


def test_a_silo_not_asked_cannot_report_and_nothing_is_accepted_after_the_run(
    tmp_path: Path,
) -> None:
    run, silos, files = train_to_the_last_round(tmp_path, n_silos=2)
    report = evaluate_at(run, silos[0], files)
    SiloEvaluation.objects.filter(run=run, silo=silos[1]).delete()
    with pytest.raises(Refused, match="not_selected"):
        evaluation_receive(silo_id=silos[1].pk, fields=report)
    evaluation_receive(silo_id=silos[0].pk, fields=report)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    with pytest.raises(Refused, match="wrong_run: run .* is not evaluating"):
        evaluation_receive(silo_id=silos[0].pk, fields=report)


def test_the_final_fairness_report_is_the_final_models(tmp_path: Path) -> None:
    run, silos, files = train_to_the_last_round(
        tmp_path,
        schema=SENSITIVE_SCHEMA,
        fairness={"sensitive_attribute": "sex", "max_demographic_parity_difference": 0.01},
    )
    for silo in silos:
        report = evaluate_at(run, silo, files)
        assert set(report["fairness"]) == {"sex"}
        evaluation_receive(silo_id=silo.pk, fields=report)
    orchestrator.run_advance(run.pk)

    run.refresh_from_db()
    fairness = run_fairness(run)
    assert fairness["latest"]["final"] is True
    assert fairness["latest"]["model_version"] == 2
    overall = fairness["latest"]["attributes"]["sex"]["report"]["overall"]
    assert overall["count"] == run.evaluation["metrics"]["n"]
    assert overall["accuracy"] == pytest.approx(run.evaluation["metrics"]["accuracy"])
    assert any(f["model_version"] == 2 for f in fairness["flags"])  # audited too:
    assert AuditEvent.objects.filter(action="fairness.flag", data__model_version=2).exists()


def test_a_secure_plans_counts_never_travel_in_an_evaluation(tmp_path: Path) -> None:
    run, silos, files = train_to_the_last_round(
        tmp_path, n_silos=2, schema=SENSITIVE_SCHEMA, fairness={"sensitive_attribute": "sex"}
    )
    report = evaluate_at(run, silos[0], files)
    spec = {**run.version.spec, "secure_aggregation": True}
    type(run.version).objects.filter(pk=run.version.pk).update(spec=spec)
    with pytest.raises(Refused, match="without fairness.dp_epsilon: its group counts only travel"):
        evaluation_receive(silo_id=silos[0].pk, fields=report)
