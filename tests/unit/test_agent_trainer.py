"""The agent's request handlers without any network (clientagent.trainer, clientagent.data)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from clientagent.data import LocalData
from clientagent.trainer import (
    DATA_INVALID,
    INVALID_TASK,
    TaskError,
    TrainingCancelled,
    check_plan,
    handle_stats_request,
    handle_task,
    mitigation_targets,
)
from fedcore import models, protocol, tabular, tensors
from fedcore.fairness_mitigation import ExampleWeights

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
        {"name": "smoker", "type": "boolean"},
    ],
    "target": {"column": "outcome", "positive": ["sick"]},
    "sensitive": ["sex"],
}
PLAN = {
    "model": {"kind": "mlp", "hidden": [8]},
    "schema": SCHEMA,
    "training": {"rounds": 3, "local_epochs": 2, "batch_size": 32, "optimizer": "adam", "lr": 0.01},
    "evaluation": {"test_fraction": 0.25, "seed": 0},
    "seed": 7,
}


def write_data(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    age = rng.normal(50, 10, n).round(1)
    sex = rng.choice(["F", "M"], n)
    logit = (age - 50) / 10 + (sex == "F") * 0.5
    outcome = np.where(rng.random(n) < 1 / (1 + np.exp(-logit)), "sick", "healthy")
    frame = pd.DataFrame(
        {"age": age, "sex": sex, "smoker": rng.choice(["yes", "no"], n), "outcome": outcome}
    )
    frame.to_csv(path, index=False)
    return path


def make_task(data: LocalData, *, plan=PLAN, round_: int = 1, state=None) -> protocol.BinaryMessage:
    """A task as the server would send it: fitted preprocessing from this site's statistics."""
    schema = tabular.DatasetSchema.from_dict(plan["schema"])
    stats = handle_stats_request({"run": 5, "plan_hash": "h", "plan": plan}, data)["stats"]
    fitted = tabular.merge_statistics([stats], schema)
    if state is None:
        n_features = len(tabular.feature_names(schema, fitted))
        state = models.build_model(plan["model"], n_features, seed=1).state_dict()
    fields = {
        "run": 5,
        "round": round_,
        "rounds": 3,
        "plan_hash": "h",
        "plan": plan,
        "preprocessing": fitted,
        "deadline": time.time() + 60,
    }
    return protocol.BinaryMessage("task", fields, tensors.encode_state_dict(state))


@pytest.fixture
def data(tmp_path) -> LocalData:
    return LocalData(write_data(tmp_path / "data.csv"))


def test_update_has_the_global_models_tensors_and_the_promised_fields(data):
    task = make_task(data)
    global_state = tensors.decode_state_dict(task.payload)

    update = handle_task(task, data, silo="site-a")

    assert update.type == "update"
    state = tensors.decode_state_dict(update.payload)
    tensors.check_compatible(state, global_state)  # same keys, shapes and dtypes
    assert tensors.signature(state) == tensors.signature(global_state)
    assert not torch.equal(state["fc1.weight"], global_state["fc1.weight"])  # it trained
    split = data.split(PLAN)
    assert update.fields["num_examples"] == len(split.train)
    assert len(split.train) + len(split.test) == 200 and 45 <= len(split.test) <= 55
    assert update.fields["run"] == 5 and update.fields["round"] == 1
    assert update.fields["silo"] == "site-a"
    assert len(update.fields["nonce"]) == 32
    metrics = update.fields["metrics"]
    assert set(metrics) == {"global", "local", "train_loss", "global_train_loss", "timing"}
    timing = metrics["timing"]
    assert set(timing) == {"train_seconds", "compute_seconds"}
    assert 0 < timing["train_seconds"] <= timing["compute_seconds"]
    assert metrics["global"]["n"] == metrics["local"]["n"] == len(split.test)
    assert metrics["local"]["loss"] < metrics["global"]["loss"]
    # The update goes through the wire codec as is.
    frames = protocol.encode_binary(update, max_frame_bytes=1024)
    reassembler = protocol.Reassembler()
    assert [reassembler.feed(frame) for frame in frames][-1] == update


def test_same_task_gives_the_same_weights(data):
    task = make_task(data)

    first = handle_task(task, data, nonce=lambda: "0" * 32)
    second = handle_task(task, data, nonce=lambda: "0" * 32)

    assert first.payload == second.payload
    for update in (first, second):
        update.fields["metrics"].pop("timing")  # wall-clock durations: the only difference
    assert first.fields == second.fields


def test_seed_depends_on_the_round(data):
    first = handle_task(make_task(data, round_=1), data)
    second = handle_task(make_task(data, round_=2), data)

    assert first.payload != second.payload


