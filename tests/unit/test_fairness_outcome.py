"""federation.fairness_outcome's pure parts: the final-model warning, the mitigation as a card
states it, and the refusal of kinds this server version does not apply."""

from __future__ import annotations

import pytest

from fedcore.plan import MITIGATION_KINDS, final_counts_in_clear, plan_errors
from federation.fairness_outcome import (
    MITIGATION_WIRED,
    final_fairness_warning,
    mitigation_view,
    unavailable_mitigation_error,
)
from tests.factories import SCHEMA, plan_spec

SPEC_SCHEMA = {**SCHEMA, "sensitive": ["sex"]}
FAIRNESS = {"sensitive_attribute": "sex", "groups": {"sex": ["F", "M"]}}


def test_no_final_report_or_no_final_flag_gives_no_warning() -> None:
    assert final_fairness_warning(None) is None
    assert final_fairness_warning({"model_version": 2, "fairness": None}) is None
    assert final_fairness_warning({"model_version": 2, "fairness": {"flags": []}}) is None


def test_every_final_flag_is_in_the_warning() -> None:
    evaluation = {
        "model_version": 4,
        "fairness": {
            "sensitive_attribute": "sex",
            "flags": [
                {"metric": "demographic_parity_difference", "value": 0.169, "limit": 0.1},
                {"metric": "equalized_odds_difference", "value": 0.3, "limit": 0.25},
            ],
        },
    }
    warning = final_fairness_warning(evaluation)
    assert [f["label"] for f in warning["flags"]] == [
        "demographic parity difference",
        "equalized odds difference",
    ]
    assert warning["message"] == (
        "the final model v4 exceeds the plan's fairness limit for 'sex': demographic parity "
        "difference 0.1690 > limit 0.1; equalized odds difference 0.3000 > limit 0.25"
    )


@pytest.mark.parametrize(
    ("mitigation", "parameters"),
    [
        ({"kind": "reweighing"}, {}),
        (
            {"kind": "fair_aggregation", "beta": 0.5},
            {"constraint": "demographic_parity", "beta": 0.5},
        ),
        (
            {"kind": "postprocess", "constraint": "equalized_odds"},
            {
                "constraint": "equalized_odds",
                "objective": "accuracy_score",
                "score_bins": 100,
                "rows": "held_out",
            },
        ),
        (
            {"kind": "constraint", "bound": 0.02},
            {
                "constraint": "demographic_parity",
                "bound": 0.02,
                "eta": 2.0,
                "multipliers": "averaged",
            },
        ),
    ],
)
def test_the_mitigation_is_stated_with_the_parameters_of_its_kind(
    mitigation: dict, parameters: dict
) -> None:
    spec = plan_spec(schema=SPEC_SCHEMA, fairness={**FAIRNESS, "mitigation": mitigation})
    view = mitigation_view(spec)
    assert view["kind"] == mitigation["kind"] and view["parameters"] == parameters


def test_a_plan_without_fairness_has_no_mitigation_to_state() -> None:
    assert mitigation_view(plan_spec()) is None


def test_every_kind_not_applied_is_refused_with_its_reason() -> None:
    for kind in MITIGATION_KINDS:
        spec = {"fairness": {**FAIRNESS, "mitigation": {"kind": kind}}}
        error = unavailable_mitigation_error(spec)
        if kind == "none" or kind in MITIGATION_WIRED:
            assert error is None
        else:
            assert error.startswith(f"{kind!r} is not available yet in this server version")
    # Malformed kinds are the plan language's to refuse, not this check's (no crash).
    assert unavailable_mitigation_error({"fairness": {"mitigation": {"kind": ["x"]}}}) is None
    assert unavailable_mitigation_error([]) is None


@pytest.mark.parametrize("kind", ["reweighing", "constraint"])
@pytest.mark.parametrize(
    "extra",
    [
        {"secure_aggregation": True},
        {"privacy": {"statistics_epsilon": 1.0}},
        {},
    ],
)
def test_weighted_mitigations_with_noised_label_counts_are_applied(kind: str, extra: dict) -> None:
    """With fairness.dp_epsilon the label counts are noised and charged, and a secure round's
    counts are summed under the masks: this server applies both (without dp_epsilon the plan
    language refuses secure_aggregation and statistics_epsilon, tests/unit/test_plan_language)."""
    fairness = {**FAIRNESS, "dp_epsilon": 1.0, "mitigation": {"kind": kind}}
    assert unavailable_mitigation_error({**extra, "fairness": fairness}) is None


def test_postprocess_with_secure_aggregation_needs_noise_and_is_applied_with_it() -> None:
    """The rule is the plan language's (one place): the server applies every wired kind."""
    fairness = {**FAIRNESS, "mitigation": {"kind": "postprocess"}}
    secure = plan_spec(schema=SPEC_SCHEMA, fairness=fairness, secure_aggregation=True)
    assert "outside the masked vector" in plan_errors(secure)["fairness.mitigation.kind"]
    assert unavailable_mitigation_error(secure) is None
    noised = plan_spec(
        schema=SPEC_SCHEMA, fairness={**fairness, "dp_epsilon": 1.0}, secure_aggregation=True
    )
    assert plan_errors(noised) == {}
    assert unavailable_mitigation_error(noised) is None
    assert final_counts_in_clear(noised) and not final_counts_in_clear(secure)
    assert final_counts_in_clear(plan_spec(schema=SPEC_SCHEMA, fairness=fairness))
    assert not final_counts_in_clear(plan_spec())  # no fairness section: no counts at all
