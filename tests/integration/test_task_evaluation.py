"""The final evaluation of multi-class and regression runs through the services the agent
websocket calls, with the agent's own evaluation code on real site files: the pooled figures
and group fairness are those of the union of the held-out rows (scikit-learn, fairlearn)."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import MetricFrame, mean_prediction
from sklearn import metrics as skm

from clientagent.data import LocalData
from fedcore import tabular, task_metrics, tensors, training
from fedcore.models import build_model
from federation import orchestrator
from federation import reports as reports_module
from federation.models import ModelVersion, RoundMetric, Run
from federation.reports import final_task_table, model_card
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
from tests.integration.test_final_evaluation import evaluate_at, online

pytestmark = pytest.mark.django_db

CLASSES = ["a", "b", "c"]
TARGETS = {
    "multiclass": {"column": "y", "task": "multiclass", "classes": CLASSES},
    "regression": {"column": "y", "task": "regression", "standardize": True},
}


def site_frame(seed: int, task: str, n: int = 90) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.5 * seed, size=(n, 3))
    score = x[:, 0] + 0.5 * x[:, 1] + rng.normal(scale=0.5, size=n)
    y = np.array(CLASSES)[np.digitize(score, [-0.3, 0.8])] if task == "multiclass" else 20 * score
    sex = np.where(rng.random(n) < 0.4 + 0.2 * seed, "f", "m")
    return pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y, "sex": sex})


def run_to_evaluation(
    tmp_path: Path, task: str, parts: bool = False
) -> tuple[Run, list, dict[int, Path]]:
    """A run of the task through its statistics and one round, evaluating its final model;
    ``parts``: each update carries the agent's task_part of the global model v0."""
    schema = {**SCHEMA, "target": TARGETS[task], "sensitive": ["sex"]}
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(3, organization__consortium=consortium, schema=schema)
    spec = plan_spec(
        schema=schema,
        fairness={"sensitive_attribute": "sex", "groups": {"sex": ["f", "m"]}},
        training={**plan_spec()["training"], "rounds": 1},
    )
    plan = PlanFactory(consortium=consortium, spec=spec, silos=silos)
    online(silos)
    run = start_run(plan)
    files = {}
    for i, silo in enumerate(silos):
        files[silo.pk] = tmp_path / f"site{i}.csv"
        site_frame(i, task).to_csv(files[silo.pk], index=False)
    orchestrator.run_advance(run.pk)
    parsed = tabular.DatasetSchema.from_dict(schema)
    for silo in silos:
        split = LocalData(files[silo.pk]).split(spec)
        stats_receive(
            silo_id=silo.pk, run_id=run.pk, stats=tabular.local_statistics(split.train, parsed)
        )
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    n_features = len(tabular.feature_names(parsed, run.preprocessing))
    for i, silo in enumerate(silos):
        model = build_model(spec["model"], n_features, n_outputs=parsed.target.n_outputs, seed=i)
        fields = {
            "run": run.pk,
            "round": 1,
            "nonce": secrets.token_hex(16),
            "num_examples": 72,
            "metrics": {"global": {"loss": 1.0, "n": 18}},
        }
        if parts:
            fields["task_part"] = global_part(run, files[silo.pk])
        update_receive(
            silo_id=silo.pk, fields=fields, payload=tensors.encode_state_dict(model.state_dict())
        )
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.EVALUATING, run.error
    return run, silos, files


def global_part(run: Run, csv: Path) -> dict[str, Any]:
    """What the site's agent sends as task_part: model v0's part on its held-out rows."""
    from clientagent.trainer import _json_metrics, task_parts
    from fedcore.plan import parse_plan
    from federation.storage import blob_store

    spec = run.version.spec
    parsed = parse_plan(spec)
    v0 = ModelVersion.objects.get(run=run, number=0)
    data = LocalData(csv)
    test = data.arrays(data.split(spec), run.preprocessing).test
    model = build_model(
        spec["model"], int(test.X.shape[1]), n_outputs=parsed.schema.target.n_outputs
    )
    model.load_state_dict(tensors.decode_state_dict(blob_store().get(v0.blob_key)))
    bins = task_metrics.round_bins(parsed.schema.target.n_outputs)
    part = task_parts(model, test, parsed, run.preprocessing, bins=bins, with_fairness=False)
    return _json_metrics(part["metrics"])


