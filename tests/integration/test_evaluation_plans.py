"""Evaluation plans end to end through the services: proposed (and refused with the reason when
the model version does not fit), approved by every steward, started, each site's answer built by
the agent's own code (clientagent.trainer.handle_evaluate) on real site files, pooled."""

from __future__ import annotations

import json
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from sklearn.metrics import roc_auc_score

from clientagent.data import LocalData
from fedcore import calibration, evaluation, tabular, tensors, training
from fedcore.models import build_model
from federation import orchestrator, selectors
from federation.models import (
    AuditEvent,
    ModelVersion,
    PrivacyLedgerEntry,
    Run,
    Silo,
    TrainingPlan,
)
from federation.services.evaluation import evaluation_receive
from federation.services.plans import plan_approve, plan_propose
from federation.services.runs import run_start
from federation.services.updates import stats_receive, update_receive
from federation.storage import blob_store
from tests.api_factories import client_for as api_client
from tests.factories import SCHEMA, PlanFactory, plan_spec, start_run
from tests.governance_factories import Governed, governed_consortium
from tests.integration.test_final_evaluation import (
    SENSITIVE_SCHEMA,
    evaluate_at,
    online,
    site_frame,
)

pytestmark = pytest.mark.django_db


def completed_run(g: Governed, tmp_path: Path, **spec: Any) -> tuple[Run, dict[int, Path]]:
    """A training run of the consortium through statistics, two rounds and its final
    evaluation (the agents' answers built by their own code), and its sites' files."""
    silos = g.silos
    plan = PlanFactory(consortium=g.consortium, spec=plan_spec(**spec), silos=silos)
    online(silos)
    run = start_run(plan)
    files = {}
    for i, silo in enumerate(silos):
        files[silo.pk] = tmp_path / f"site{i}.csv"
        site_frame(i).to_csv(files[silo.pk], index=False)
    orchestrator.run_advance(run.pk)
    schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
    for silo in silos:
        split = LocalData(files[silo.pk]).split(run.version.spec)
        stats_receive(
            silo_id=silo.pk, run_id=run.pk, stats=tabular.local_statistics(split.train, schema)
        )
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
                    "metrics": {"global": {"auc": 0.7, "accuracy": 0.6, "n": 16}},
                },
                payload=tensors.encode_state_dict(state.state_dict()),
            )
        orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    return run, files


def evaluation_spec(run: Run, **overrides: Any) -> dict[str, Any]:
    version = ModelVersion.objects.get(run=run, number=2)
    spec = {
        "kind": "evaluation",
        "schema": SCHEMA,
        "model": {"kind": "logistic_regression"},
        "model_version": {"run": run.pk, "number": 2, "sha256": version.checksum},
        "evaluation": {"test_fraction": 0.2, "seed": 0},
    }
    return {**spec, **overrides}


def propose(g: Governed, spec: dict[str, Any]) -> TrainingPlan:
    return plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="Evaluate the sepsis model",
        description="",
        spec=spec,
        silos=g.silos,
    )


def approved(g: Governed, spec: dict[str, Any]) -> TrainingPlan:
    plan = propose(g, spec)
    for steward in g.stewards:
        plan_approve(actor=steward, plan=plan, plan_hash=plan.current_version.spec_hash)
    plan.refresh_from_db()
    assert plan.status == TrainingPlan.Status.APPROVED
    return plan


def pooled_rows(run: Run, files: dict[int, Path], *, every_row: bool) -> tuple[Any, Any]:
    """The labels and the model's scores on the union of the rows evaluated, computed directly."""
    final = ModelVersion.objects.get(run=run, number=0)
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    ys, ps = [], []
    for path in files.values():
        data = LocalData(path)
        arrays = data.arrays(data.split(plan_spec()), run.preprocessing)
        rows = arrays.test
        if every_row:
            rows = tabular.transform(data.load(), arrays_schema(), run.preprocessing)
        model = build_model({"kind": "logistic_regression"}, int(rows.X.shape[1]), seed=0)
        model.load_state_dict(state)
        ys.append(rows.y)
        ps.append(training.predict_proba(model, rows.X))
    return np.concatenate(ys).astype(np.float64), np.concatenate(ps).astype(np.float64)


