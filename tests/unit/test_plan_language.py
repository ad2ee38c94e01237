"""The plan language (fedcore.plan): typed, frozen settings with defaults, every problem at once,
unknown keys refused in every section, and the rules that once only the agent applied."""

from __future__ import annotations

import dataclasses

import pytest

from fedcore.plan import PlanError, parse_plan, plan_errors
from tests.factories import plan_spec


def training(**changes: object) -> dict[str, object]:
    return {**plan_spec()["training"], **changes}


def test_a_plan_parses_into_frozen_sections_with_the_defaults() -> None:
    plan = parse_plan(plan_spec())

    assert plan.training.rounds == 2 and plan.training.momentum == 0.0
    assert plan.training.weight_decay == 0.0 and plan.training.local_steps is None
    assert plan.privacy.mode == "none" and not plan.privacy.dp
    assert plan.privacy.section()["noise_multiplier"] == 1.1
    assert plan.aggregation.server_spec() == {"strategy": "fedavg"}
    assert plan.secagg is None and plan.fairness is None
    assert not plan.compression.compressed
    assert plan.run.round_retries == 2 and plan.run.wait_for_silos_seconds == 120.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.training.lr = 1.0  # type: ignore[misc]


def test_fedprox_trains_with_mu_and_averages_at_the_server() -> None:
    plan = parse_plan(plan_spec(aggregation={"strategy": "fedprox"}))

    assert plan.aggregation.prox_mu == 0.01
    assert plan.aggregation.server_spec() == {"strategy": "fedavg"}


@pytest.mark.parametrize(
    ("section", "value"),
    [
        ("training", training(zz=1)),
        ("evaluation", {"test_fraction": 0.2, "zz": 1}),
        ("privacy", {"mode": "client", "zz": 1}),
        ("secagg", {"zz": 1}),
        ("fairness", {"sensitive_attribute": "x1", "zz": 1}),
        ("compression", {"method": "none", "zz": 1}),
        ("aggregation", {"strategy": "fedadam", "zz": 1}),
        ("model", {"kind": "logistic_regression", "zz": 1}),
    ],
)
def test_unknown_keys_are_refused_in_every_section_with_the_allowed_keys(
    section: str, value: dict[str, object]
) -> None:
    errors = plan_errors(plan_spec(**{section: value}))

    assert section in errors, errors
    assert "'zz'" in errors[section] and "allowed" in errors[section]


def test_unknown_keys_of_adaptive_clipping_are_refused() -> None:
    privacy = {"mode": "client", "adaptive_clip": {"target_quantile": 0.5, "zz": 1}}

    errors = plan_errors(plan_spec(privacy=privacy))

    assert "'zz'" in errors["privacy.adaptive_clip"]
    assert "target_quantile, learning_rate, count_noise_std" in errors["privacy.adaptive_clip"]


SAMPLE = {"mode": "sample", "noise_multiplier": 1.1}


@pytest.mark.parametrize(
    ("changes", "path", "words"),
    [
        ({"training": training(optimizer="sgd", momentum=1.0)}, "training.momentum", "[0, 1)"),
        ({"training": training(optimizer="sgd", momentum=-0.1)}, "training.momentum", "[0, 1)"),
        ({"training": training(momentum=0.9)}, "training.momentum", "'sgd' only"),
        ({"training": training(weight_decay=-0.01)}, "training.weight_decay", ">= 0"),
        (
            {"privacy": SAMPLE, "aggregation": {"strategy": "fedprox"}},
            "aggregation.strategy",
            "FedProx with DP-SGD",
        ),
        (
            {"privacy": SAMPLE, "aggregation": {"strategy": "qfedavg", "lipschitz": 10}},
            "aggregation.strategy",
            "q-FedAvg with DP-SGD",
        ),
    ],
)
def test_what_every_agent_refused_is_refused_at_proposal(
    changes: dict[str, object], path: str, words: str
) -> None:
    errors = plan_errors(plan_spec(**changes))

    assert set(errors) == {path}
    assert words in errors[path]


def test_every_problem_is_reported_at_once() -> None:
    spec = plan_spec(
        training=training(lr=0, zz=1),
        privacy={"mode": "laplace"},
        seed=-1,
        compression={"method": "gzip"},
    )

    with pytest.raises(PlanError) as info:
        parse_plan(spec)

    assert set(info.value.errors) == {
        "training",
        "training.lr",
        "privacy.mode",
        "seed",
        "compression.method",
    }
    assert "plan training.lr must be" in str(info.value)


def test_sgd_with_momentum_and_weight_decay_is_accepted() -> None:
    plan = parse_plan(plan_spec(training=training(optimizer="sgd", momentum=0.9, weight_decay=0)))

    assert plan.training.momentum == 0.9