def pooled_rows(run: Run, replies: list[dict[str, Any]], silos, files, version=None):
    """The union of the held-out rows: targets, the final model's outputs, the sex column."""
    from federation.services.evaluation import final_model
    from federation.storage import blob_store

    spec = run.version.spec
    target = tabular.DatasetSchema.from_dict(spec["schema"]).target
    version = final_model(run) if version is None else version
    state = tensors.decode_state_dict(blob_store().get(version.blob_key))
    objective = training.Objective.for_task(target.task, n_outputs=target.n_outputs)
    ys, outs, sexes = [], [], []
    for silo in silos:
        data = LocalData(files[silo.pk])
        test = data.arrays(data.split(spec), run.preprocessing).test
        model = build_model(spec["model"], int(test.X.shape[1]), n_outputs=target.n_outputs)
        model.load_state_dict(state)
        ys.append(test.y)
        outs.append(training.predict(model, test.X, objective))
        sexes.append(np.asarray(test.groups["sex"], dtype=object))
    return np.concatenate(ys), np.concatenate(outs), np.concatenate(sexes)


def test_a_multiclass_run_pools_the_sites_parts_into_the_union_figures(tmp_path: Path) -> None:
    run, silos, files = run_to_evaluation(tmp_path, "multiclass")
    replies = [evaluate_at(run, silo, files) for silo in silos]
    for silo, reply in zip(silos, replies, strict=True):
        evaluation_receive(silo_id=silo.pk, fields=reply)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED, run.error

    y, probs, sex = pooled_rows(run, replies, silos, files)
    choice = np.argmax(probs, axis=1)
    pooled = run.evaluation["metrics"]
    assert run.evaluation["task"] == "multiclass" and pooled["n"] == y.size
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(y, choice), abs=1e-9)
    for average in ("macro", "weighted"):
        expected = skm.f1_score(y, choice, average=average, labels=[0, 1, 2], zero_division=0)
        assert pooled[f"{average}_f1"] == pytest.approx(expected, abs=1e-9)
    assert pooled["confusion"] == skm.confusion_matrix(y, choice, labels=[0, 1, 2]).tolist()
    report = run.evaluation["task_fairness"]["attributes"]["sex"]
    for k, name in enumerate(CLASSES):
        frame = MetricFrame(
            metrics=lambda t, p, k=k: float(np.mean(p == k)),
            y_true=y,
            y_pred=choice,
            sensitive_features=sex,
        )
        for group, rate in frame.by_group.items():
            assert report["by_group"][group]["selection_rate"][name] == pytest.approx(
                rate, abs=1e-9
            )
    assert run.evaluation["fairness"] is None  # the binary report's key stays binary-shaped

    table = final_task_table(run)
    assert table["columns"][:2] == ["accuracy", "macro F1"]
    assert [r["name"] for r in table["rows"]][-1].startswith("pooled")
    assert table["rows"][-1]["values"][0] == pooled["accuracy"]
    from django.template.loader import render_to_string

    html = render_to_string("dashboard/_run_summary.html", {"run": run, "task_table": table})
    assert 'id="task-metrics"' in html and "macro F1" in html
    assert f"{pooled['macro_f1']:.4f}" in html and html.count('<th scope="row">') == 4
    card = model_card(ModelVersion.objects.filter(run=run).order_by("-number").first())
    assert card["metrics"]["evaluation"]["macro_f1"] == pooled["macro_f1"]
    assert card["deployment"]["onnx"]["output"] == {"name": "logits", "shape": ["batch", 3]}
    # the binary-shaped fairness pages and the compliance report still answer for such a run
    from federation.reports import compliance_report_json, run_fairness

    assert run_fairness(run)["final_warning"] is None
    compliance = compliance_report_json(run)
    assert compliance["run"]["id"] == run.pk
    # ... and shows the task's figures per silo and pooled, with the largest disparity
    task = compliance["task_metrics"]
    assert task["task"] == "multiclass" and task["rows"] == table["rows"]
    (disparity,) = task["largest_disparities"]
    largest = run.evaluation["task_fairness"]["attributes"]["sex"]["largest_disparity"]
    assert disparity == {"attribute": "sex", **largest}
    from federation.compliance_pdf import compliance_report_pdf
    from tests.pdf_reading import page_text, read_pdf

    text = page_text(read_pdf(compliance_report_pdf(run))[1])
    assert "Final evaluation (multiclass task)" in text and "macro F1" in text
    assert f"{pooled['macro_f1']:.4f}" in text
    page = render_to_string(
        "dashboard/compliance.html",
        {"run": run, "report": {**reports_module.compliance_report(run), "events": []}},
    )
    assert "Final evaluation (multiclass task)" in page and f"{pooled['macro_f1']:.4f}" in page
    # one-vs-rest AUC from the per-class histograms: scikit-learn's macro OvR within the bound
    exact = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert abs(pooled["auc_ovr"] - exact) <= pooled["auc_error_bound"] + 1e-12