def arrays_schema() -> tabular.DatasetSchema:
    return tabular.DatasetSchema.from_dict(SCHEMA)


def run_evaluation_plan(g: Governed, spec: dict[str, Any], files: dict[int, Path]) -> Run:
    plan = approved(g, spec)
    run = run_start(actor=g.scientists[0], plan=plan)
    online(g.silos)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.EVALUATING
    assert not run.round_set.exists()  # no training, no round
    for silo in g.silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    return run


def test_an_evaluation_plan_evaluates_the_version_on_every_site_and_pools_exactly(
    tmp_path: Path,
) -> None:
    g = governed_consortium(3)
    source, files = completed_run(g, tmp_path)
    version = ModelVersion.objects.get(run=source, number=2)

    run = run_evaluation_plan(g, evaluation_spec(source), files)

    assert run.status == Run.Status.COMPLETED
    copy = ModelVersion.objects.get(run=run, number=0)
    assert copy.checksum == version.checksum and copy.blob_key != version.blob_key
    assert run.preprocessing == source.preprocessing
    result = run.evaluation
    assert result["source"] == {"run": source.pk, "model_version": 2, "sha256": version.checksum}
    assert result["rows"] == "held_out" and "test_fraction 0.2" in result["rows_note"]
    assert sorted(result["evaluated"]) == sorted(s.name for s in g.silos)
    # The held-out rows are the source run's: its final evaluation pooled the same figures.
    assert result["metrics"] == source.evaluation["metrics"]

    y, p = pooled_rows(run, files, every_row=False)
    metrics = result["metrics"]
    assert metrics["n"] == len(y) == 48
    assert abs(metrics["auc"] - roc_auc_score(y, p)) <= metrics["auc_error_bound"]
    # ... and exactly sklearn's AUC of the scores rounded to their bins (ties count one half).
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, evaluation.score_bins(p)), abs=1e-12)

    curve = result["calibration"]
    index = calibration.calibration_bins(p)
    for row in curve["rows"]:
        inside = index == row["bin"]
        assert row["count"] == int(inside.sum())
        assert row["positives"] == int(y[inside].sum())
        if row["count"]:
            assert row["mean_predicted"] == pytest.approx(float(p[inside].mean()), abs=1e-12)
            assert row["observed_rate"] == pytest.approx(float(y[inside].mean()), abs=1e-12)
    ece = sum(
        inside.sum() / len(y) * abs(p[inside].mean() - y[inside].mean())
        for inside in (index == b for b in range(calibration.CALIBRATION_BINS))
        if inside.any()
    )
    assert curve["expected_calibration_error"] == pytest.approx(ece, abs=1e-12)
    actions = list(
        AuditEvent.objects.filter(object_type="run", object_id=run.pk).values_list(
            "action", flat=True
        )
    )
    for action in ("run.started", "run.evaluation_plan_started", "evaluation.received"):
        assert action in actions
    assert actions[-1] == "run.finished"

    # The run page draws the curve (offline Plotly) with its table; the API carries it.
    browser = Client()
    browser.force_login(g.scientists[0])
    html = browser.get(f"/runs/{run.pk}/").content.decode()
    assert 'id="chart-calibration"' in html and 'id="table-calibration"' in html
    assert 'id="chart-loss"' not in html  # no training, no round charts
    assert f'model v2 of <a href="/runs/{source.pk}/">run {source.pk}</a>' in html
    body = api_client(g.scientists[0]).get(f"/api/v1/runs/{run.pk}/").json()
    assert body["final_evaluation"]["calibration"]["rows"] == curve["rows"]
    assert body["final_evaluation"]["source"]["sha256"] == version.checksum


