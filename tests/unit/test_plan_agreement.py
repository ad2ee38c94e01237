"""Server and agent accept exactly the same plans (hypothesis draws valid and near-valid specs).

The server's side is what a proposal goes through (federation.services.plans.plan_spec_errors,
without the silo checks); the agent's is what every task and stats request goes through
(clientagent.trainer.check_plan). A rule only one side applies makes a drawn spec pass one and
fail the other.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clientagent.trainer import TaskError, check_plan
from fedcore.plan.keys import Key
from fedcore.plan.spec import AGGREGATION_STRATEGIES, SECTIONS
from federation.services.plans import plan_spec_errors
from tests.factories import plan_spec

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
    ],
    "target": {"column": "y", "positive": ["1"]},
    "sensitive": ["sex", "site"],
}

GENERIC: list[Any] = [0, 1, -1, 0.5, 2, 10, 100, 1e-5, 3.0, None, True, "x", "", [], {}]


def candidates(key: Key) -> list[Any]:
    """Values around a key's rules: its bounds and just past them, its choices, junk."""
    values = [*GENERIC]
    if not key.required:
        values.append(key.default)
    for bound in (key.minimum, key.maximum):
        if bound is not None:
            values += [bound, bound - 1, bound + 1, bound - 1e-9, bound + 1e-9]
    if key.choices is not None:
        values += [*key.choices, "bogus"]
    return values


# (section path, key name) -> values to try; sections "" (top level), "training", ...
PATHS: dict[tuple[str, str], list[Any]] = {
    (section, key.name): candidates(key) for section, keys in SECTIONS.items() for key in keys
}
for section in SECTIONS:
    PATHS[(section, "zz")] = [1]  # an unknown key
PATHS[("aggregation", "strategy")] = [*AGGREGATION_STRATEGIES, "bogus", 1, None]
for param in ("mu", "server_lr", "momentum", "beta", "f", "m", "q", "lipschitz", "norm_bound"):
    PATHS[("aggregation", param)] = GENERIC
PATHS[("fairness", "groups")] += [{"sex": ["F", "M"]}, {"site": ["a"]}, {"age": ["1"]}]
PATHS[("fairness", "groups")] += [{"site": ["a", "a"]}, {"site": [" a"]}]
PATHS[("fairness", "sensitive_attribute")] += ["sex", "site", "age"]
PATHS[("fairness", "mitigation")] += [{"kind": "reweighing"}, {"kind": "postprocess"}]
PATHS[("fairness.mitigation", "kind")] += ["constraint"]
PATHS[("", "model")] = [
    {"kind": "mlp", "hidden": [4]},
    {"kind": "mlp"},
    {"kind": "logistic_regression", "hidden": [2]},
    {"kind": "tree"},
    "mlp",
    None,
]
PATHS[("", "schema")] = [None, {}, {"columns": []}, "x"]
PATHS[("privacy", "adaptive_clip")] += [{"target_quantile": 0.3}, {"learning_rate": 0}]

# The keys the cross-section rules read, all drawn at once so that every combination comes up;
# each mostly from values that pass on their own, so the combination decides the verdict.
SCENARIO = st.tuples(
    st.sampled_from([[("privacy", None, None)], *(
        [("privacy", "mode", mode)] for mode in ("none", "sample", "client", "client", "bogus")
    )]),
    st.sampled_from([[("aggregation", "strategy", name)] for name in AGGREGATION_STRATEGIES]),
    st.sampled_from([[], [("", "secure_aggregation", True)]]),
    st.sampled_from([[], [], [("training", "optimizer", "sgd"), ("training", "momentum", 0.5)],
                     [("training", "momentum", 0.5)]]),
    st.sampled_from([[], [], [], [("training", "local_steps", 5)]]),
    st.sampled_from([[], [], [("compression", "method", "int8")],
                     [("compression", None, {"method": "topk", "ratio": 0.1})]]),
    st.sampled_from([[], [], [("privacy", "adaptive_clip", {"target_quantile": 0.3})]]),
    st.sampled_from([[], [], [("fairness", "sensitive_attribute", "sex")],
                     [("fairness", None, {"sensitive_attribute": "site",
                                          "groups": {"site": ["a", "b"]}})]]),
    st.sampled_from([[], [], *(
        [("fairness.mitigation", "kind", kind)]
        for kind in ("reweighing", "fair_aggregation", "constraint", "postprocess")
    )]),
    st.sampled_from([[], [], [("fairness", "dp_epsilon", 1.0)], [("evaluation", "test_fraction", 0)]]),
).map(lambda parts: [change for part in parts for change in part])  # fmt: skip


@st.composite
def mutation(draw: st.DrawFn) -> tuple[str, str, Any]:
    path = draw(st.sampled_from(sorted(PATHS)))
    return (*path, draw(st.sampled_from(PATHS[path])))


SECTION_SWAPS = st.tuples(
    st.sampled_from(["privacy", "aggregation", "secagg", "fairness", "compression"]),
    st.just(None),
    st.sampled_from([None, {}, "x", 1, []]),
)


def mutated(mutations: list[tuple[str, str | None, Any]]) -> dict[str, Any]:
    spec = copy.deepcopy(plan_spec(schema=SCHEMA))
    for section, key, value in mutations:
        if key is None:
            spec[section] = value
        elif section == "":
            spec[key] = value
        else:
            head, _, sub = section.partition(".")
            target = spec.get(head)
            if target is None:
                target = spec[head] = {}
            if sub and isinstance(target, dict):
                target = target.setdefault(sub, {})
            if isinstance(target, dict):
                target[key] = value
    return spec


def server_accepts(spec: dict[str, Any]) -> bool:
    return plan_spec_errors(spec) == {}


def agent_accepts(spec: dict[str, Any]) -> bool:
    try:
        check_plan(spec, 1, 1)
    except TaskError:
        return False
    return True


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(SCENARIO, st.lists(mutation() | SECTION_SWAPS, max_size=1))
def test_server_and_agent_accept_the_same_plans(scenario: list[Any], mutations: list[Any]) -> None:
    spec = mutated(scenario + mutations)

    assert server_accepts(spec) == agent_accepts(spec), spec


def test_every_single_key_change_gets_the_same_verdict_from_both() -> None:
    """Each key set to each value around its rules, one at a time, on a valid plan."""
    disagree = [
        (path, value)
        for path, values in sorted(PATHS.items())
        for value in values
        if server_accepts(spec := mutated([(*path, value)])) != agent_accepts(spec)
    ]

    assert disagree == []


def test_the_draws_reach_both_verdicts() -> None:
    """The property is not vacuous: the draws hold plans each side accepts and refuses."""
    accepted = mutated([("privacy", "mode", "client"), ("aggregation", "strategy", "fedadam")])
    refused = mutated([("training", "momentum", 0.9)])  # momentum with Adam

    assert server_accepts(accepted) and agent_accepts(accepted)
    assert not server_accepts(refused) and not agent_accepts(refused)
    weighted = [
        ("fairness", "sensitive_attribute", "sex"),
        ("fairness.mitigation", "kind", "constraint"),
    ]
    assert server_accepts(mutated(weighted)) and agent_accepts(mutated(weighted))
    secure = [*weighted[:1], ("fairness.mitigation", "kind", "fair_aggregation"),
              ("", "secure_aggregation", True)]  # fmt: skip
    assert not server_accepts(mutated(secure)) and not agent_accepts(mutated(secure))
