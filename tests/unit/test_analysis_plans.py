"""Analysis plans (fedcore.plan.analysis) and their steps (fedcore.analytics.steps): validation
against the schema with dotted paths, and a three-site run of each analysis equal to the pooled
computation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore.analytics import DisclosurePolicy, DisclosureRefused
from fedcore.analytics.cohort import crosstab_result, moments_result, site_crosstab, site_moments
from fedcore.analytics.steps import merge_step, next_step, release, site_answer
from fedcore.analytics.survival import km_result, logrank_result, merge_event_times, site_km
from fedcore.plan import PlanError, parse_analysis_plan, plan_errors, plan_hash

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
        {"name": "time", "type": "numeric"},
    ],
    "target": {"column": "status", "positive": ["1"]},
    "sensitive": [],
}
KM = {
    "kind": "kaplan_meier",
    "time": "time",
    "event": "status",
    "group": "sex",
    "levels": ["1", "2"],
    "logrank": True,
}


def spec(analysis: dict, **top: object) -> dict:
    return {"kind": "analysis", "schema": SCHEMA, "analysis": analysis, **top}


def frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 10, n).round(0),
            "sex": rng.choice(["1", "2"], n),
            "time": rng.integers(1, 40, n).astype(float),  # ties across sites
            "status": rng.integers(0, 2, n),
        }
    )


def run(analysis: dict, frames: list[pd.DataFrame], policy: DisclosurePolicy) -> dict:
    """The steps as the server runs them: next_step over the merges so far, until released."""
    parsed = parse_analysis_plan(spec(analysis)).analysis
    merged: dict = {}
    answers: list = []
    while (request := next_step(parsed, list(merged.values()))) is not None:
        step, params = request
        answers = [site_answer(parsed, step, params, df, policy) for df in frames]
        merged[step] = merge_step(parsed, step, answers)
    return release(parsed, merged, answers)


def test_a_valid_analysis_plan_has_no_errors_and_a_hash_like_any_plan():
    assert plan_errors(spec(KM)) == {}
    assert len(plan_hash(spec(KM))) == 64


@pytest.mark.parametrize(
    ("analysis", "path", "words"),
    [
        ({"kind": "moments", "columns": ["age", "bmi"]}, "analysis.columns", "'bmi' is not in"),
        ({**KM, "time": "survival"}, "analysis.time", "'survival' is not in"),
        ({**KM, "time": "sex"}, "analysis.time", "not numeric"),
        (
            {
                "kind": "count",
                "rows": "sex",
                "levels": {"sex": ["1"]},
                "filters": [{"column": "weight", "op": "gt", "value": 3}],
            },
            "analysis.filters",
            "'weight' is not in",
        ),
        ({"kind": "histogram", "column": "age", "edges": [3, 1]}, "analysis.edges", "increasing"),
        ({"kind": "evaluation"}, "analysis.kind", "not an analysis"),
        (
            {"kind": "crosstab", "rows": "sex", "cols": "status", "levels": {"sex": ["1"]}},
            "analysis.levels.status",
            "levels of 'status'",
        ),
        ({**KM, "group": None, "levels": None}, "analysis.logrank", "needs a group"),
    ],
)
def test_a_bad_analysis_is_refused_with_its_path(analysis, path, words):
    with pytest.raises(PlanError) as refused:
        parse_analysis_plan(spec(analysis))
    assert words in refused.value.errors[path], refused.value.errors


def test_training_keys_are_refused_in_an_analysis_plan():
    errors = plan_errors(spec(KM, training={"rounds": 1}))
    assert "training" in errors and "analysis plan" in errors["training"]


def test_kaplan_meier_over_three_sites_equals_the_pooled_computation():
    frames = [frame(1), frame(2), frame(3)]
    result = run(KM, frames, DisclosurePolicy(min_sites=3))
    pooled = pd.concat(frames, ignore_index=True)
    grid = merge_event_times([np.unique(pooled.loc[pooled.status == 1, "time"])])
    sums = site_km(pooled, "time", "status", grid, group="sex", levels=["1", "2"])
    reference = km_result(sums, grid, levels=["1", "2"])
    assert result["curves"].keys() == reference["curves"].keys() == {"1", "2"}
    for group, curve in reference["curves"].items():
        for key in ("time", "survival", "ci_lower", "ci_upper", "at_risk", "events"):
            np.testing.assert_allclose(result["curves"][group][key], curve[key], rtol=0, atol=1e-12)
    expected = logrank_result(sums, levels=["1", "2"])
    assert result["logrank"]["statistic"] == pytest.approx(expected["statistic"], abs=1e-12)
    assert result["coarsening"] == "none: exact event times" and result["sites"] == 3


def test_counts_and_moments_equal_the_pooled_ones_with_suppression_applied():
    frames = [frame(4), frame(5), frame(6)]
    pooled = pd.concat(frames, ignore_index=True)
    table = {
        "kind": "crosstab",
        "rows": "sex",
        "cols": "status",
        "levels": {"sex": ["1", "2"], "status": ["0", "1"]},
    }
    result = run(table, frames, DisclosurePolicy(min_cell_count=5, min_sites=1))
    levels = {"sex": ("1", "2"), "status": ("0", "1")}
    reference = crosstab_result(
        site_crosstab(pooled, "sex", levels, cols="status"),
        levels,
        "sex",
        "status",
        min_cell_count=5,
    )
    assert {k: result[k] for k in reference if k != "sites"} == {
        k: v for k, v in reference.items() if k != "sites"
    }
    moments = run(
        {"kind": "moments", "columns": ["age", "time"]}, frames, DisclosurePolicy(min_sites=1)
    )
    expected = moments_result(site_moments(pooled, ["age", "time"]), ["age", "time"])
    np.testing.assert_allclose(moments["correlation"], expected["correlation"], atol=1e-12)
    assert moments["mean"][0] == pytest.approx(pooled["age"].mean(), abs=1e-9)


def test_a_site_refuses_an_analysis_its_policy_does_not_allow_or_a_small_cohort():
    analysis = parse_analysis_plan(spec(KM)).analysis
    only_counts = DisclosurePolicy(allowed_analyses=("count", "crosstab"))
    with pytest.raises(DisclosureRefused, match="does not run 'kaplan_meier'"):
        site_answer(analysis, "event_times", {}, frame(1), only_counts)
    small = parse_analysis_plan(
        spec({**KM, "filters": [{"column": "age", "op": "gt", "value": 75}]})
    ).analysis
    tiny = frame(1).assign(age=[80.0] * 3 + [50.0] * 57)
    with pytest.raises(DisclosureRefused, match="fewer than 5 rows"):
        site_answer(small, "event_times", {}, tiny, DisclosurePolicy())


def test_nothing_is_released_from_fewer_sites_than_a_site_requires():
    with pytest.raises(DisclosureRefused, match="at least 3 sites"):
        run({"kind": "moments", "columns": ["age"]}, [frame(1), frame(2)], DisclosurePolicy())


def test_a_coarsening_site_is_stated_in_the_result():
    result = run(KM, [frame(1), frame(2), frame(3)], DisclosurePolicy(time_step=5.0))
    assert result["coarsening"] == "times floored to multiples of 5 at every site"
    assert all(t % 5 == 0 for t in result["curves"]["1"]["time"])


@pytest.mark.parametrize("method", ["linear", "inverted_cdf"])
def test_quantiles_by_federated_bisection_equal_numpy_on_the_pooled_rows(method):
    frames = [frame(7), frame(8), frame(9)]
    pooled = pd.concat(frames, ignore_index=True)
    analysis = {"kind": "quantile", "column": "age", "probs": [0.1, 0.5, 0.9], "method": method}
    result = run(analysis, frames, DisclosurePolicy())
    expected = np.quantile(pooled["age"].to_numpy(), [0.1, 0.5, 0.9], method=method)
    assert result["values"] == expected.tolist()  # exact, not approximately
    assert result["n"] == len(pooled) and result["rounds"] <= 20


def test_an_extreme_quantile_is_refused_at_release_by_the_minimum_cell_count():
    analysis = {"kind": "quantile", "column": "age", "probs": [1.0]}  # the maximum
    with pytest.raises(ValueError, match="one patient's value"):
        run(analysis, [frame(1), frame(2), frame(3)], DisclosurePolicy())


def test_a_bad_quantile_plan_is_refused_with_its_path():
    with pytest.raises(PlanError) as refused:
        parse_analysis_plan(spec({"kind": "quantile", "column": "sex", "probs": [1.5]}))
    assert set(refused.value.errors) == {"analysis.column", "analysis.probs"}
