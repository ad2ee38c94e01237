"""Plan options for data a site prepares itself: unscaled numeric columns, a split fixed by a
column of the data, and a fixed number of local optimizer steps per round (FLamby's setting)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clientagent.data import LocalData, PlanError
from clientagent.trainer import (
    DATA_INVALID,
    INVALID_TASK,
    TaskError,
    handle_stats_request,
    handle_task,
)
from fedcore import models, plan, protocol, tabular, tensors, training
from fedcore.plan import plan_errors

SCHEMA = {
    "columns": [
        {"name": "f0", "type": "numeric", "scale": "none"},
        {"name": "f1", "type": "numeric"},
    ],
    "target": {"column": "y", "positive": ["1"]},
}
PLAN = {
    "model": {"kind": "logistic_regression"},
    "schema": SCHEMA,
    "training": {
        "rounds": 2,
        "local_epochs": 1,
        "local_steps": 7,
        "batch_size": 4,
        "optimizer": "sgd",
        "lr": 0.01,
    },
    "evaluation": {"split_column": "part"},
    "seed": 3,
}


def frame(n: int = 30) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame(
        {
            "f0": rng.normal(5.0, 2.0, n).round(3),
            "f1": rng.normal(-3.0, 4.0, n).round(3),
            "y": np.arange(n) % 2,
            "part": ["test" if i % 3 == 0 else "train" for i in range(n)],
        }
    )


def schema() -> tabular.DatasetSchema:
    return tabular.DatasetSchema.from_dict(SCHEMA)


# --- scale "none" ------------------------------------------------------------------------------


def test_an_unscaled_column_keeps_its_values_and_imputes_the_federated_mean() -> None:
    df = frame().astype(str)
    df.loc[1, "f0"] = ""
    fitted = tabular.merge_statistics([tabular.local_statistics(df, schema())], schema())
    data = tabular.transform(df, schema(), fitted)

    kept = df["f0"].replace("", np.nan).astype(float).to_numpy()
    assert np.allclose(data.X[[0, 2, 3], 0], kept[[0, 2, 3]], atol=1e-5)
    assert data.X[1, 0] == pytest.approx(fitted["numeric"]["f0"]["mean"], abs=1e-5)
    # the other column is still standardised with the federated statistics
    assert abs(float(data.X[:, 1].mean())) < 1e-5
    assert float(data.X[:, 1].std()) == pytest.approx(1.0, abs=1e-4)


def test_scale_is_checked_and_left_out_of_the_json_when_default() -> None:
    with pytest.raises(tabular.SchemaError, match="scale 'robust' is not supported"):
        tabular.ColumnSpec(name="a", type="numeric", scale="robust")
    with pytest.raises(tabular.SchemaError, match="numeric columns only"):
        tabular.ColumnSpec(name="a", type="categorical", scale="none")
    plain = {"name": "a", "type": "numeric", "transform": "none", "missing": "impute"}
    assert tabular.ColumnSpec.from_dict(plain).to_dict() == plain  # old schemas hash the same
    assert tabular.ColumnSpec.from_dict({**plain, "scale": "none"}).to_dict()["scale"] == "none"


# --- split_by_column ---------------------------------------------------------------------------


def test_split_by_column_follows_the_column() -> None:
    df = frame()
    train, test = tabular.split_by_column(df, schema(), "part")

    assert list(test.index) == [i for i in range(30) if i % 3 == 0]
    assert list(train.index) == [i for i in range(30) if i % 3 != 0]
    assert "part" not in train.columns  # never a feature


def test_split_by_column_refuses_bad_values_and_schema_columns() -> None:
    df = frame()
    df.loc[4, "part"] = "validation"
    with pytest.raises(tabular.DataValidationError, match="row 5 is neither") as info:
        tabular.split_by_column(df, schema(), "part")
    assert "validation" not in info.value.shareable
    with pytest.raises(tabular.DataValidationError, match="missing from the data"):
        tabular.split_by_column(frame().drop(columns="part"), schema(), "part")
    with pytest.raises(ValueError, match="feature, target or sensitive"):
        tabular.split_by_column(frame(), schema(), "y")


def test_local_data_uses_the_plans_split_column(tmp_path: Path) -> None:
    frame().to_csv(tmp_path / "data.csv", index=False)
    data = LocalData(tmp_path / "data.csv")

    split = data.split(PLAN)
    assert len(split.test) == 10 and len(split.train) == 20
    with pytest.raises(PlanError, match="split_column"):
        data.split({**PLAN, "evaluation": {"split_column": "f1"}})


# --- local steps -------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 5, 12, 23])
def test_train_local_takes_exactly_the_steps_asked(steps: int) -> None:
    X = torch.randn(20, 3)
    y = (X[:, 0] > 0).float()
    model = models.build_model({"kind": "logistic_regression"}, 3, seed=0)
    seen: list[tuple[int, int]] = []

    result = training.train_local(
        model,
        X,
        y,
        epochs=99,
        batch_size=4,
        lr=0.1,
        optimizer="sgd",
        steps=steps,
        on_batch=lambda step, total: seen.append((step, total)),
    )

    assert result["steps"] == steps == len(seen)
    assert seen[-1] == (steps, steps)
    assert result["epochs"] == math.ceil(steps / 5)
    assert math.isfinite(result["train_loss"])
    with pytest.raises(training.TrainingError, match="steps must be"):
        training.train_local(model, X, y, epochs=1, batch_size=4, lr=0.1, steps=0)


def test_steps_of_whole_passes_train_as_those_epochs_do() -> None:
    X = torch.randn(20, 3)
    y = (X[:, 1] > 0).float()
    a = models.build_model({"kind": "logistic_regression"}, 3, seed=0)
    b = models.build_model({"kind": "logistic_regression"}, 3, seed=0)
    kwargs = {"batch_size": 4, "lr": 0.1, "optimizer": "sgd", "seed": 5}

    ra = training.train_local(a, X, y, epochs=3, **kwargs)
    rb = training.train_local(b, X, y, epochs=1, steps=15, **kwargs)

    assert ra == rb
    assert all(torch.equal(pa, pb) for pa, pb in zip(a.parameters(), b.parameters(), strict=True))


def test_the_agent_trains_the_plans_local_steps_on_the_sites_split(tmp_path: Path) -> None:
    frame().to_csv(tmp_path / "data.csv", index=False)
    data = LocalData(tmp_path / "data.csv")
    stats = handle_stats_request({"run": 1, "plan_hash": "h", "plan": PLAN}, data)["stats"]
    assert stats["n_rows"] == 20  # the train part the column names
    fitted = tabular.merge_statistics([stats], schema())
    state = models.build_model(PLAN["model"], 2, seed=1).state_dict()
    task = protocol.BinaryMessage(
        "task",
        {
            "run": 1,
            "round": 1,
            "rounds": 2,
            "plan_hash": "h",
            "plan": PLAN,
            "preprocessing": fitted,
            "deadline": time.time() + 60,
        },
        tensors.encode_state_dict(state),
    )

    class Observer:
        def started(self, *, rows: int, epochs: int, steps: int) -> None:
            self.planned = (rows, epochs, steps)

        def step(self, step: int, total: int) -> None:
            self.last = (step, total)

        def finished(self, *, train_loss: float) -> None:
            pass

    observer = Observer()
    update = handle_task(task, data, observer=observer)

    assert update.fields["num_examples"] == 20
    assert update.fields["metrics"]["local"]["n"] == 10
    assert observer.planned == (20, 2, 7) and observer.last == (7, 7)
    bad = {**PLAN, "evaluation": {"split_column": "y"}}
    with pytest.raises(TaskError) as info:
        handle_task(
            protocol.BinaryMessage("task", {**task.fields, "plan": bad}, task.payload), data
        )
    assert info.value.code in (INVALID_TASK, DATA_INVALID)


def test_local_steps_are_refused_with_differential_privacy() -> None:
    dp_plan = {**PLAN, "privacy": {"mode": "sample", "noise_multiplier": 1.0}}
    # the plan language refuses it, at proposal and at every site's task alike
    with pytest.raises(plan.PlanError, match="local_steps is not supported"):
        plan.parse_plan(dp_plan)


# --- the plan spec -----------------------------------------------------------------------------


def test_the_plan_spec_accepts_and_checks_the_new_options() -> None:
    assert plan_errors(PLAN) == {}
    steps0 = {**PLAN, "training": {**PLAN["training"], "local_steps": 0}}
    assert "training.local_steps" in plan_errors(steps0)
    dp = {**PLAN, "privacy": {"mode": "sample", "noise_multiplier": 1.0}}
    assert "differential privacy" in plan_errors(dp)["training.local_steps"]
    blank = {**PLAN, "evaluation": {"split_column": " "}}
    assert "evaluation.split_column" in plan_errors(blank)
    scale = {
        **PLAN,
        "schema": {**SCHEMA, "columns": [{"name": "f0", "type": "numeric", "scale": "minmax"}]},
    }
    assert "scale 'minmax'" in plan_errors(scale)["schema"]
