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


# --- fairness.mitigation -----------------------------------------------------------------------

MITIGATION_SCHEMA = {
    "columns": [
        {"name": "x1", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
    ],
    "target": {"column": "y", "positive": ["1"]},
    "sensitive": ["sex", "site"],
}


def mitigated(mitigation: object, **changes: object) -> dict[str, object]:
    fairness = {"sensitive_attribute": "sex", "mitigation": mitigation}
    return plan_spec(schema=MITIGATION_SCHEMA, fairness=fairness, **changes)


def test_no_mitigation_section_means_none_and_each_kind_parses_with_its_defaults() -> None:
    plain = parse_plan(plan_spec(schema=MITIGATION_SCHEMA, fairness={"sensitive_attribute": "sex"}))
    assert plain.fairness is not None and not plain.fairness.mitigation.active

    constraint = parse_plan(mitigated({"kind": "constraint", "constraint": "equalized_odds"}))
    assert constraint.fairness is not None
    settings = constraint.fairness.mitigation
    assert (
        settings.kind,
        settings.constraint,
        settings.bound,
        settings.eta,
        settings.multipliers,
    ) == ("constraint", "equalized_odds", 0.01, 2.0, "averaged")
    assert settings.trains_weighted
    fair = parse_plan(mitigated({"kind": "fair_aggregation", "beta": 0.5}))
    assert fair.fairness is not None and fair.fairness.mitigation.beta == 0.5
    post = parse_plan(mitigated({"kind": "postprocess", "objective": "balanced_accuracy_score"}))
    assert post.fairness is not None and post.fairness.mitigation.score_bins == 100
    assert post.fairness.mitigation.rows == "held_out"  # today's rows when the key is absent
    training = parse_plan(mitigated({"kind": "postprocess", "rows": "training"}))
    assert training.fairness is not None and training.fairness.mitigation.rows == "training"
    assert parse_plan(mitigated({"kind": "reweighing"})).fairness is not None


@pytest.mark.parametrize(
    ("mitigation", "changes", "path", "words"),
    [
        ({"kind": "magic"}, {}, "fairness.mitigation.kind", "one of 'none'"),
        ({"kind": "constraint", "zz": 1}, {}, "fairness.mitigation", "'zz'"),
        ({"kind": "constraint", "beta": 1.0}, {}, "fairness.mitigation.beta", "'fair_aggregation'"),
        (
            {"kind": "reweighing", "constraint": "equalized_odds"},
            {},
            "fairness.mitigation.constraint",
            "only",
        ),
        ({"kind": "constraint", "bound": 0}, {}, "fairness.mitigation.bound", "(0, 1]"),
        (
            {"kind": "postprocess", "score_bins": 1},
            {},
            "fairness.mitigation.score_bins",
            "[2, 10000]",
        ),
        (
            {"kind": "reweighing"},
            {"privacy": {"mode": "sample", "noise_multiplier": 1.0}},
            "fairness.mitigation.kind",
            "DP-SGD",
        ),
        (
            {"kind": "constraint"},
            {"privacy": {"mode": "client", "noise_multiplier": 1.0}},
            "fairness.mitigation.kind",
            "fairness.dp_epsilon",
        ),
        (
            {"kind": "constraint"},
            {"secure_aggregation": True},
            "fairness.mitigation.kind",
            "secure_aggregation does not cover",
        ),
        (
            {"kind": "fair_aggregation"},
            {"secure_aggregation": True},
            "fairness.mitigation.kind",
            "secure aggregation hides",
        ),
        (
            {"kind": "fair_aggregation"},
            {"privacy": {"mode": "client", "noise_multiplier": 1.0}},
            "fairness.mitigation.kind",
            "client-level DP",
        ),
        (
            {"kind": "fair_aggregation"},
            {"aggregation": {"strategy": "median"}},
            "fairness.mitigation.kind",
            "weighted mean",
        ),
        (
            {"kind": "postprocess"},
            {"evaluation": {"test_fraction": 0}},
            "fairness.mitigation.kind",
            "held-out rows",
        ),
        (
            {"kind": "postprocess"},
            {"secure_aggregation": True},
            "fairness.mitigation.kind",
            "outside the masked vector of the rounds",
        ),
        (
            {"kind": "postprocess", "rows": "training"},
            {"secure_aggregation": True},
            "fairness.mitigation.kind",
            "outside the masked vector of the rounds",
        ),
        ({"kind": "postprocess", "rows": "all"}, {}, "fairness.mitigation.rows", "'training'"),
        ({"kind": "constraint", "rows": "training"}, {}, "fairness.mitigation.rows", "only"),
        (
            {"kind": "postprocess", "rows": "training"},
            {"privacy": {"mode": "sample", "noise_multiplier": 1.0}},
            "fairness.mitigation.kind",
            "training rows, outside the guarantee of privacy mode 'sample'",
        ),
        (
            {"kind": "postprocess", "rows": "training"},
            {"privacy": {"mode": "client", "noise_multiplier": 1.0}},
            "fairness.mitigation.kind",
            "outside the guarantee of privacy mode 'client' (which covers the rounds' updates",
        ),
        (
            {"kind": "postprocess", "rows": "training"},
            {"evaluation": {"test_fraction": 0}},
            "fairness.mitigation.kind",
            "a site without held-out rows has no final evaluation to send them with",
        ),
    ],
)
def test_mitigations_a_site_could_not_run_are_refused_with_the_reason(
    mitigation: dict[str, object], changes: dict[str, object], path: str, words: str
) -> None:
    errors = plan_errors(mitigated(mitigation, **changes))

    assert path in errors, errors
    assert words in errors[path]


def test_a_mitigation_needs_public_group_labels_of_its_attribute() -> None:
    spec = plan_spec(
        schema=MITIGATION_SCHEMA,
        fairness={"sensitive_attribute": "site", "mitigation": {"kind": "reweighing"}},
    )
    assert "fairness.groups" in plan_errors(spec)["fairness.mitigation.kind"]

    spec["fairness"]["groups"] = {"site": ["a", "b"]}  # type: ignore[index]
    assert plan_errors(spec) == {}


def test_what_works_with_secure_aggregation_and_dp_is_accepted() -> None:
    secure = {"secure_aggregation": True}
    client_dp = {
        "privacy": {"mode": "client", "noise_multiplier": 1.0},
        "fairness": {
            "sensitive_attribute": "sex",
            "dp_epsilon": 1.0,
            "mitigation": {"kind": "constraint"},
        },
    }
    # postprocess's histograms of the final evaluation: noised, charged, outside the masks
    noised = {
        "sensitive_attribute": "sex",
        "dp_epsilon": 1.0,
        "mitigation": {"kind": "postprocess"},
    }
    assert plan_errors({**mitigated({}, **secure), "fairness": noised}) == {}
    for kind in ("reweighing", "constraint"):  # their label counts noised and charged
        noised = {"sensitive_attribute": "sex", "dp_epsilon": 1.0, "mitigation": {"kind": kind}}
        assert plan_errors({**mitigated({}, **secure), "fairness": noised}) == {}
        bounded = {
            **MITIGATION_SCHEMA,
            "columns": [
                {"name": "x1", "type": "numeric", "min": 0, "max": 1},
                {"name": "sex", "type": "categorical"},
            ],
        }
        statistics = plan_spec(
            schema=bounded,
            fairness={**noised, "dp_epsilon": None},
            privacy={"statistics_epsilon": 1.0},
        )
        del statistics["fairness"]["dp_epsilon"]
        assert "set fairness.dp_epsilon" in plan_errors(statistics)["fairness.mitigation.kind"]
        statistics["fairness"]["dp_epsilon"] = 1.0
        assert plan_errors(statistics) == {}
    assert plan_errors({**mitigated({}), **client_dp}) == {}
    sample = {"privacy": {"mode": "sample", "noise_multiplier": 1.0}}
    assert plan_errors(mitigated({"kind": "postprocess"}, **sample)) == {}
    # training rows' histograms under DP: noised with fairness.dp_epsilon and charged
    training = {**noised, "mitigation": {"kind": "postprocess", "rows": "training"}}
    for privacy in (sample, {"privacy": {"mode": "client", "noise_multiplier": 1.0}}):
        assert plan_errors({**mitigated({}, **privacy), "fairness": training}) == {}
    assert plan_errors(mitigated({"kind": "postprocess", "rows": "training"})) == {}