def test_rows_all_evaluates_every_row_of_every_site(tmp_path: Path) -> None:
    g = governed_consortium(3)
    source, files = completed_run(g, tmp_path)
    spec = evaluation_spec(source, rows="all")
    del spec["evaluation"]

    run = run_evaluation_plan(g, spec, files)

    assert run.status == Run.Status.COMPLETED
    y, p = pooled_rows(run, files, every_row=True)
    assert run.evaluation["metrics"]["n"] == len(y) == 240
    assert run.evaluation["rows_note"] == "all rows of every site"
    assert run.evaluation["calibration"]["n"] == 240
    assert (
        abs(run.evaluation["metrics"]["auc"] - roc_auc_score(y, p))
        <= (run.evaluation["metrics"]["auc_error_bound"])
    )


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        (lambda s, r: {"model_version": {**s["model_version"], "sha256": "0" * 64}},
         "spec.model_version.sha256", "the exact weights"),
        (lambda s, r: {"model_version": {**s["model_version"], "number": 7}},
         "spec.model_version", "has no model version 7"),
        (lambda s, r: {"model": {"kind": "mlp", "hidden": [4]}}, "spec.model", "trained"),
        (lambda s, r: {"schema": {**SCHEMA, "columns": SCHEMA["columns"][:2]}},
         "spec.schema.columns", "lacks ['x3']"),
        (lambda s, r: {"schema": {**SCHEMA, "columns": [
            *SCHEMA["columns"][:2], {**SCHEMA["columns"][2], "transform": "log1p"}]}},
         "spec.schema.columns.2.transform", "column 'x3' has transform 'log1p'"),
        (lambda s, r: {"evaluation": {"test_fraction": 0.3, "seed": 0}}, "spec.evaluation",
         "rows the model trained on"),
    ],
)  # fmt: skip
def test_a_model_version_that_does_not_fit_is_refused_with_the_reason_and_nothing_is_stored(
    tmp_path: Path, change: Any, key: str, words: str
) -> None:
    g = governed_consortium(3)
    source, _ = completed_run(g, tmp_path)
    spec = evaluation_spec(source)
    before = TrainingPlan.objects.count()

    with pytest.raises(ValidationError) as caught:
        propose(g, {**spec, **change(spec, source)})

    errors = caught.value.message_dict
    assert key in errors and words in " ".join(errors[key]), errors
    assert TrainingPlan.objects.count() == before


def test_another_consortiums_model_version_reads_as_missing(tmp_path: Path) -> None:
    g = governed_consortium(3)
    source, _ = completed_run(g, tmp_path)
    other = governed_consortium(2)
    before = TrainingPlan.objects.count()

    with pytest.raises(ValidationError) as caught:
        propose(other, evaluation_spec(source))

    assert "of this consortium has no model version 2" in str(caught.value.message_dict)
    assert TrainingPlan.objects.count() == before
    assert Silo.objects.count() == 5


def test_dp_fairness_counts_of_an_evaluation_plan_are_charged_to_every_sites_ledger(
    tmp_path: Path,
) -> None:
    g = governed_consortium(3, schema=SENSITIVE_SCHEMA)
    source, files = completed_run(g, tmp_path, schema=SENSITIVE_SCHEMA)
    spec = evaluation_spec(
        source, schema=SENSITIVE_SCHEMA, fairness={"sensitive_attribute": "sex", "dp_epsilon": 2.0}
    )

    run = run_evaluation_plan(g, spec, files)

    assert run.status == Run.Status.COMPLETED
    report = run.evaluation["fairness"]
    assert report is not None and report["final"] is True
    charges = PrivacyLedgerEntry.objects.filter(run=run)
    assert sorted(charges.values_list("silo_id", flat=True)) == sorted(s.pk for s in g.silos)
    assert {c.epsilon_pure for c in charges} == {2.0}  # one table (sex) per silo, once

    # Its pages read it like a run's: fairness report, compliance report (with the audit
    # events), the evaluated version's model card.
    admin = Client()
    admin.force_login(g.admin)
    model = ModelVersion.objects.get(run=run, number=0)
    for url in (
        f"/plans/{run.plan_id}/",
        f"/consortia/{g.consortium.pk}/plans/",
        f"/consortia/{g.consortium.pk}/runs/",
        f"/consortia/{g.consortium.pk}/models/",
        f"/runs/{run.pk}/",
        f"/runs/{run.pk}/fairness/",
        f"/runs/{run.pk}/compliance/",
        f"/runs/{run.pk}/compliance.pdf",
        f"/models/{model.pk}/card/",
        f"/models/{model.pk}/card.json",
    ):
        assert admin.get(url).status_code == 200, url
    card = admin.get(f"/models/{model.pk}/card.json").json()
    assert "not readable" not in json.dumps(card)
    assert "evaluated by an evaluation plan, pooled over each site's held-out split" in (
        card["evaluation_note"] if "evaluation_note" in card else json.dumps(card)
    )


