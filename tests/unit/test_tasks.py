"""Multi-class and regression tasks: the target in the plan language, the site's data checks,
training (plain and DP-SGD), the metrics an agent reports, and ONNX export, for each task."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import onnxruntime
import pandas as pd
import pytest
import torch

from fedcore import models, onnx_export, tabular, training
from fedcore.plan import parse_plan, plan_errors, plan_hash
from fedcore.privacy import dpsgd
from federation.demo import scenarios

CLASSES = ["0", "1", "2", "3"]


def frame(n: int = 240, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    severity = np.digitize(x1 + 0.3 * rng.normal(size=n), [-0.7, 0.0, 0.7])
    return pd.DataFrame(
        {
            "x1": x1.round(4).astype(str),
            "x2": x2.round(4).astype(str),
            "sex": rng.choice(["F", "M"], n),
            "severity": severity.astype(str),
            "progression": (150 + 60 * x1 - 20 * x2 + rng.normal(0, 10, n)).round(2).astype(str),
        }
    )


def schema(target: dict[str, Any]) -> dict[str, Any]:
    return {
        "columns": [
            {"name": "x1", "type": "numeric"},
            {"name": "x2", "type": "numeric"},
            {"name": "sex", "type": "categorical", "categories": ["F", "M"]},
        ],
        "target": target,
        "sensitive": ["sex"],
    }


MULTICLASS = {"column": "severity", "task": "multiclass", "classes": CLASSES}
REGRESSION = {"column": "progression", "task": "regression", "standardize": True}


def plan(target: dict[str, Any], **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"kind": "mlp", "hidden": [8]},
        "schema": schema(target),
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 32, "lr": 0.05},
    }
    for key, value in extra.items():
        spec[key] = value
    return spec


def prepared(target: dict[str, Any]) -> tuple[tabular.DatasetSchema, tabular.TabularData, dict]:
    parsed = tabular.DatasetSchema.from_dict(schema(target))
    whole = frame()
    halves = [whole.iloc[:100], whole.iloc[100:]]  # two sites
    fitted = tabular.merge_statistics(
        [tabular.local_statistics(part, parsed) for part in halves], parsed
    )
    return parsed, tabular.transform(frame(), parsed, fitted), fitted


# --- the plan language ---------------------------------------------------------------------------


def test_every_demo_plan_keeps_its_hash_and_parses_as_binary() -> None:
    for name in ("healthcare", "finance"):
        spec = getattr(scenarios, name)(0).plan
        before = plan_hash(spec)

        parsed = parse_plan(copy.deepcopy(spec))

        assert parsed.task == "binary"
        assert plan_hash(spec) == before
        assert "task" not in parsed.schema.to_dict()["target"]


def test_a_binary_target_written_with_task_binary_has_the_same_schema_hash() -> None:
    implicit = tabular.DatasetSchema.from_dict(schema({"column": "y", "positive": ["1"]}))
    explicit = tabular.DatasetSchema.from_dict(
        schema({"column": "y", "task": "binary", "positive": ["1"]})
    )

    assert tabular.schema_hash(implicit) == tabular.schema_hash(explicit)


def test_multiclass_and_regression_plans_parse_with_their_objective() -> None:
    multi = parse_plan(plan(MULTICLASS))
    regression = parse_plan(
        plan(
            REGRESSION,
            training={**plan(REGRESSION)["training"], "loss": "huber", "huber_delta": 0.5},
        )
    )

    assert multi.objective() == training.Objective("multiclass", 4, "cross_entropy")
    assert regression.objective() == training.Objective("regression", 1, "huber", 0.5)
    assert parse_plan(plan(REGRESSION)).objective().loss == "mse"


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ({"column": "severity", "task": "multiclass"}, "needs 'classes'"),
        ({"column": "severity", "task": "multiclass", "classes": ["0", "0"]}, "twice"),
        (
            {"column": "s", "task": "multiclass", "classes": ["a", "b"], "positive": ["a"]},
            "belong to task 'binary'",
        ),
        ({"column": "y", "positive": ["1"], "classes": ["a", "b"]}, "belongs to task 'multiclass'"),
        ({"column": "y", "positive": ["1"], "standardize": True}, "applies to task 'regression'"),
        ({"column": "y", "task": "ordinal"}, "is not one of binary, multiclass, regression"),
    ],
)
def test_a_target_of_the_wrong_shape_is_refused_under_schema(target: dict, message: str) -> None:
    errors = plan_errors(plan(target))

    assert set(errors) == {"schema"}
    assert message in errors["schema"]


@pytest.mark.parametrize(
    ("target", "extra", "path", "message"),
    [
        (
            MULTICLASS,
            {
                "training": {
                    "rounds": 1,
                    "local_epochs": 1,
                    "batch_size": 8,
                    "lr": 0.1,
                    "loss": "mse",
                }
            },
            "training.loss",
            "applies to task 'regression' only",
        ),
        (
            REGRESSION,
            {
                "training": {
                    "rounds": 1,
                    "local_epochs": 1,
                    "batch_size": 8,
                    "lr": 0.1,
                    "huber_delta": 2.0,
                }
            },
            "training.huber_delta",
            "applies to loss 'huber' only",
        ),
        (
            REGRESSION,
            {"fairness": {"sensitive_attribute": "sex", "max_demographic_parity_difference": 0.1}},
            "fairness.max_demographic_parity_difference",
            "positive label",
        ),
        (
            MULTICLASS,
            {"fairness": {"sensitive_attribute": "sex", "mitigation": {"kind": "postprocess"}}},
            "fairness.mitigation.kind",
            "no mitigation yet",
        ),
        (
            MULTICLASS,
            {"fairness": {"sensitive_attribute": "sex", "dp_epsilon": 1.0}},
            "fairness.dp_epsilon",
            "binary' only",
        ),
        (
            REGRESSION,
            {"fairness": {"sensitive_attribute": "sex"}, "secure_aggregation": True},
            "fairness",
            "secure aggregation",
        ),
        (
            REGRESSION,
            {"privacy": {"statistics_epsilon": 1.0}},
            "privacy.statistics_epsilon",
            "standardised regression target",
        ),
    ],
)
def test_what_a_task_rules_out_is_refused_with_the_reason(
    target: dict, extra: dict, path: str, message: str
) -> None:
    spec = plan(target, **extra)
    if "statistics_epsilon" in str(extra):
        for column in spec["schema"]["columns"][:2]:
            column.update(min=-10, max=10)

    errors = plan_errors(spec)

    assert path in errors, errors
    assert message in errors[path]


def test_a_multiclass_plan_with_a_plain_fairness_section_is_accepted() -> None:
    assert plan_errors(plan(MULTICLASS, fairness={"sensitive_attribute": "sex"})) == {}


# --- the site's data ------------------------------------------------------------------------------


def test_multiclass_labels_are_the_declared_class_indices() -> None:
    parsed, data, _ = prepared(MULTICLASS)

    assert data.y.dtype == np.float32
    assert data.y.tolist() == frame()["severity"].astype(int).tolist()


def test_a_class_outside_the_declared_list_names_column_rows_and_an_example_locally_only() -> None:
    df = frame()
    df.loc[[5, 9, 11], "severity"] = "7"
    parsed = tabular.DatasetSchema.from_dict(schema(MULTICLASS))

    with pytest.raises(tabular.DataValidationError) as caught:
        tabular.validate_frame(df, parsed)

    assert "target column 'severity': 3 rows hold a value outside the declared classes" in str(
        caught.value
    )
    assert "'7' at row 6" in str(caught.value)
    assert "'7'" not in caught.value.shareable and "3 rows" in caught.value.shareable


@pytest.mark.parametrize(
    ("bad", "problem"), [("abc", "not numeric"), ("inf", "not a finite number")]
)
def test_a_regression_target_that_is_not_a_finite_number_is_refused(bad: str, problem: str) -> None:
    df = frame()
    df.loc[[3, 4], "progression"] = bad
    parsed = tabular.DatasetSchema.from_dict(schema(REGRESSION))

    with pytest.raises(tabular.DataValidationError) as caught:
        tabular.local_statistics(df, parsed)

    assert f"target column 'progression': 2 rows hold a value that is {problem}" in str(
        caught.value
    )
    assert "row 4" in str(caught.value)
    assert repr(bad) not in caught.value.shareable  # the cell's value stays at the site


def test_a_missing_regression_target_is_refused_with_its_row_count() -> None:
    df = frame()
    df.loc[[0, 7], "progression"] = "NaN"
    parsed = tabular.DatasetSchema.from_dict(schema(REGRESSION))

    with pytest.raises(tabular.DataValidationError, match=r"missing value at row 1 \(2 rows"):
        tabular.validate_frame(df, parsed)


def test_a_standardised_target_uses_the_federated_mean_and_std_of_all_sites() -> None:
    parsed, data, fitted = prepared(REGRESSION)
    y = frame()["progression"].astype(float).to_numpy()

    assert fitted["target"]["mean"] == pytest.approx(y.mean(), abs=1e-9)
    assert fitted["target"]["std"] == pytest.approx(y.std(), abs=1e-9)
    assert data.y.dtype == np.float64
    assert data.y == pytest.approx((y - y.mean()) / y.std(), abs=1e-9)


def test_a_site_report_without_the_target_statistics_is_refused() -> None:
    parsed = tabular.DatasetSchema.from_dict(schema(REGRESSION))
    report = tabular.local_statistics(frame(), parsed)
    del report["target"]

    with pytest.raises(tabular.SchemaError, match="missing: \\['target'\\]"):
        tabular.merge_statistics([report], parsed)


def test_the_holdout_split_is_stratified_by_class() -> None:
    parsed = tabular.DatasetSchema.from_dict(schema(MULTICLASS))

    train, test = tabular.split_holdout(frame(), parsed, test_fraction=0.25, seed=3)

    for value, count in frame()["severity"].value_counts().items():
        assert (test["severity"] == value).sum() == int(np.floor(count * 0.25 + 0.5))


# --- training, DP-SGD, metrics, ONNX --------------------------------------------------------------


def fit(target: dict, *, dp: bool = False, kind: dict | None = None) -> tuple[Any, ...]:
    parsed_plan = parse_plan(plan(target))
    objective = parsed_plan.objective()
    parsed, data, fitted = prepared(target)
    model = models.build_model(
        kind or {"kind": "mlp", "hidden": [8]},
        data.X.shape[1],
        n_outputs=objective.n_outputs,
        seed=1,
    )
    before = training.evaluate(
        model, data.X, data.y, objective, target_scale=tabular.target_scale(parsed, fitted)
    )
    if dp:
        result = dpsgd.train_dp(
            model,
            data.X,
            data.y,
            epochs=3,
            batch_size=32,
            lr=0.05,
            clip=1.0,
            delta=1e-5,
            noise_multiplier=0.3,
            seed=7,
            optimizer="adam",
            objective=objective,
        )
    else:
        result = training.train_local(
            model, data.X, data.y, epochs=30, batch_size=32, lr=0.05, seed=1, objective=objective
        )
    after = training.evaluate(
        model, data.X, data.y, objective, target_scale=tabular.target_scale(parsed, fitted)
    )
    return model, data, objective, before, after, result


def test_a_multiclass_model_learns_with_softmax_cross_entropy() -> None:
    model, data, objective, before, after, _ = fit(MULTICLASS)

    assert set(after) == {"accuracy", "macro_f1", "weighted_f1", "loss", "n"}
    assert after["accuracy"] > 0.8 > before["accuracy"]
    probs = training.predict(model, data.X, objective)
    assert probs.shape == (240, 4) and probs.sum(axis=1) == pytest.approx(1.0)


@pytest.mark.parametrize("loss", ["mse", "huber"])
def test_a_regression_model_learns_and_reports_in_the_targets_units(loss: str) -> None:
    target = {**REGRESSION}
    spec = plan(target)
    spec["training"]["loss"] = loss
    objective = parse_plan(spec).objective()
    parsed, data, fitted = prepared(target)
    model = models.build_model({"kind": "mlp", "hidden": [8]}, data.X.shape[1], seed=1)

    training.train_local(
        model, data.X, data.y, epochs=30, batch_size=32, lr=0.05, objective=objective
    )
    metrics = training.evaluate(
        model, data.X, data.y, objective, target_scale=tabular.target_scale(parsed, fitted)
    )

    assert metrics["r2"] > 0.9
    assert 5 < metrics["rmse"] < 25  # the noise is 10 in the target's units, not 10 / std


@pytest.mark.parametrize("target", [MULTICLASS, REGRESSION])
def test_dp_sgd_trains_every_task(target: dict) -> None:
    _, _, _, before, after, result = fit(target, dp=True)

    assert result["steps"] == 3 * 8 and result["epsilon"] > 0
    if target is MULTICLASS:
        assert after["accuracy"] > before["accuracy"]
    else:
        assert after["rmse"] < before["rmse"]


def test_class_indices_outside_the_outputs_are_refused_by_training() -> None:
    model = models.build_model({"kind": "logistic_regression"}, 2, n_outputs=3, seed=0)

    with pytest.raises(training.TrainingError, match="class indices 0..2"):
        training.train_local(
            model,
            np.zeros((2, 2)),
            [0, 3],
            epochs=1,
            batch_size=2,
            lr=0.1,
            objective=training.Objective("multiclass", 3, "cross_entropy"),
        )


@pytest.mark.parametrize(
    ("target", "kind", "name", "width"),
    [
        (MULTICLASS, {"kind": "logistic_regression"}, "logits", 4),
        (REGRESSION, {"kind": "mlp", "hidden": [8]}, "prediction", 1),
    ],
)
def test_onnx_export_of_each_task_gives_the_models_outputs(
    target: dict, kind: dict, name: str, width: int
) -> None:
    model, data, objective, *_ = fit(target, kind=kind)

    exported = onnx_export.export_onnx(model, data.X.shape[1], task=objective.task)

    session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
    (output,) = session.get_outputs()
    assert output.name == name
    (got,) = session.run(None, {"features": data.X[:17]})
    with torch.no_grad():
        expected = model.eval()(torch.as_tensor(data.X[:17])).numpy()
    assert got.shape == (17, width)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


# --- the agent ------------------------------------------------------------------------------------


def agent_task(tmp_path: Any, spec: dict[str, Any]) -> tuple[Any, Any]:
    import time

    from clientagent.data import LocalData
    from clientagent.trainer import handle_stats_request
    from fedcore import protocol, tensors

    path = tmp_path / "site.csv"
    frame().to_csv(path, index=False)
    data = LocalData(path)
    parsed = tabular.DatasetSchema.from_dict(spec["schema"])
    stats = handle_stats_request({"run": 5, "plan_hash": "h", "plan": spec}, data)["stats"]
    fitted = tabular.merge_statistics([stats], parsed)
    n_features = len(tabular.feature_names(parsed, fitted))
    state = models.build_model(
        spec["model"], n_features, n_outputs=parsed.target.n_outputs, seed=1
    ).state_dict()
    fields = {
        "run": 5,
        "round": 1,
        "rounds": 2,
        "plan_hash": "h",
        "plan": spec,
        "preprocessing": fitted,
        "deadline": time.time() + 60,
    }
    return data, protocol.BinaryMessage("task", fields, tensors.encode_state_dict(state))


@pytest.mark.parametrize(
    ("target", "keys"),
    [
        (MULTICLASS, {"accuracy", "macro_f1", "weighted_f1", "loss", "n"}),
        (REGRESSION, {"rmse", "mae", "r2", "mean_error", "loss", "n"}),
    ],
)
def test_the_agent_trains_each_task_and_reports_its_metrics(
    tmp_path: Any, target: dict, keys: set[str]
) -> None:
    from clientagent.trainer import handle_task, task_parts
    from fedcore import task_fairness, task_metrics, tensors

    spec = plan(target, fairness={"sensitive_attribute": "sex"})
    spec["training"]["local_epochs"] = 20
    data, task = agent_task(tmp_path, spec)

    update = handle_task(task, data, nonce=lambda: "n" * 32)

    metrics = update.fields["metrics"]
    assert set(metrics["global"]) == keys == set(metrics["local"])
    assert "fairness" not in update.fields  # the binary counts' field; these tasks' parts: wiring
    if target is MULTICLASS:
        assert metrics["local"]["accuracy"] > metrics["global"]["accuracy"]
    else:
        assert metrics["local"]["rmse"] < metrics["global"]["rmse"]
    parsed = parse_plan(spec)
    split = data.split(spec)
    arrays = data.arrays(split, task.fields["preprocessing"])
    model = models.build_model(
        spec["model"], arrays.test.X.shape[1], n_outputs=parsed.schema.target.n_outputs
    )
    model.load_state_dict(tensors.decode_state_dict(update.payload))
    parts = task_parts(model, arrays.test, parsed, task.fields["preprocessing"])
    if target is MULTICLASS:
        report = task_metrics.multiclass_report(parts["metrics"])
        assert report["accuracy"] == pytest.approx(metrics["local"]["accuracy"], abs=1e-12)
        assert set(task_fairness.multiclass_group_report(parts["fairness"]["sex"])["by_group"]) == {
            "F",
            "M",
        }
    else:
        report = task_metrics.regression_report(parts["metrics"])
        assert report["rmse"] == pytest.approx(metrics["local"]["rmse"], abs=1e-9)
        assert set(task_fairness.regression_group_report(parts["fairness"]["sex"])["by_group"]) == {
            "F",
            "M",
        }


def test_the_agent_refuses_a_class_outside_the_list_and_sends_nothing(tmp_path: Any) -> None:
    from clientagent.data import LocalData
    from clientagent.trainer import TaskError, handle_stats_request

    df = frame()
    df.loc[[2, 3], "severity"] = "9"
    path = tmp_path / "site.csv"
    df.to_csv(path, index=False)

    with pytest.raises(TaskError) as caught:
        handle_stats_request(
            {"run": 5, "plan_hash": "h", "plan": plan(MULTICLASS)}, LocalData(path)
        )

    assert caught.value.code == "data_invalid"
    assert "'9' at row 3" in caught.value.reason
    assert "9" not in caught.value.shared_reason.replace("2 rows", "")


@pytest.mark.parametrize(
    ("bad", "problem"),
    [("abc", "not numeric"), ("inf", "not a finite number"), ("-inf", "not a finite number")],
)
def test_the_agent_refuses_a_regression_target_that_is_not_a_finite_number_and_sends_nothing(
    tmp_path: Any, bad: str, problem: str
) -> None:
    from clientagent.data import LocalData
    from clientagent.trainer import TaskError, handle_stats_request

    df = frame()
    df.loc[[4, 8, 15], "progression"] = bad
    path = tmp_path / "site.csv"
    df.to_csv(path, index=False)

    with pytest.raises(TaskError) as caught:  # raised instead of a stats reply: nothing leaves
        handle_stats_request(
            {"run": 5, "plan_hash": "h", "plan": plan(REGRESSION)}, LocalData(path)
        )

    assert caught.value.code == "data_invalid"
    reason = caught.value.reason
    assert f"target column 'progression': 3 rows hold a value that is {problem}" in reason
    assert f"first at row 5: {bad!r}" in reason  # the first example, in the site's own log
    assert repr(bad) not in caught.value.shared_reason  # the value stays at the site


def test_the_agent_refuses_missing_regression_targets_naming_the_rows(tmp_path: Any) -> None:
    from clientagent.data import LocalData
    from clientagent.trainer import TaskError, handle_stats_request

    df = frame()
    df.loc[[2, 9], "progression"] = "NaN"
    path = tmp_path / "site.csv"
    df.to_csv(path, index=False)

    with pytest.raises(TaskError) as caught:
        handle_stats_request(
            {"run": 5, "plan_hash": "h", "plan": plan(REGRESSION)}, LocalData(path)
        )

    assert caught.value.code == "data_invalid"
    assert "'progression'" in caught.value.reason and "2 rows" in caught.value.reason
