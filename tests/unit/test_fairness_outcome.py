"""federation.fairness_outcome's pure parts: the final-model warning, the mitigation as a card
states it, and the refusal of kinds this server version does not apply."""

from __future__ import annotations

import pytest

from fedcore import fairness_mitigation
from fedcore.plan import (
    MITIGATION_KINDS,
    final_counts_in_clear,
    held_out_score_histograms_sent,
    plan_errors,
)
from federation.fairness_outcome import (
    MITIGATION_WIRED,
    final_fairness_info,
    final_fairness_warning,
    mitigation_view,
    thresholded_decisions,
    thresholded_report,
    trade_off,
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


# Two groups on a 3-point grid (0, 0.5, 1): f's scores low, m's high.
HELD_OUT = {
    "f": {"negatives": [6, 2, 0], "positives": [1, 1, 0]},
    "m": {"negatives": [0, 1, 3], "positives": [0, 2, 6]},
}
GRID3 = [0.0, 0.5, 1.0]
INF = float("inf")


def rule(threshold: float) -> dict:
    """Positive above ``threshold``, deterministically."""
    return {"threshold0": threshold, "p0": 1.0, "threshold1": threshold, "p1": 0.0}


def thresholds(f: float, m: float) -> dict:
    return {"rules": {"f": rule(f), "m": rule(m)}, "grid": GRID3, "attribute": "sex"}


def raw_flagged(value: float = 0.5, limit: float = 0.1) -> dict:
    return {
        "sensitive_attribute": "sex",
        "flags": [{"metric": "demographic_parity_difference", "value": value, "limit": limit}],
    }


def test_the_thresholded_report_is_the_thresholded_disparities_against_the_plans_limits() -> None:
    chosen = thresholds(0.25, 0.75)  # f positive from 0.5 up, m at 1 only
    limits = {"max_demographic_parity_difference": 0.1, "max_equalized_odds_difference": None}
    report = thresholded_report(chosen, HELD_OUT, limits, model_version=3, in_sample=False)

    expected = fairness_mitigation.thresholded_disparities(chosen["rules"], HELD_OUT, GRID3)
    # f: 3 of 10 positive, m: 9 of 12; TPR f 1/2, m 6/8; FPR f 2/8, m 3/4
    assert expected["demographic_parity_difference"] == pytest.approx(0.75 - 0.3)
    assert expected["equalized_odds_difference"] == pytest.approx(0.75 - 0.25)
    assert {k: report[k] for k in expected} == expected
    assert report["accuracy"] == pytest.approx((7 + 7) / 22)  # f: 1 + 6 right, m: 6 + 1
    assert report["n"] == 22 and report["model_version"] == 3 and report["attribute"] == "sex"
    assert report["in_sample"] is False and report["note"].startswith("out of sample")
    assert [(f["metric"], f["limit"]) for f in report["flags"]] == [
        ("demographic_parity_difference", 0.1)
    ]
    inside = thresholded_report(
        chosen,
        HELD_OUT,
        {"max_demographic_parity_difference": 0.5},
        model_version=3,
        in_sample=True,
        noised=2.0,
    )
    assert inside["flags"] == [] and inside["in_sample"] is True
    assert "expect a larger disparity on new rows" in inside["note"]
    assert "dp_epsilon = 2" in inside["note"]
    with pytest.raises(ValueError, match="has rows but no threshold rule"):
        thresholded_report(
            {**chosen, "rules": {"f": rule(0.25)}},
            HELD_OUT,
            limits,
            model_version=3,
            in_sample=False,
        )


def evaluation_with(thresholded_flags: list, *, chosen: bool = True) -> dict:
    report = {
        "model_version": 2,
        "attribute": "sex",
        "in_sample": False,
        "note": "out of sample: ...",
        "n": 22,
        "accuracy": 0.7,
        "demographic_parity_difference": 0.05 if not thresholded_flags else 0.3,
        "equalized_odds_difference": 0.2,
        "limits": {"max_demographic_parity_difference": 0.1, "max_equalized_odds_difference": None},
        "flags": thresholded_flags,
    }
    return {
        "model_version": 2,
        "metrics": {"accuracy": 0.8, "auc": 0.9},
        "fairness": {**raw_flagged(), "round": None, "final": True, "model_version": 2},
        "thresholds": thresholds(0.25, 0.75) if chosen else None,
        "thresholds_note": None if chosen else "no thresholds for the final model: ...",
        "thresholded_fairness": report if chosen else None,
    }


def test_thresholds_that_bring_the_raw_model_within_the_limit_leave_no_warning() -> None:
    evaluation = evaluation_with([])

    assert final_fairness_warning(evaluation) is None
    info = final_fairness_info(evaluation)
    assert info["code"] == "fairness_limit_met_by_thresholds"
    assert info["flags"][0]["value"] == 0.5  # the raw model's figure
    assert info["thresholded"] == [
        {
            "metric": "demographic_parity_difference",
            "label": "demographic parity difference",
            "value": 0.05,
            "limit": 0.1,
        }
    ]
    assert info["in_sample"] is False
    assert "at 0.5 exceeds" in info["message"] and "bring its decisions within" in info["message"]
    assert "0.5000 > limit 0.1" in info["message"] and "0.0500 <= limit 0.1" in info["message"]


def test_the_warning_is_about_the_thresholded_decisions_when_they_exceed_a_limit() -> None:
    flag = {"metric": "demographic_parity_difference", "value": 0.3, "limit": 0.1}
    evaluation = evaluation_with([flag])

    warning = final_fairness_warning(evaluation)
    assert warning["decisions"] == "thresholded"
    assert warning["flags"][0]["value"] == 0.3  # not the raw model's 0.5
    assert "thresholded decisions" in warning["message"]
    assert final_fairness_info(evaluation) is None
    # the raw model within but the thresholded decisions over: still the warning
    raw_within = {**evaluation, "fairness": {"sensitive_attribute": "sex", "flags": []}}
    assert final_fairness_warning(raw_within)["decisions"] == "thresholded"


def test_without_thresholds_or_their_report_the_warning_is_the_raw_models() -> None:
    no_thresholds = evaluation_with([], chosen=False)
    warning = final_fairness_warning(no_thresholds)
    assert warning["decisions"] == "raw" and warning["flags"][0]["value"] == 0.5
    assert final_fairness_info(no_thresholds) is None
    older = {k: v for k, v in evaluation_with([]).items() if k != "thresholded_fairness"}
    assert final_fairness_warning(older)["decisions"] == "raw"  # a run from before the report


def test_the_trade_off_has_a_row_for_the_thresholded_decisions() -> None:
    evaluation = evaluation_with([])
    rows = trade_off([evaluation["fairness"]], {}, evaluation)

    assert [(r["final"], r["thresholded"]) for r in rows] == [(True, False), (True, True)]
    assert (rows[1]["accuracy"], rows[1]["auc"], rows[1]["in_sample"]) == (0.7, None, False)
    assert [(d["value"], d["limit"], d["flagged"]) for d in rows[1]["disparities"]] == [
        (0.05, 0.1, False),
        (0.2, None, False),
    ]
    assert thresholded_decisions(evaluation)["n"] == 22
    assert thresholded_decisions(evaluation_with([], chosen=False)) is None
    assert len(trade_off([evaluation["fairness"]], {}, evaluation_with([], chosen=False))) == 1


@pytest.mark.parametrize(
    ("mitigation", "secure", "epsilon", "sent"),
    [
        ({"kind": "postprocess", "rows": "training"}, False, None, True),
        ({"kind": "postprocess", "rows": "training"}, True, 1.0, True),
        ({"kind": "postprocess", "rows": "training"}, True, None, False),  # nothing in clear
        ({"kind": "postprocess", "rows": "held_out"}, False, None, False),  # they are those
        ({"kind": "postprocess"}, False, None, False),
        ({"kind": "reweighing"}, False, None, False),
    ],
)
def test_held_out_histograms_are_sent_only_when_the_thresholds_come_from_the_training_rows(
    mitigation: dict, secure: bool, epsilon: float | None, sent: bool
) -> None:
    fairness = {**FAIRNESS, "mitigation": mitigation, "dp_epsilon": epsilon}
    spec = plan_spec(schema=SPEC_SCHEMA, fairness=fairness)
    if secure:
        spec["secure_aggregation"] = True
    assert held_out_score_histograms_sent(spec) is sent
    assert held_out_score_histograms_sent(plan_spec(schema=SPEC_SCHEMA)) is False