def test_a_regression_run_pools_the_sites_parts_into_the_union_figures(tmp_path: Path) -> None:
    run, silos, files = run_to_evaluation(tmp_path, "regression")
    replies = [evaluate_at(run, silo, files) for silo in silos]
    for silo, reply in zip(silos, replies, strict=True):
        evaluation_receive(silo_id=silo.pk, fields=reply)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()

    y, predicted, sex = pooled_rows(run, replies, silos, files)
    schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
    mean, std = tabular.target_scale(schema, run.preprocessing)
    truth, values = mean + std * y, mean + std * predicted
    pooled = run.evaluation["metrics"]
    assert pooled["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(truth, values)), abs=1e-9)
    assert pooled["mae"] == pytest.approx(skm.mean_absolute_error(truth, values), abs=1e-9)
    assert pooled["r2"] == pytest.approx(skm.r2_score(truth, values), abs=1e-9)
    frame = MetricFrame(
        metrics=mean_prediction, y_true=truth, y_pred=values, sensitive_features=sex
    )
    report = run.evaluation["task_fairness"]["attributes"]["sex"]
    for group, value in frame.by_group.items():
        assert report["by_group"][group]["mean_prediction"] == pytest.approx(value, abs=1e-9)
    assert report["difference"]["mean_prediction"] == pytest.approx(frame.difference(), abs=1e-9)


@pytest.mark.parametrize(
    ("tamper", "words"),
    [
        (lambda r: r["evaluation"].update(count=-1), "count must be a whole number"),
        (lambda r: r["evaluation"].update(sum_abs_error=float("nan")), "must be a finite number"),
        (lambda r: r["fairness"]["sex"].pop("f"), "counts"),
        (lambda r: r["fairness"]["sex"].update(x=r["fairness"]["sex"]["f"]), "outside the plan"),
    ],
)
def test_a_malformed_regression_evaluation_is_refused_naming_the_field(
    tmp_path: Path, tamper, words: str
) -> None:
    run, silos, files = run_to_evaluation(tmp_path, "regression")
    reply = evaluate_at(run, silos[0], files)
    tamper(reply)
    with pytest.raises(Refused) as refused:
        evaluation_receive(silo_id=silos[0].pk, fields=reply)
    assert refused.value.code == "invalid_update" and words in refused.value.reason


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_a_rounds_global_figures_are_pooled_exactly_from_the_sites_parts(
    tmp_path: Path, task: str
) -> None:
    run, silos, files = run_to_evaluation(tmp_path, task, parts=True)
    v0 = ModelVersion.objects.get(run=run, number=0)
    y, out, _ = pooled_rows(run, [], silos, files, version=v0)
    summary = {
        m.name: m.value
        for m in RoundMetric.objects.filter(round__run=run, silo__isnull=True, scope="global")
    }
    if task == "multiclass":
        choice = np.argmax(out, axis=1)
        macro = skm.f1_score(y, choice, average="macro", labels=[0, 1, 2], zero_division=0)
        assert summary["macro_f1"] == pytest.approx(macro, abs=1e-9)
        assert summary["accuracy"] == pytest.approx(skm.accuracy_score(y, choice), abs=1e-9)
        # the round's one-vs-rest AUC from the parts' coarser histograms, within its bound
        exact = skm.roc_auc_score(y, out, multi_class="ovr", average="macro")
        assert 0 <= summary["auc_error_bound"] < 0.05
        assert abs(summary["auc_ovr"] - exact) <= summary["auc_error_bound"] + 1e-12
    else:
        schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
        mean, std = tabular.target_scale(schema, run.preprocessing)
        truth, values = mean + std * y, mean + std * out
        assert summary["r2"] == pytest.approx(skm.r2_score(truth, values), abs=1e-9)
        assert summary["rmse"] == pytest.approx(
            np.sqrt(skm.mean_squared_error(truth, values)), abs=1e-9
        )
    assert summary["n"] == y.size
    # the run monitor charts the task's figures, the pooled one as the global line
    from dashboard import charts
    from federation import selectors

    shown = charts.run_charts([], selectors.run_metric_rows(run), selectors.run_task(run))
    figure = "macro_f1" if task == "multiclass" else "rmse"
    (chart,) = [c for c in shown if c.key == figure]
    assert "auc" not in {c.key for c in shown} and chart.points > 0
    assert chart.table.columns[1] == "Global model (all silos)"
    assert chart.table.rows[0][1] == f"{summary[figure]:.4f}"


def test_a_malformed_task_part_is_refused_and_a_binary_plan_takes_none(tmp_path: Path) -> None:
    from federation.services.updates import checked_task_part

    run, _, _ = run_to_evaluation(tmp_path, "multiclass")
    part = {"classes": 3, "confusion": [[1, 0, 0]] * 2, "loss_sum": 0.1, "bins": None}
    with pytest.raises(Refused, match="task_part must have exactly the keys"):
        checked_task_part(run, {"task_part": part})
    with pytest.raises(Refused, match=r"task_part.confusion must be 3 rows"):
        checked_task_part(run, {"task_part": {**part, "histograms": None}})
    run.version.spec = {**run.version.spec, "schema": SCHEMA}
    with pytest.raises(Refused, match="a binary plan's update carries no task_part"):
        checked_task_part(run, {"task_part": {**part, "histograms": None}})


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_an_evaluation_plan_of_a_task_model_pools_the_same_figures_as_its_run(
    tmp_path: Path, task: str
) -> None:
    """An evaluation plan (docs/analytics.md, "Evaluation plans") of a multi-class or regression
    run's final model, on the same held-out rows, pools exactly the run's own final figures."""
    from federation.services.evaluation_plans import source_errors

    run, silos, files = run_to_evaluation(tmp_path, task)
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED, run.error
    final = ModelVersion.objects.get(run=run, number=1)
    source = run.version.spec
    spec = {
        "kind": "evaluation",
        "schema": source["schema"],
        "model": source["model"],
        "model_version": {"run": run.pk, "number": 1, "sha256": final.checksum},
        "evaluation": source["evaluation"],
        "fairness": source["fairness"],
    }
    assert source_errors(run.plan.consortium_id, spec) == {}
    plan = PlanFactory(consortium=run.plan.consortium, spec=spec, silos=silos)
    online(silos)
    evaluated = start_run(plan)
    orchestrator.run_advance(evaluated.pk)
    evaluated.refresh_from_db()
    assert evaluated.status == Run.Status.EVALUATING, evaluated.error
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(evaluated, silo, files))
    orchestrator.run_advance(evaluated.pk)
    evaluated.refresh_from_db()
    assert evaluated.status == Run.Status.COMPLETED, evaluated.error
    assert evaluated.evaluation["task"] == task
    mine, theirs = evaluated.evaluation["metrics"], run.evaluation["metrics"]
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        if isinstance(value, float):
            assert mine[key] == pytest.approx(value, abs=1e-12), key
        else:  # counts, the confusion matrix
            assert mine[key] == value, key
    assert evaluated.evaluation["task_fairness"] == run.evaluation["task_fairness"]


def test_a_round_with_parts_from_agents_of_two_versions_pools_them_without_an_auc(
    tmp_path: Path,
) -> None:
    # an older agent's part has no histograms: the round keeps its exact pooled figures, no AUC
    from federation.models import Round, Update
    from federation.services.rounds import _pooled_global

    run, _, _ = run_to_evaluation(tmp_path, "multiclass", parts=True)
    round_ = Round.objects.get(run=run, number=1)
    updates = list(Update.objects.filter(round=round_).order_by("silo_id").values("task_part"))
    assert all(u["task_part"]["bins"] == task_metrics.round_bins(3) for u in updates)
    both = _pooled_global(round_, updates)
    updates[0]["task_part"] = {**updates[0]["task_part"], "bins": None, "histograms": None}
    mixed = _pooled_global(round_, updates)
    assert ("global", "auc_ovr") in both and ("global", "auc_ovr") not in mixed
    assert mixed[("global", "macro_f1")] == both[("global", "macro_f1")]
