"""Plan spec validation: field-level messages for every section, and the silos' schemas."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest

from fedcore.plan import ALLOWED_KEYS
from federation.services.plans import plan_spec_errors

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "tsh", "type": "numeric", "transform": "log1p"},
        {"name": "sex", "type": "categorical"},
    ],
    "target": {"column": "diagnosis", "positive": ["hypo"]},
    "sensitive": ["sex"],
}


def spec(**overrides: Any) -> dict[str, Any]:
    base = {
        "model": {"kind": "mlp", "hidden": [8]},
        "schema": copy.deepcopy(SCHEMA),
        "training": {"rounds": 3, "local_epochs": 1, "batch_size": 32, "lr": 0.01},
        "evaluation": {"test_fraction": 0.2, "seed": 0},
        "aggregation": {"strategy": "fedavg"},
        "min_silos": 2,
        "round_deadline_seconds": 120,
        "seed": 0,
        "privacy": {"mode": "sample", "noise_multiplier": 1.1, "clip": 1.0, "delta": 1e-5},
        "secure_aggregation": True,
        "fairness": {
            "sensitive_attribute": "sex",
            "max_demographic_parity_difference": 0.1,
            "max_equalized_odds_difference": 0.1,
        },
    }
    base.update(overrides)
    return base


def silo(name: str, schema: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, schema=copy.deepcopy(schema or SCHEMA))


def test_a_complete_plan_is_valid() -> None:
    assert plan_spec_errors(spec(), silos=[silo("a"), silo("b")]) == {}


def test_the_optional_sections_may_be_left_out() -> None:
    plan = spec()
    for key in ("privacy", "secure_aggregation", "fairness", "evaluation", "aggregation"):
        del plan[key]

    assert plan_spec_errors(plan) == {}


def test_a_plan_must_be_an_object() -> None:
    assert set(plan_spec_errors([1, 2])) == {"spec"}  # type: ignore[arg-type]


def test_unknown_top_level_keys_are_refused_with_the_allowed_ones() -> None:
    errors = plan_spec_errors(spec(epochs=3))

    assert set(errors) == {"epochs"}
    assert all(key in errors["epochs"] for key in ALLOWED_KEYS)


def test_an_unknown_model_kind_lists_the_allowed_kinds() -> None:
    errors = plan_spec_errors(spec(model={"kind": "xgboost"}))

    assert errors == {
        "model.kind": "unknown model kind 'xgboost'; allowed kinds: logistic_regression, mlp, installed"
    }


def test_the_existing_checks_still_apply() -> None:
    errors = plan_spec_errors(
        spec(
            training={"rounds": 0, "local_epochs": 1, "batch_size": 32, "lr": 20},
            min_silos=0,
            round_deadline_seconds=-1,
            schema={"columns": []},
        )
    )

    assert set(errors) == {
        "training.rounds",
        "training.lr",
        "min_silos",
        "round_deadline_seconds",
        "schema",
    }


@pytest.mark.parametrize(
    ("privacy", "field"),
    [
        ({"mode": "laplace"}, "privacy.mode"),
        ({"mode": "sample", "target_epsilon": 0}, "privacy.target_epsilon"),
        ({"mode": "client", "target_epsilon": -1.0}, "privacy.target_epsilon"),
        ({"mode": "sample", "noise_multiplier": 0}, "privacy.noise_multiplier"),
        ({"mode": "sample", "noise_multiplier": True}, "privacy.noise_multiplier"),
        ({"mode": "sample", "clip": 0}, "privacy.clip"),
        ({"mode": "sample", "clip": None}, "privacy.clip"),
        ({"mode": "client", "delta": 1}, "privacy.delta"),
        ({"mode": "client", "delta": 0}, "privacy.delta"),
        ({"mode": "sample", "noise_multiplier": None, "target_epsilon": None}, "privacy"),
        ({"mode": "none", "epsilon": 3}, "privacy"),
        ("strong", "privacy"),
    ],
)
def test_impossible_privacy_parameters_are_refused(privacy: Any, field: str) -> None:
    errors = plan_spec_errors(spec(privacy=privacy))

    assert set(errors) == {field}


@pytest.mark.parametrize(
    "privacy",
    [
        {"mode": "none"},
        {"mode": "sample"},  # defaults: noise 1.1, epsilon 3, clip 1, delta 1e-5
        {"mode": "client", "noise_multiplier": None, "target_epsilon": 2.0, "clip": 0.5},
        {"mode": "sample", "noise_multiplier": 0.8, "target_epsilon": None, "delta": 1e-6},
    ],
)
def test_possible_privacy_parameters_pass(privacy: dict[str, Any]) -> None:
    assert plan_spec_errors(spec(privacy=privacy)) == {}


def test_secure_aggregation_is_a_boolean() -> None:
    assert set(plan_spec_errors(spec(secure_aggregation="yes"))) == {"secure_aggregation"}


def test_fairness_names_a_sensitive_attribute_of_the_schema() -> None:
    errors = plan_spec_errors(spec(fairness={"sensitive_attribute": "age"}))

    assert errors == {
        "fairness.sensitive_attribute": "'age' is not a sensitive attribute of the plan's "
        "schema (schema.sensitive lists: sex)"
    }


def test_fairness_thresholds_lie_in_0_1() -> None:
    fairness = {
        "sensitive_attribute": "sex",
        "max_demographic_parity_difference": 1.5,
        "max_equalized_odds_difference": -0.1,
        "colour": "red",
    }

    assert set(plan_spec_errors(spec(fairness=fairness))) == {
        "fairness",
        "fairness.max_demographic_parity_difference",
        "fairness.max_equalized_odds_difference",
    }


def test_fewer_silos_than_min_silos() -> None:
    errors = plan_spec_errors(spec(min_silos=3), silos=[silo("a"), silo("b")])

    assert errors == {"silos": "2 silo(s) take part; the plan needs at least 3 (min_silos)"}


def test_every_silo_needs_the_plans_columns_target_and_sensitive_attributes() -> None:
    other = {
        "columns": [
            {"name": "age", "type": "categorical"},
            {"name": "sex", "type": "categorical"},
        ],
        "target": {"column": "outcome", "positive": ["1"]},
    }

    errors = plan_spec_errors(spec(), silos=[silo("good"), silo("odd", other)])

    assert set(errors) == {"silos"}
    message = errors["silos"]
    assert "silo 'odd': column 'age' is categorical, the plan needs numeric" in message
    assert "silo 'odd' has no column 'tsh' (numeric)" in message
    assert "silo 'odd' has no target column 'diagnosis'" in message
    assert "good" not in message


def test_a_silo_without_a_valid_schema_cannot_take_part() -> None:
    errors = plan_spec_errors(spec(min_silos=1), silos=[silo("broken", {"columns": "age"})])

    assert errors == {"silos": "silo 'broken' has no valid registered schema"}


def test_silos_are_only_checked_when_given() -> None:
    assert plan_spec_errors(spec(min_silos=5)) == {}
