"""The final evaluation on the wire and at the site: the evaluate grant's scope, the two
messages' schemas, and the agent's evaluation of the final model (no training)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clientagent.data import LocalData
from clientagent.trainer import TaskError, handle_evaluate
from fedcore import calibration, evaluation, protocol, signing, tabular, tensors
from fedcore.models import build_model
from tests.factories import SCHEMA, plan_spec

PREPROCESSING = {"x": 1}


def _scope(**changes: object) -> dict[str, object]:
    fields: dict[str, object] = {
        "kind": signing.EVALUATE_KIND,
        "rounds": 3,
        "model_version": 3,
        "weights_sha256": "a" * 64,
        "preprocessing": PREPROCESSING,
        "expires_at": datetime.now(UTC) + timedelta(minutes=5),
    }
    fields.update(changes)
    return signing.request_scope(**fields)  # type: ignore[arg-type]


def _check(grant: dict[str, object], **changes: object) -> None:
    received: dict[str, object] = {
        "kind": signing.EVALUATE_KIND,
        "plan_rounds": 3,
        "rounds": 3,
        "model_version": 3,
        "weights_sha256": "a" * 64,
        "preprocessing": PREPROCESSING,
    }
    received.update(changes)
    signing.check_request_scope(grant, **received)  # type: ignore[arg-type]


def test_an_evaluate_grant_covers_exactly_its_model_weights_and_preprocessing() -> None:
    grant = _scope()
    _check(grant)
    with pytest.raises(
        signing.AuthorizationError, match="model v2, but the authorization is for v3"
    ):
        _check(grant, model_version=2)
    with pytest.raises(signing.AuthorizationError, match="changed in transit"):
        _check(grant, weights_sha256="b" * 64)
    with pytest.raises(signing.AuthorizationError, match="preprocessing received"):
        _check(grant, preprocessing={"x": 2})
    with pytest.raises(signing.AuthorizationError, match="has 4 rounds, but the plan has 3"):
        _check(grant, rounds=4)


def test_a_task_grant_is_not_an_evaluate_grant_nor_the_reverse() -> None:
    task = signing.request_scope(
        kind=signing.TASK_KIND,
        rounds=3,
        round=3,
        attempt=1,
        weights_sha256="a" * 64,
        preprocessing=PREPROCESSING,
        expires_at=datetime.now(UTC) + timedelta(minutes=5),
    )
    with pytest.raises(signing.AuthorizationError, match="for a 'task' message, not a 'evaluate'"):
        _check(task)
    with pytest.raises(signing.AuthorizationError, match="for a 'evaluate' message, not a 'task'"):
        signing.check_request_scope(
            _scope(), kind=signing.TASK_KIND, plan_rounds=3, round=3, rounds=3
        )
    with pytest.raises(ValueError, match="needs model_version"):
        _scope(model_version=None)


def test_the_evaluation_message_is_validated_like_every_other() -> None:
    report = {"bins": 2, "positives": [0, 1], "negatives": [1, 0], "loss_sum": 0.2}
    text = protocol.encode_control("evaluation", run=1, model_version=2, evaluation=report)
    assert protocol.decode_control(text)["evaluation"] == report
    bad = text.replace('"model_version":2', '"model_version":"2"')
    with pytest.raises(protocol.InvalidField, match="model_version"):
        protocol.decode_control(bad)
    with pytest.raises(protocol.InvalidField):
        protocol.decode_control(text.replace('"run":1', '"run":1,"round":2'))  # unknown field


def test_the_evaluate_message_round_trips_through_the_binary_frames() -> None:
    message = protocol.BinaryMessage(
        type="evaluate",
        fields={
            "run": 1,
            "rounds": 2,
            "model_version": 2,
            "plan_hash": "p" * 64,
            "plan": {"a": 1},
            "preprocessing": {},
            "deadline": 1.0,
            "authorization": {},
        },
        payload=b"weights",
    )
    reassembler = protocol.Reassembler()
    got = [reassembler.feed(frame) for frame in protocol.encode_binary(message)][-1]
    assert got is not None and got.type == "evaluate" and got.payload == b"weights"


def _site(tmp_path: Path, seed: int = 0, n: int = 100) -> LocalData:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] > 0).astype(int)
    path = tmp_path / "site.csv"
    pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y}).to_csv(path, index=False)
    return LocalData(path)


def _evaluate(data: LocalData, spec: dict[str, object], **fields: object) -> protocol.BinaryMessage:
    split = data.split(spec)
    schema = tabular.DatasetSchema.from_dict(spec["schema"])  # type: ignore[arg-type]
    preprocessing = tabular.merge_statistics(
        [tabular.local_statistics(split.train, schema)], schema
    )
    n_features = len(tabular.feature_names(schema, preprocessing))
    model = build_model({"kind": "logistic_regression"}, n_features, seed=1)
    return protocol.BinaryMessage(
        type="evaluate",
        fields={
            "run": 4,
            "rounds": 2,
            "model_version": 2,
            "plan_hash": "p" * 64,
            "plan": spec,
            "preprocessing": preprocessing,
            "deadline": 1.0,
            "authorization": {},
            **fields,
        },
        payload=tensors.encode_state_dict(model.state_dict()),
    )


def test_the_agent_sends_the_histogram_of_its_held_out_rows_only(tmp_path: Path) -> None:
    spec = plan_spec()
    data = _site(tmp_path)

    reply = handle_evaluate(_evaluate(data, spec), data)

    assert (reply["run"], reply["model_version"]) == (4, 2)
    histogram = evaluation.histogram_from_wire(reply["evaluation"])
    assert histogram.n == 20  # the plan's 20 % held out, never a training row
    assert "fairness" not in reply
    assert set(reply) == {"run", "model_version", "evaluation", "calibration"}
    sums = calibration.calibration_from_wire(reply["calibration"], n=histogram.n)
    assert sum(sums.positives) == sum(histogram.positives)


def test_the_agent_refuses_final_weights_that_do_not_fit_the_plan(tmp_path: Path) -> None:
    spec = plan_spec()
    data = _site(tmp_path)
    message = _evaluate(data, spec)
    wrong = build_model({"kind": "logistic_regression"}, 5, seed=1)
    message = protocol.BinaryMessage(
        type="evaluate",
        fields=message.fields,
        payload=tensors.encode_state_dict(wrong.state_dict()),
    )
    with pytest.raises(TaskError) as caught:
        handle_evaluate(message, data)
    assert caught.value.code == "invalid_task" and caught.value.run == 4


def test_a_secure_plan_sends_no_group_counts_in_clear(tmp_path: Path) -> None:
    schema = {
        **SCHEMA,
        "columns": [*SCHEMA["columns"], {"name": "g", "type": "categorical", "categories": ["a"]}],
        "sensitive": ["g"],
    }
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    path = tmp_path / "g.csv"
    pd.DataFrame(
        {"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": (x[:, 0] > 0).astype(int), "g": "a"}
    ).to_csv(path, index=False)
    data = LocalData(path)
    fairness = {"sensitive_attribute": "g"}
    clear = plan_spec(schema=schema, fairness=fairness)
    secure = plan_spec(schema=schema, fairness=fairness, secure_aggregation=True)

    assert set(handle_evaluate(_evaluate(data, clear), data)["fairness"]) == {"g"}
    assert "fairness" not in handle_evaluate(_evaluate(data, secure), data)
