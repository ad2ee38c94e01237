"""End to end: an evaluation plan of a completed run's model, and one of an uploaded model,
through the real ASGI server and real agent processes (each checks the signed request and its
site policy, evaluates, answers)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from clientagent.data import LocalData
from fedcore import calibration, tabular, tensors, training
from fedcore.models import build_model
from federation.models import ModelVersion, Role, Run
from federation.services.evaluation_plans import source_errors
from federation.services.uploaded_models import uploaded_model_create
from federation.storage import blob_store
from tests.e2e import harness
from tests.e2e.test_federation import federation, online_count, run_to_the_end
from tests.factories import SCHEMA, PlanFactory, approve_by_stewards
from tests.governance_factories import member
from tests.uploaded_models import LR, fit_logistic_regression, scores

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_an_evaluation_plan_of_a_trained_model_runs_on_real_agents(tmp_path: Path) -> None:
    plan, silos, server, agents = federation(tmp_path, 3, min_silos=3)
    procs = [server, *agents]
    try:
        source = run_to_the_end(plan, silos, procs)
        version = ModelVersion.objects.filter(run=source).order_by("-number").first()
        spec = {
            "kind": "evaluation",
            "name": "Evaluate the final model",
            "schema": SCHEMA,
            "model": source.version.spec["model"],
            "model_version": {
                "run": source.pk,
                "number": version.number,
                "sha256": version.checksum,
            },
            "evaluation": source.version.spec["evaluation"],
            "min_silos": 3,
        }
        evaluation_plan = PlanFactory(consortium=plan.consortium, spec=spec, silos=silos)
        approve_by_stewards(evaluation_plan)
        run = Run.objects.create(
            plan=evaluation_plan,
            version=evaluation_plan.current_version,
            plan_hash=evaluation_plan.current_version.spec_hash,
            rounds=1,
        )
        harness.wait_until(
            lambda: not Run.objects.get(pk=run.pk).active,
            timeout=120,
            what="the evaluation run to end",
            procs=procs,
        )
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
        assert not run.round_set.exists()
        seconds = (run.finished_at - run.created_at).total_seconds()
        print(f"evaluation plan run on 3 real agents: {seconds:.2f} s from creation to end")

        state = tensors.decode_state_dict(blob_store().get(version.blob_key))
        ys, ps = [], []
        for silo in silos:
            data = LocalData(tmp_path / f"{silo.name}.csv")
            test = data.arrays(data.split(source.version.spec), source.preprocessing).test
            model = build_model(spec["model"], int(test.X.shape[1]), seed=0)
            model.load_state_dict(state)
            ys.append(test.y.astype(np.float64))
            ps.append(training.predict_proba(model, test.X).astype(np.float64))
        y, p = np.concatenate(ys), np.concatenate(ps)
        result = run.evaluation
        assert result["evaluated"] == sorted(s.name for s in silos)
        assert result["metrics"]["n"] == len(y) == 90
        assert abs(result["metrics"]["auc"] - roc_auc_score(y, p)) <= (
            result["metrics"]["auc_error_bound"] + 1e-12
        )
        assert result["metrics"] == source.evaluation["metrics"]
        index = calibration.calibration_bins(p)
        assert [row["count"] for row in result["calibration"]["rows"]] == [
            int((index == b).sum()) for b in range(calibration.CALIBRATION_BINS)
        ]
    finally:
        harness.stop_all(procs)


def test_an_evaluation_plan_of_an_uploaded_model_runs_on_real_agents(tmp_path: Path) -> None:
    """A logistic regression fitted in-process on the pooled rows of the sites (never trained
    by a run), uploaded with its preprocessing, evaluated on every row of every site: the
    pooled AUC is scikit-learn's on those rows, within the histogram's stated bound."""
    plan, silos, server, agents = federation(tmp_path, 3, min_silos=3)
    procs = [server, *agents]
    frames = [tabular.load_table(tmp_path / f"{silo.name}.csv") for silo in silos]
    fitted, weights = fit_logistic_regression(frames, SCHEMA)
    scientist = member(silos[0].organization, Role.DATA_SCIENTIST, username="uploader")
    uploaded = uploaded_model_create(
        actor=scientist,
        consortium=plan.consortium,
        name="Partner hospital model",
        description="fitted outside Quorum",
        model=LR,
        schema=SCHEMA,
        preprocessing=fitted,
        weights=weights,
    )
    spec = {
        "kind": "evaluation",
        "name": "Evaluate the uploaded model",
        "schema": SCHEMA,
        "model": LR,
        "model_version": {"uploaded": uploaded.pk, "sha256": uploaded.checksum},
        "rows": "all",
        "min_silos": 3,
    }
    assert source_errors(plan.consortium_id, spec) == {}
    try:
        for proc in procs:
            proc.start()
        harness.wait_until(
            lambda: online_count(silos) == len(silos),
            timeout=60,
            what="3 agents online",
            procs=procs,
        )
        evaluation_plan = PlanFactory(consortium=plan.consortium, spec=spec, silos=silos)
        approve_by_stewards(evaluation_plan)
        run = Run.objects.create(
            plan=evaluation_plan,
            version=evaluation_plan.current_version,
            plan_hash=evaluation_plan.current_version.spec_hash,
            rounds=1,
        )
        harness.wait_until(
            lambda: not Run.objects.get(pk=run.pk).active,
            timeout=120,
            what="the evaluation run to end",
            procs=procs,
        )
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
        seconds = (run.finished_at - run.created_at).total_seconds()
        print(f"uploaded-model evaluation on 3 real agents: {seconds:.2f} s from creation to end")

        y, p = scores(frames, SCHEMA, fitted, weights)
        result = run.evaluation
        assert result["evaluated"] == sorted(s.name for s in silos)
        assert result["metrics"]["n"] == len(y) == 450
        auc = roc_auc_score(y, p)
        print(f"pooled AUC {result['metrics']['auc']:.6f}, scikit-learn {auc:.6f}")
        assert abs(result["metrics"]["auc"] - auc) <= result["metrics"]["auc_error_bound"] + 1e-12
        assert result["metrics"]["accuracy"] == pytest.approx(float(np.mean((p >= 0.5) == y)))
        assert result["source"] == {
            "run": None,
            "model_version": None,
            "uploaded": uploaded.pk,
            "name": "Partner hospital model",
            "uploaded_by": "uploader",
            "sha256": tensors.sha256_hex(weights),
        }
    finally:
        harness.stop_all(procs)