def test_an_evaluation_run_waits_for_its_sites_and_says_so_then_fails(tmp_path: Path) -> None:
    g = governed_consortium(3)
    source, _ = completed_run(g, tmp_path)
    plan = approved(g, evaluation_spec(source, min_silos=3, wait_for_silos_seconds=60))
    run = run_start(actor=g.scientists[0], plan=plan)
    Silo.objects.filter(pk=g.silos[0].pk).update(connection_id=None)

    orchestrator.run_advance(run.pk)
    run.refresh_from_db()

    assert run.status == Run.Status.PENDING and run.waiting_since is not None
    note = selectors.run_waiting_note(run, [])
    assert "2 of the 3 needed for the evaluation" in note and "the run fails" in note
    assert not ModelVersion.objects.filter(run=run).exists()
    Run.objects.filter(pk=run.pk).update(waiting_since=timezone.now() - timedelta(seconds=61))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "min_silos" in run.error


def test_the_api_proposes_an_evaluation_plan_and_names_what_does_not_fit(tmp_path: Path) -> None:
    g = governed_consortium(3)
    source, _ = completed_run(g, tmp_path)
    api = api_client(g.scientists[0])
    body = {
        "consortium": g.consortium.pk,
        "name": "Evaluate",
        "spec": evaluation_spec(source),
        "silos": [s.pk for s in g.silos],
    }

    wrong = {**body["spec"], "model_version": {**body["spec"]["model_version"], "number": 1}}
    refused = api.post("/api/v1/plans/", {**body, "spec": wrong}, format="json")
    created = api.post("/api/v1/plans/", body, format="json")

    assert refused.status_code == 400
    assert "spec.model_version.sha256" in json.dumps(refused.json())
    assert created.status_code == 201, created.json()
    assert created.json()["status"] == "submitted"


def test_weights_changed_after_approval_fail_the_run_with_the_reason(tmp_path: Path) -> None:
    g = governed_consortium(3)
    source, _ = completed_run(g, tmp_path)
    plan = approved(g, evaluation_spec(source))
    version = ModelVersion.objects.get(run=source, number=2)
    blob_store().put(version.blob_key, b"other weights")
    run = run_start(actor=g.scientists[0], plan=plan)

    orchestrator.run_advance(run.pk)
    run.refresh_from_db()

    assert run.status == Run.Status.FAILED
    assert "do not match their SHA-256" in run.error
    assert not ModelVersion.objects.filter(run=run).exists()
    assert AuditEvent.objects.filter(
        object_type="run", object_id=run.pk, action="run.finished"
    ).exists()


def test_a_model_cards_evaluate_button_starts_a_plan_that_the_server_accepts(
    tmp_path: Path,
) -> None:
    g = governed_consortium(3)
    source, _ = completed_run(g, tmp_path)
    version = ModelVersion.objects.get(run=source, number=2)
    scientist, steward = Client(), Client()
    scientist.force_login(g.scientists[0])
    steward.force_login(g.stewards[0])

    card = scientist.get(f"/models/{version.pk}/card/").content.decode()
    assert 'id="evaluate-model"' in card
    assert 'id="evaluate-model"' not in steward.get(f"/models/{version.pk}/card/").content.decode()
    url = f"/consortia/{g.consortium.pk}/plans/new/?evaluate={version.pk}"
    form = scientist.get(url)
    template = form.context["form"].initial["spec"]
    assert template["model_version"] == {"run": source.pk, "number": 2, "sha256": version.checksum}
    assert version.checksum in form.content.decode()

    response = scientist.post(
        f"/consortia/{g.consortium.pk}/plans/new/",
        {
            "name": form.context["form"].initial["name"],
            "spec": json.dumps(template),
            "silos": [s.pk for s in g.silos],
            "submit": "on",
        },
    )

    assert response.status_code == 302, response.content.decode()[-2000:]
    assert (
        TrainingPlan.objects.get(name=f"Evaluate run {source.pk} v2").current_version.spec["kind"]
        == "evaluation"
    )
