"""End to end: a multi-class and a regression plan run with real agents over a real websocket,
and the run's final figures are those of the union of the sites' held-out rows (docs/tasks.md)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, mean_prediction
from sklearn import metrics as skm

from clientagent.data import LocalData
from fedcore import tabular, tensors, training
from fedcore.models import build_model
from federation.models import ModelVersion, Run
from federation.server import free_port
from federation.services.silos import silo_issue_token
from federation.storage import blob_store
from tests.e2e import harness
from tests.e2e.test_federation import run_to_the_end
from tests.factories import (
    SCHEMA,
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CLASSES = ["low", "mid", "high"]
FAIRNESS = {"sensitive_attribute": "sex", "groups": {"sex": ["F", "M"]}}


def write_site(path: Path, seed: int, task: str, n: int = 160) -> Path:
    """A site's rows: three features, a sex column and a target of the task (non-IID shift)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.4 * seed, size=(n, 3))
    score = x[:, 0] - 0.6 * x[:, 1] + 0.3 * rng.normal(size=n)
    if task == "multiclass":
        y: object = np.array(CLASSES)[np.digitize(score, [-0.5, 0.7])]
    else:
        y = 50.0 + 12.0 * score
    frame = pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y})
    frame["sex"] = rng.choice(["F", "M"], size=n)
    frame.to_csv(path, index=False)
    return path


def run_task(tmp_path: Path, target: dict, task: str) -> tuple[Run, list[Path]]:
    schema = {**SCHEMA, "target": target, "sensitive": ["sex"]}
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(2, organization__consortium=consortium, schema=schema)
    spec = plan_spec(
        schema=schema,
        model={"kind": "mlp", "hidden": [8]},
        training={
            "rounds": 3,
            "local_epochs": 2,
            "batch_size": 16,
            "optimizer": "adam",
            "lr": 0.05,
        },
        fairness=FAIRNESS,
        min_silos=2,
    )
    plan = PlanFactory(consortium=consortium, spec=spec, silos=silos)
    approve_by_stewards(plan)
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/agent/"
    csvs = [write_site(tmp_path / f"{s.name}.csv", i, task) for i, s in enumerate(silos)]
    procs = [harness.server(tmp_path, port)] + [
        harness.agent(tmp_path, s.name, url=url, token=silo_issue_token(silo=s), data_csv=csv)
        for s, csv in zip(silos, csvs, strict=True)
    ]
    try:
        run = run_to_the_end(plan, silos, procs)
    finally:
        for p in procs:
            p.stop()
    for proc in procs[1:]:  # every agent evaluated the final model and none failed on the way
        log = proc.log.read_text()
        assert "sent its evaluation on" in log and "Traceback" not in log, log[-3000:]
    return run, csvs


def pooled_rows(run: Run, csvs: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out targets, the final model's raw outputs and the sex column of every site."""
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    target = tabular.DatasetSchema.from_dict(run.version.spec["schema"]).target
    plan = run.version.spec
    objective = training.Objective.for_task(target.task, n_outputs=target.n_outputs)
    ys, outs, sexes = [], [], []
    for csv in csvs:
        data = LocalData(csv)
        test = data.arrays(data.split(plan), run.preprocessing).test
        model = build_model(plan["model"], int(test.X.shape[1]), n_outputs=target.n_outputs)
        model.load_state_dict(state)
        ys.append(test.y)
        outs.append(training.predict(model, test.X, objective))
        sexes.append(np.asarray(test.groups["sex"], dtype=object))
    assert run.evaluation is not None and run.evaluation["model_version"] == final.number
    assert run.evaluation["missing"] == [] and run.evaluation["task"] == target.task
    return np.concatenate(ys), np.concatenate(outs), np.concatenate(sexes)


def test_a_multiclass_plan_runs_and_its_final_figures_are_the_pooled_rows(tmp_path: Path) -> None:
    target = {"column": "y", "task": "multiclass", "classes": CLASSES}
    run, csvs = run_task(tmp_path, target, "multiclass")
    y, probs, sex = pooled_rows(run, csvs)
    choice = np.argmax(probs, axis=1)
    pooled = run.evaluation["metrics"]
    assert pooled["n"] == y.size and set(run.evaluation["by_silo"]) == {
        s for s in run.evaluation["asked"]
    }
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(y, choice), abs=1e-9)
    assert pooled["macro_f1"] == pytest.approx(
        skm.f1_score(y, choice, average="macro", labels=[0, 1, 2], zero_division=0), abs=1e-9
    )
    assert pooled["accuracy"] > 0.6, "three rounds learnt nothing"
    by_group = run.evaluation["task_fairness"]["attributes"]["sex"]["by_group"]
    frame = MetricFrame(
        metrics=lambda t, p: float(np.mean(p == 2)), y_true=y, y_pred=choice, sensitive_features=sex
    )
    for group, rate in frame.by_group.items():
        assert by_group[group]["selection_rate"]["high"] == pytest.approx(rate, abs=1e-9)


def test_a_regression_plan_runs_and_its_final_figures_are_the_pooled_rows(tmp_path: Path) -> None:
    target = {"column": "y", "task": "regression", "standardize": True}
    run, csvs = run_task(tmp_path, target, "regression")
    y, predicted, sex = pooled_rows(run, csvs)
    mean, std = tabular.target_scale(
        tabular.DatasetSchema.from_dict(run.version.spec["schema"]), run.preprocessing
    )
    truth, values = mean + std * y, mean + std * predicted
    pooled = run.evaluation["metrics"]
    assert pooled["n"] == y.size
    assert pooled["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(truth, values)), abs=1e-9)
    assert pooled["mae"] == pytest.approx(skm.mean_absolute_error(truth, values), abs=1e-9)
    assert pooled["r2"] == pytest.approx(skm.r2_score(truth, values), abs=1e-9)
    assert pooled["r2"] > 0.5, "three rounds learnt nothing"
    by_group = run.evaluation["task_fairness"]["attributes"]["sex"]["by_group"]
    frame = MetricFrame(
        metrics=mean_prediction, y_true=truth, y_pred=values, sensitive_features=sex
    )
    for group, value in frame.by_group.items():
        assert by_group[group]["mean_prediction"] == pytest.approx(value, abs=1e-9)
