"""Evaluation plans in the plan language, their JSON Schema and doc table, the calibration sums,
and the site policy an agent applies to them."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from sklearn.calibration import calibration_curve as sklearn_calibration_curve

from clientagent.config import PolicyConfig
from clientagent.policy import check_evaluation_policy
from clientagent.records import APPROVED, REJECTED, Decision
from clientagent.trainer import TaskError, handle_evaluate
from fedcore import calibration, evaluation, protocol, tabular, tensors
from fedcore.models import build_model
from fedcore.plan import (
    PlanError,
    is_evaluation_plan,
    parse_evaluation_plan,
    plan_errors,
    plan_hash,
)
from fedcore.plan.schema import evaluation_plan_json_schema, evaluation_plan_key_table
from tests.factories import SCHEMA as FACTORY_SCHEMA
from tests.factories import plan_spec as training_spec
from tests.unit.test_final_evaluation_wire import _site as site

DOC = Path(__file__).resolve().parents[2] / "docs" / "plan-spec.md"
SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical", "categories": ["F", "M"]},
    ],
    "target": {"column": "died", "positive": ["1"]},
    "sensitive": ["sex"],
}


def spec(**overrides: Any) -> dict[str, Any]:
    base = {
        "kind": "evaluation",
        "schema": copy.deepcopy(SCHEMA),
        "model": {"kind": "logistic_regression"},
        "model_version": {"run": 7, "number": 3, "sha256": "ab" * 32},
    }
    return {**base, **overrides}


def test_a_minimal_evaluation_plan_parses_with_its_defaults() -> None:
    plan = parse_evaluation_plan(spec())

    assert is_evaluation_plan(spec()) and plan_errors(spec()) == {}
    assert (plan.model_version.run, plan.model_version.number) == (7, 3)
    assert plan.rows == "held_out" and plan.evaluation.test_fraction == 0.2
    assert plan.run.min_silos == 1 and plan.run.round_deadline_seconds == 300
    assert plan.fairness is None
    assert "test_fraction 0.2, seed 0" in plan.rows_note
    assert plan_hash(spec()) == plan_hash(json.loads(json.dumps(spec())))


@pytest.mark.parametrize("key", ["training", "aggregation", "privacy", "secure_aggregation"])
def test_training_keys_are_refused_with_the_allowed_keys(key: str) -> None:
    errors = plan_errors(spec(**{key: {}}))

    assert set(errors) == {key}
    assert "trains nothing" in errors[key] and "model_version" in errors[key]


@pytest.mark.parametrize(
    ("change", "path", "words"),
    [
        ({"model_version": None}, "model_version", "registered model version"),
        ({"model_version": {"run": 7, "number": 3}}, "model_version.sha256", "required"),
        (
            {"model_version": {"run": 7, "number": 3, "sha256": "AB" * 32}},
            "model_version.sha256",
            "64 lowercase hex",
        ),
        (
            {"model_version": {"run": 0, "number": 3, "sha256": "ab" * 32}},
            "model_version.run",
            ">= 1",
        ),
        (
            {"model_version": {"run": 7, "number": 3, "sha256": "ab" * 32, "x": 1}},
            "model_version",
            "unknown",
        ),
        ({"rows": "some"}, "rows", "held_out"),
        ({"rows": "all", "evaluation": {"test_fraction": 0.3}}, "evaluation", "rows 'held_out'"),
        ({"model": {"kind": "forest"}}, "model.kind", "unknown model kind"),
        (
            {"fairness": {"sensitive_attribute": "sex", "mitigation": {"kind": "reweighing"}}},
            "fairness.mitigation",
            "trains nothing",
        ),
        (
            {"fairness": {"sensitive_attribute": "race"}},
            "fairness.sensitive_attribute",
            "not a sensitive attribute",
        ),
    ],
)
def test_a_bad_evaluation_plan_is_refused_naming_the_key(
    change: dict[str, Any], path: str, words: str
) -> None:
    with pytest.raises(PlanError) as caught:
        parse_evaluation_plan(spec(**change))

    assert path in caught.value.errors, caught.value.errors
    assert words in caught.value.errors[path]


def test_fairness_with_dp_counts_is_accepted() -> None:
    plan = parse_evaluation_plan(
        spec(fairness={"sensitive_attribute": "sex", "dp_epsilon": 1.0}, rows="all")
    )

    assert plan.fairness is not None and plan.fairness.dp_epsilon == 1.0
    assert plan.rows_note == "all rows of every site"


def test_the_json_schema_accepts_a_valid_plan_and_refuses_unknown_keys() -> None:
    validator = Draft202012Validator(evaluation_plan_json_schema())

    validator.validate(spec(rows="all", fairness={"sensitive_attribute": "sex"}))
    assert not validator.is_valid(spec(training={"rounds": 1}))
    assert not validator.is_valid(spec(model_version={"run": 1, "number": 0, "sha256": "x"}))


def test_the_key_table_in_the_doc_is_the_generated_one() -> None:
    text = DOC.read_text()
    start, end = "<!-- evaluation-key-table:start -->\n", "<!-- evaluation-key-table:end -->"
    table = text.split(start)[1].split(end)[0]

    assert table == evaluation_plan_key_table()


def test_the_docs_evaluation_plan_parses() -> None:
    text = DOC.read_text()
    body = text.split("<!-- evaluation-example:start -->\n```json\n")[1].split("```")[0]

    parse_evaluation_plan(json.loads(body))


# -- calibration sums ------------------------------------------------------------------------


def sites(seed: int = 3) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for n in (50, 120, 7):
        p = rng.beta(2, 3, size=n)
        p[:2] = [0.0, 1.0]  # the edges land in the first and last bin
        y = (rng.random(n) < p).astype(float)
        out.append((y, p))
    return out


def test_pooled_calibration_sums_equal_the_pooled_rows_curve() -> None:
    parts = sites()
    y = np.concatenate([y for y, _ in parts])
    p = np.concatenate([p for _, p in parts])

    merged = calibration.merge_calibration(calibration.site_calibration(y, p) for y, p in parts)
    curve = calibration.calibration_curve(merged)

    observed, predicted = sklearn_calibration_curve(y, p, n_bins=10, strategy="uniform")
    rows = [row for row in curve["rows"] if row["count"]]
    assert [row["observed_rate"] for row in rows] == pytest.approx(observed, abs=1e-12)
    assert [row["mean_predicted"] for row in rows] == pytest.approx(predicted, abs=1e-12)
    assert curve["n"] == len(y) and merged.positives == calibration.site_calibration(y, p).positives
    index = calibration.calibration_bins(p)
    ece = sum(
        (index == b).mean() * abs(p[index == b].mean() - y[index == b].mean())
        for b in range(10)
        if (index == b).any()
    )
    assert curve["expected_calibration_error"] == pytest.approx(ece, abs=1e-12)


def test_calibration_sums_survive_the_wire_and_bad_ones_are_refused() -> None:
    y, p = sites()[1]
    wire = calibration.site_calibration(y, p).to_wire()

    assert calibration.calibration_from_wire(json.loads(json.dumps(wire)), n=len(y)).n == len(y)
    bad_cases = [
        ({"positives": [wire["count"][0] + 1, *wire["positives"][1:]]}, "more than the bin"),
        ({"prob_sum": [wire["prob_sum"][0] + 50, *wire["prob_sum"][1:]]}, "must lie between"),
        ({"grid": "quantile"}, "binned on"),
        ({"count": wire["count"][:-1]}, "list of 10"),
        ({"extra": 1}, "unknown key"),
    ]
    for change, words in bad_cases:
        with pytest.raises(calibration.CalibrationReportError, match=words):
            calibration.calibration_from_wire({**wire, **change}, n=len(y))
    with pytest.raises(calibration.CalibrationReportError, match="score histogram"):
        calibration.calibration_from_wire(wire, n=len(y) + 1)


# -- the site's policy ------------------------------------------------------------------------


def check(policy: PolicyConfig, decision: Decision | None = None, **changes: Any) -> None:
    check_evaluation_policy(
        spec(**changes),
        "h" * 64,
        policy=policy,
        config_path=Path("site.toml"),
        decision=decision,
        run=5,
    )


def decided(verdict: str) -> Decision:
    return Decision(time="t", plan_hash="h" * 64, decision=verdict, reason="", operator="op")


def test_an_evaluation_plan_meets_the_sites_model_policy_and_local_decision_only() -> None:
    # No training: the DP and secure-aggregation requirements do not apply.
    check(PolicyConfig(require_dp=True, require_secure_aggregation=True, max_epsilon_total=1.0))
    check(PolicyConfig(require_local_approval=True), decided(APPROVED))

    with pytest.raises(TaskError) as caught:
        check(PolicyConfig(allowed_models=("mlp",)))
    assert caught.value.code == "policy_refused" and "logistic_regression" in str(caught.value)
    with pytest.raises(TaskError):
        check(PolicyConfig(require_local_approval=True))
    with pytest.raises(TaskError):
        check(PolicyConfig(), decided(REJECTED))


# -- the agent's evaluation of an evaluation plan ------------------------------------------------


def evaluate_request(
    data: Any, eval_spec: dict[str, Any], *, weights: bytes | None = None
) -> protocol.BinaryMessage:
    split = data.split(training_spec())
    schema = tabular.DatasetSchema.from_dict(FACTORY_SCHEMA)
    preprocessing = tabular.merge_statistics(
        [tabular.local_statistics(split.train, schema)], schema
    )
    n_features = len(tabular.feature_names(schema, preprocessing))
    payload = tensors.encode_state_dict(
        build_model({"kind": "logistic_regression"}, n_features, seed=1).state_dict()
    )
    eval_spec = {
        **eval_spec,
        "model_version": {**eval_spec["model_version"], "sha256": tensors.sha256_hex(payload)},
    }
    return protocol.BinaryMessage(
        type="evaluate",
        fields={
            "run": 9,
            "rounds": 1,
            "model_version": 0,
            "plan_hash": "p" * 64,
            "plan": eval_spec,
            "preprocessing": preprocessing,
            "deadline": 1.0,
            "authorization": {},
        },
        payload=weights if weights is not None else payload,
    )


def factory_eval_spec(**overrides: Any) -> dict[str, Any]:
    return spec(schema=FACTORY_SCHEMA, **overrides)


@pytest.mark.parametrize(("rows", "n"), [("held_out", 20), ("all", 100)])
def test_the_agent_evaluates_the_held_out_split_or_every_row(
    tmp_path: Path, rows: str, n: int
) -> None:
    data = site(tmp_path)
    changes: dict[str, Any] = {"rows": rows}
    if rows == "held_out":
        changes["evaluation"] = {"test_fraction": 0.2, "seed": 0}

    reply = handle_evaluate(evaluate_request(data, factory_eval_spec(**changes)), data)

    assert evaluation.histogram_from_wire(reply["evaluation"]).n == n
    assert calibration.calibration_from_wire(reply["calibration"], n=n).n == n


def test_the_agent_refuses_weights_other_than_the_plans(tmp_path: Path) -> None:
    data = site(tmp_path)
    message = evaluate_request(data, factory_eval_spec())
    other = build_model({"kind": "logistic_regression"}, 3, seed=2).state_dict()
    message = protocol.BinaryMessage(
        type="evaluate", fields=message.fields, payload=tensors.encode_state_dict(other)
    )

    with pytest.raises(TaskError) as caught:
        handle_evaluate(message, data)

    assert caught.value.code == "invalid_task" and "not the model version" in str(caught.value)