def test_wrong_shaped_global_model_is_refused_as_invalid_task(data):
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    stats = handle_stats_request({"run": 5, "plan_hash": "h", "plan": PLAN}, data)["stats"]
    n_features = len(tabular.feature_names(schema, tabular.merge_statistics([stats], schema)))
    wrong = models.build_model({"kind": "mlp", "hidden": [8]}, n_features + 1, seed=1)

    with pytest.raises(TaskError) as info:
        handle_task(make_task(data, state=wrong.state_dict()), data)

    assert info.value.code == INVALID_TASK
    assert "fc1.weight" in info.value.reason
    assert info.value.to_fields() == {
        "code": "invalid_task",
        "reason": info.value.reason,
        "run": 5,
        "round": 1,
    }


def test_global_model_with_other_dtypes_is_refused(data):
    task = make_task(data)
    doubled = {k: v.double() for k, v in tensors.decode_state_dict(task.payload).items()}

    with pytest.raises(TaskError, match="dtype float64, expected float32") as info:
        handle_task(make_task(data, state=doubled), data)
    assert info.value.code == INVALID_TASK


def test_undecodable_payload_and_bad_model_spec_are_invalid_task(data):
    task = make_task(data)
    garbage = protocol.BinaryMessage("task", task.fields, b"not safetensors")
    bad_plan = {**PLAN, "model": {"kind": "transformer"}}
    bad_spec = protocol.BinaryMessage("task", {**task.fields, "plan": bad_plan}, task.payload)

    for broken in (garbage, bad_spec):
        with pytest.raises(TaskError) as info:
            handle_task(broken, data)
        assert info.value.code == INVALID_TASK


def test_stats_cover_the_train_split_only(data):
    reply = handle_stats_request({"run": 9, "plan_hash": "h", "plan": PLAN}, data)

    split = data.split(PLAN)
    assert reply["run"] == 9
    stats = reply["stats"]
    assert stats["n_rows"] == len(split.train) < 200
    assert stats["numeric"]["age"]["count"] == len(split.train)
    assert stats["numeric"]["age"]["mean"] == pytest.approx(split.train["age"].mean())
    assert stats["numeric"]["age"]["mean"] != pytest.approx(data.load()["age"].astype(float).mean())


def test_invalid_data_names_the_column_in_stats_and_tasks(tmp_path):
    good = LocalData(write_data(tmp_path / "good.csv"))
    task = make_task(good)
    frame = pd.read_csv(tmp_path / "good.csv", dtype=str)
    frame.loc[16, "age"] = "abc"
    frame.to_csv(tmp_path / "bad.csv", index=False)
    bad = LocalData(tmp_path / "bad.csv")

    with pytest.raises(TaskError) as stats_error:
        handle_stats_request({"run": 5, "plan_hash": "h", "plan": PLAN}, bad)
    with pytest.raises(TaskError) as task_error:
        handle_task(task, bad)

    for info in (stats_error, task_error):
        assert info.value.code == DATA_INVALID
        assert "'age'" in info.value.reason
        assert "abc" in info.value.reason  # the operator sees the bad value in the local log
        shared = info.value.to_fields()["reason"]
        assert "'age'" in shared and "row 17" in shared and "abc" not in shared
    assert stats_error.value.to_fields()["run"] == 5


def test_plan_with_unusable_schema_is_invalid_task(data):
    plan = {**PLAN, "schema": {"columns": [], "target": {"column": "outcome"}}}

    with pytest.raises(TaskError) as info:
        handle_stats_request({"run": 5, "plan_hash": "h", "plan": plan}, data)
    assert info.value.code == INVALID_TASK


def test_split_is_cached_until_the_file_changes(data):
    first = data.split(PLAN)
    assert data.split(PLAN) is first
    assert data.split({**PLAN, "model": {"kind": "logistic_regression"}}) is first

    stat = data.path.stat()
    os.utime(data.path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    reloaded = data.split(PLAN)

    assert reloaded is not first
    pd.testing.assert_frame_equal(reloaded.train, first.train)


def test_arrays_are_cached_per_preprocessing(data):
    task = make_task(data)
    split = data.split(PLAN)
    arrays = data.arrays(split, task.fields["preprocessing"])

    assert data.arrays(split, dict(task.fields["preprocessing"])) is arrays
    other = {**task.fields["preprocessing"]}
    other["numeric"] = {"age": {"mean": 0.0, "std": 1.0, "count": 1}}
    assert data.arrays(split, other) is not arrays


def test_observer_sees_every_step_and_cancel_stops_training(data):
    task = make_task(data)
    seen: list[tuple[int, int]] = []
    started: dict[str, int] = {}

    class Observer:
        def started(self, *, rows, epochs, steps):
            started.update(rows=rows, epochs=epochs, steps=steps)

        def step(self, step, total):
            seen.append((step, total))

        def finished(self, *, train_loss):
            started["loss"] = train_loss

    handle_task(task, data, observer=Observer())
    rows = len(data.split(PLAN).train)
    steps = 2 * -(-rows // 32)
    assert started["rows"] == rows and started["epochs"] == 2 and started["steps"] == steps
    assert seen == [(i, steps) for i in range(1, steps + 1)]
    assert started["loss"] > 0

    cancel = threading.Event()
    cancel.set()
    with pytest.raises(TrainingCancelled):
        handle_task(task, data, cancel=cancel)


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"lr": 0}, "training.lr"),
        ({"local_epochs": True}, "training.local_epochs"),
        ({"momentum": 0.9}, "training.momentum"),
        ({"optimizer": "lbfgs"}, "training.optimizer"),
    ],
)
def test_unusable_training_settings_are_invalid_task(data, change, named):
    plan = {**PLAN, "training": {**PLAN["training"], **change}}

    with pytest.raises(TaskError, match=named) as info:
        handle_task(make_task(data, plan=plan), data)
    assert info.value.code == INVALID_TASK


