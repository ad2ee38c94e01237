"""Noise on an analysis plan's count tables (fedcore.analytics.noise, the plan's privacy section):
the plan language accepts it only where it is sound, each site's noise has the stated
distribution, a site's policy can require noise or cap epsilon, and the result states the noise.
The noise is drawn from seeded random.Random sources here (the test injection the samplers
allow); production draws from the operating system."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest

from fedcore.analytics import DisclosurePolicy, DisclosureRefused, secure
from fedcore.analytics.noise import AnalysisNoise
from fedcore.analytics.steps import merge_step, release, secure_answer, site_answer
from fedcore.plan import PlanError, parse_analysis_plan, plan_errors

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
        {"name": "time", "type": "numeric"},
    ],
    "target": {"column": "status", "positive": ["1"]},
    "sensitive": [],
}
COUNT = {"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2"]}}
LAPLACE = {"mechanism": "laplace", "epsilon": 1.0}
GAUSSIAN = {"mechanism": "gaussian", "epsilon": 1.0, "delta": 1e-6}


def spec(analysis: dict, **top: object) -> dict:
    return {"kind": "analysis", "schema": SCHEMA, "analysis": analysis, **top}


def frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(60, 10, n).round(0),
            "sex": rng.choice(["1", "2"], n),
            "time": rng.integers(1, 40, n).astype(float),
            "status": rng.integers(0, 2, n),
        }
    )


def test_a_count_crosstab_or_histogram_plan_may_ask_noise():
    for analysis in (
        COUNT,
        {**COUNT, "kind": "crosstab", "cols": "status", "levels": {"sex": ["1"], "status": [0]}},
        {"kind": "histogram", "column": "age", "edges": [0, 50, 100]},
    ):
        for privacy in (LAPLACE, GAUSSIAN):
            assert plan_errors(spec(analysis, privacy=privacy)) == {}
    plan = parse_analysis_plan(spec(COUNT, privacy=GAUSSIAN))
    assert plan.privacy == AnalysisNoise("gaussian", 1.0, 1e-6)
    assert parse_analysis_plan(spec(COUNT)).privacy is None


@pytest.mark.parametrize(
    ("analysis", "privacy", "path", "words"),
    [
        ({"kind": "moments", "columns": ["age"]}, LAPLACE, "privacy", "give column 'age' a 'min'"),
        ({"kind": "quantile", "column": "age", "probs": [0.5]}, LAPLACE, "privacy", "soundly"),
        (
            {"kind": "cox", "time": "time", "event": "status", "covariates": ["age"]},
            GAUSSIAN,
            "privacy",
            "a 'cox' analysis",
        ),
        (
            {"kind": "kaplan_meier", "time": "time", "event": "status"},
            LAPLACE,
            "privacy",
            "count tables and clipped moments only",
        ),
        (COUNT, {"mechanism": "gaussian", "epsilon": 1.0}, "privacy.delta", "needs a delta"),
        (COUNT, {**LAPLACE, "delta": 1e-6}, "privacy.delta", "gaussian mechanism only"),
        (COUNT, {"mechanism": "laplace", "epsilon": 0}, "privacy.epsilon", "(0, 100]"),
        (COUNT, {"mechanism": "exponential", "epsilon": 1}, "privacy.mechanism", "laplace"),
        (COUNT, {**LAPLACE, "sensitivity": 2}, "privacy.sensitivity", "unknown key"),
        (COUNT, "laplace", "privacy", "must be an object"),
    ],
)
def test_noise_where_it_is_not_sound_is_refused_at_proposal_with_the_reason(
    analysis, privacy, path, words
):
    with pytest.raises(PlanError) as refused:
        parse_analysis_plan(spec(analysis, privacy=privacy))
    assert words in refused.value.errors[path], refused.value.errors


def test_under_secure_aggregation_each_site_noises_its_table_and_the_sum_is_theirs_exactly():
    # Noise and secure aggregation together: every site adds its own full noise, as in clear
    # (the guarantee does not rest on the masks), and the masked sum is the noised tables' sum.
    plan = parse_analysis_plan(spec(COUNT, privacy=LAPLACE, secure_aggregation=True))
    assert plan.secure_aggregation and plan.privacy is not None
    policy = DisclosurePolicy(min_cell_count=1, min_sites=1)
    answers, cells = [], []
    for seed in (1, 2, 3):
        noised = site_answer(
            plan.analysis,
            "summary",
            {},
            frame(seed),
            policy,
            noise=plan.privacy,
            noise_source=random.Random(seed),
        )
        clear, part = secure_answer(noised)
        assert clear["noise"] == plan.privacy.describe() and "summary" not in clear
        answers.append(noised)
        cells.append(part)
    summed = secure.from_cells(np.sum(cells, axis=0), clear["masked"]["layout"])
    assert np.array_equal(summed["counts"], merge_step(plan.analysis, "summary", answers)["counts"])


def test_discrete_laplace_noise_has_the_stated_distribution():
    noise = AnalysisNoise("laplace", 0.5)
    draws = noise.add(np.zeros(20_000, dtype=np.int64), random.Random(7))
    q = math.exp(-0.5)
    assert draws.dtype == np.int64
    assert abs(draws.mean()) < 0.05
    # variance 2q / (1 - q)^2 = 7.92 at epsilon 0.5; P(0) = (1 - q) / (1 + q) = 0.245
    assert draws.std() == pytest.approx(noise.cell_std(), rel=0.03)
    assert noise.cell_std() == pytest.approx(math.sqrt(2 * q) / (1 - q))
    assert np.mean(draws == 0) == pytest.approx((1 - q) / (1 + q), abs=0.01)
    # a wrong scale is caught: epsilon 1's std is 1.6, this one's 2.8
    assert draws.std() > 1.2 * AnalysisNoise("laplace", 1.0).cell_std()


def test_discrete_gaussian_noise_has_the_stated_sigma():
    noise = AnalysisNoise("gaussian", 1.0, 1e-6)
    assert noise.sigma == pytest.approx(5.35, abs=0.01)  # rho-zCDP at (1, 1e-6)
    draws = noise.add(np.full((100, 100), 10, dtype=np.int64), random.Random(11)) - 10
    assert abs(draws.mean()) < 0.15
    assert draws.std() == pytest.approx(noise.sigma, rel=0.03)
    tail = np.mean(np.abs(draws) > 2 * noise.sigma)  # a normal's: 0.0455
    assert tail == pytest.approx(0.0455, abs=0.008)


def test_a_site_adds_noise_to_its_table_and_says_so():
    plan = parse_analysis_plan(spec(COUNT, privacy=LAPLACE))
    df = frame(1)
    exact = site_answer(plan.analysis, "summary", {}, df, DisclosurePolicy())
    noised = site_answer(
        plan.analysis,
        "summary",
        {},
        df,
        DisclosurePolicy(),
        noise=plan.privacy,
        noise_source=random.Random(3),
    )
    assert "noise" not in exact
    assert noised["noise"] == {
        "mechanism": "laplace",
        "epsilon": 1.0,
        "delta": None,
        "scale": 1.0,
        "sigma": None,
    }
    assert noised["summary"]["sites"] == 1  # the site count is public, not noised
    assert noised["summary"]["counts"] != exact["summary"]["counts"]
    assert len(noised["summary"]["counts"]) == len(exact["summary"]["counts"])


def test_a_site_policy_can_require_noise_or_cap_its_epsilon():
    exact = parse_analysis_plan(spec(COUNT)).analysis
    strict = DisclosurePolicy.from_dict({"require_noise": True, "max_epsilon": 0.5})
    with pytest.raises(DisclosureRefused, match="releases only noised results"):
        site_answer(exact, "summary", {}, frame(1), strict)
    plan = parse_analysis_plan(spec(COUNT, privacy=LAPLACE))
    with pytest.raises(DisclosureRefused, match="epsilon 1 per release is above this site's cap"):
        site_answer(plan.analysis, "summary", {}, frame(1), strict, noise=plan.privacy)
    cheap = parse_analysis_plan(spec(COUNT, privacy={"mechanism": "laplace", "epsilon": 0.5}))
    answer = site_answer(cheap.analysis, "summary", {}, frame(1), strict, noise=cheap.privacy)
    assert answer["noise"]["epsilon"] == 0.5
    with pytest.raises(ValueError, match="max_epsilon must be a positive number"):
        DisclosurePolicy.from_dict({"max_epsilon": -1})


def test_a_noised_release_is_clamped_suppressed_and_states_its_noise():
    plan = parse_analysis_plan(
        spec(
            {"kind": "histogram", "column": "age", "edges": [20, 40, 60, 80, 100]}, privacy=GAUSSIAN
        )
    )
    frames = [frame(seed) for seed in (1, 2, 3)]
    policy = DisclosurePolicy()
    answers = [
        site_answer(
            plan.analysis,
            "summary",
            {},
            df,
            policy,
            noise=plan.privacy,
            noise_source=random.Random(seed),
        )
        for seed, df in enumerate(frames)
    ]
    merged = {"summary": merge_step(plan.analysis, "summary", answers)}
    result = release(plan.analysis, merged, answers, noise=plan.privacy)
    exact = np.histogram(pd.concat(frames)["age"], bins=[20, 40, 60, 80, 100])[0]
    released = [c for c in result["cells"] if c is not None]
    assert all(c == 0 or c >= 5 for c in released)  # clamped at 0, then suppressed as usual
    assert result["noise"]["cell_std"] == pytest.approx(plan.privacy.sigma * math.sqrt(3))
    assert "sum of 3 sites' noise" in result["noise"]["note"]
    # the released bins are within 5 standard deviations of the exact ones
    for cell, value in zip(result["cells"][1:-1], exact, strict=True):
        if cell is not None:
            assert abs(cell - value) < 5 * result["noise"]["cell_std"]


BOUNDED = {
    **SCHEMA,
    "columns": [
        {"name": "age", "type": "numeric", "min": 20, "max": 100},
        {"name": "sex", "type": "categorical"},
        {"name": "time", "type": "numeric", "min": 0, "max": 40},
    ],
}


def test_moment_noise_is_calibrated_to_the_schema_bounds():
    plan = parse_analysis_plan(
        {
            **spec({"kind": "moments", "columns": ["age", "time"]}),
            "schema": BOUNDED,
            "privacy": LAPLACE,
        }
    )
    noise = plan.privacy
    assert noise.bounds == ((20.0, 100.0), (0.0, 40.0))
    # h = (40, 20): L1 = 1 + 60 + (1600 + 800 + 400)
    assert noise.moment_sensitivity()[0] == pytest.approx(2861.0)
    zero = {"n": np.float64(0), "sum": np.zeros(2), "cross": np.zeros((2, 2))}
    rng = random.Random(5)
    noised = [noise.add_moments(zero, rng) for _ in range(4000)]
    stds = noise.moment_stds()
    # the budget split over the 6 sums, each noised in proportion to its sensitivity
    assert stds["n"] == pytest.approx(2**0.5 * 6 / LAPLACE["epsilon"])
    assert stds["sum"] == pytest.approx([40 * stds["n"], 20 * stds["n"]])
    expected = np.array([[1600, 800], [800, 400]]) * stds["n"]
    assert np.array(stds["cross"]) == pytest.approx(expected)
    assert np.std([d["n"] for d in noised]) == pytest.approx(stds["n"], rel=0.05)
    assert np.array([d["sum"] for d in noised]).std(axis=0) == pytest.approx(stds["sum"], rel=0.05)
    crossed = np.array([d["cross"] for d in noised]).std(axis=0)
    assert crossed == pytest.approx(np.array(stds["cross"]), rel=0.05)
    crosses = [noise.add_moments(zero, rng)["cross"] for _ in range(10)]
    assert all(np.array_equal(c, c.T) for c in crosses)  # symmetric: one noise per entry


def test_noised_moments_are_near_the_clipped_ones_and_state_the_noise():
    analysis = {"kind": "moments", "columns": ["age", "time"]}
    plan = parse_analysis_plan(
        {**spec(analysis), "schema": BOUNDED, "privacy": {**LAPLACE, "epsilon": 50}}
    )
    frames = [frame(seed, n=2000) for seed in (1, 2, 3)]
    policy = DisclosurePolicy()
    answers = [
        site_answer(
            plan.analysis,
            "summary",
            {},
            df,
            policy,
            noise=plan.privacy,
            noise_source=random.Random(i),
        )
        for i, df in enumerate(frames)
    ]
    merged = {"summary": merge_step(plan.analysis, "summary", answers)}
    result = release(plan.analysis, merged, answers, noise=plan.privacy)
    pooled = pd.concat(frames)[["age", "time"]].clip(lower=[20, 0], upper=[100, 40], axis=1)
    stated = result["noise"]
    assert stated["n_std"] == pytest.approx(plan.privacy.moment_stds()["n"] * 3**0.5)
    for j, column in enumerate(["age", "time"]):
        tolerance = 5 * stated["sum_std"][j] / len(pooled) + 5 * stated["n_std"] / len(pooled)
        assert result["mean"][j] == pytest.approx(pooled[column].mean(), abs=tolerance)
    assert abs(result["n"] - len(pooled)) < 5 * stated["n_std"]
    assert "clipped each column to its schema bounds" in result["noise"]["note"]
    assert all(-1 <= c <= 1 for row in result["correlation"] for c in row if c is not None)