# --- loss weights of a fairness mitigation (reweighing, constraint) ---------------------------

MITIGATED = {
    **PLAN,
    "fairness": {"sensitive_attribute": "sex", "mitigation": {"kind": "reweighing"}},
}


def unit_weights() -> ExampleWeights:
    return ExampleWeights({g: {0: (0, 1.0), 1: (1, 1.0)} for g in ("F", "M")})


UNMITIGATED = {**PLAN, "fairness": {"sensitive_attribute": "sex"}}


def test_unit_weights_give_the_model_of_the_plain_loss(data):
    plain = make_task(data, plan=UNMITIGATED)
    unit = make_task(data, plan=MITIGATED)

    default = handle_task(plain, data, nonce=lambda: "0" * 32)
    weighted = handle_task(unit, data, nonce=lambda: "0" * 32, example_weights=unit_weights())

    assert default.payload == handle_task(plain, data, nonce=lambda: "0" * 32).payload
    assert weighted.payload == default.payload


def test_a_reweighing_task_trains_on_the_weights_it_carries_and_never_without(data):
    task = make_task(data, plan=MITIGATED)
    weights = ExampleWeights({"F": {0: (0, 3.0), 1: (1, 0.2)}, "M": {0: (0, 0.5), 1: (1, 2.0)}})
    carried = protocol.BinaryMessage(
        "task", {**task.fields, "example_weights": weights.to_json()}, task.payload
    )

    given = handle_task(task, data, nonce=lambda: "0" * 32, example_weights=weights)
    assert handle_task(carried, data, nonce=lambda: "0" * 32).payload == given.payload
    with pytest.raises(TaskError, match="carries no example weights") as refused:
        handle_task(task, data)
    assert refused.value.code == "invalid_task"
    bad = protocol.BinaryMessage("task", {**task.fields, "example_weights": {}}, task.payload)
    with pytest.raises(TaskError, match="example weights must be a non-empty mapping"):
        handle_task(bad, data)


def test_the_stats_reply_of_a_reweighing_plan_counts_training_rows_per_group_and_label(data):
    request = {"run": 5, "plan_hash": "h", "plan": MITIGATED}
    reply = handle_stats_request(request, data)
    assert "label_counts" not in handle_stats_request({**request, "plan": UNMITIGATED}, data)
    split = data.split(MITIGATED)
    y, groups = tabular.transform_labels(split.train, split.schema)
    counts = reply["label_counts"]
    for group in ("F", "M"):
        rows = groups["sex"] == group
        assert counts[group] == {
            "negatives": int((y[rows] == 0).sum()),
            "positives": int((y[rows] == 1).sum()),
        }
    assert sum(sum(c.values()) for c in counts.values()) == reply["stats"]["n_rows"]


def test_reweighing_weights_change_the_local_model_and_weigh_each_group_and_label(data):
    task = make_task(data, plan=MITIGATED)
    weights = ExampleWeights({"F": {0: (0, 3.0), 1: (1, 0.2)}, "M": {0: (0, 0.5), 1: (1, 2.0)}})

    weighted = handle_task(task, data, nonce=lambda: "0" * 32, example_weights=weights)
    default = handle_task(make_task(data, plan=UNMITIGATED), data, nonce=lambda: "0" * 32)

    assert weighted.payload != default.payload
    parsed = check_plan(MITIGATED)
    split = data.split(MITIGATED)
    train = data.arrays(split, task.fields["preprocessing"]).train
    labels, w = mitigation_targets(parsed, train, weights)
    female = train.groups["sex"] == "F"
    assert set(w[female & (train.y == 0)]) == {3.0} and set(w[~female & (train.y == 1)]) == {2.0}
    assert np.array_equal(labels, train.y)


def test_weights_for_a_plan_without_a_weighted_mitigation_are_refused(data):
    with pytest.raises(TaskError, match="mitigation kind is 'none'") as refused:
        handle_task(make_task(data), data, example_weights=unit_weights())
    assert refused.value.code == "invalid_task"
    only_f = ExampleWeights({"F": {0: (0, 1.0), 1: (1, 1.0)}})
    with pytest.raises(TaskError, match="no cell for group '__other__', label 0") as missing:
        handle_task(make_task(data, plan=MITIGATED), data, example_weights=only_f)
    assert "such row" in missing.value.reason  # the local log says how many rows
    assert "such row" not in missing.value.to_fields()["reason"]  # the server is not told
