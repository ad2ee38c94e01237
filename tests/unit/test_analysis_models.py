"""Model fits as analysis plans (issue 16): Cox (stratified by site and unstratified), linear and
logistic regression run through the step protocol (fedcore.analytics.steps, each step what a
site answers to one signed request) equal lifelines and statsmodels on the pooled rows; the plan
refuses covariates outside the schema, a site refuses a small 0/1 cell, and a fit that does not
converge within max_iterations is stopped with the reason."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from lifelines import CoxPHFitter
from lifelines.datasets import load_lung
from statsmodels.duration.hazard_regression import PHReg

from fedcore.analytics import DisclosurePolicy, DisclosureRefused
from fedcore.analytics.steps import merge_step, next_step, release, site_answer
from fedcore.plan import PlanError, parse_analysis_plan

COVARIATES = ["age", "sex", "ph.ecog"]
SCHEMA = {
    "columns": [
        {"name": name, "type": "numeric"}
        for name in ("time", "age", "sex", "ph.ecog", "ph.karno", "wt.loss", "female")
    ],
    "target": {"column": "status", "positive": ["1"]},
    "sensitive": [],
}
TIGHT = {"precision": 1e-12, "r_precision": 1e-14}  # lifelines run to the maximum, as ours is
OPEN = DisclosurePolicy(min_cell_count=1, min_sites=1)


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    df = load_lung().dropna(subset=["inst"])
    return df.assign(female=(df.sex == 2).astype(float))


def by_site(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [rows for _, rows in df.groupby("inst")]


def run(analysis: dict, frames: list[pd.DataFrame], policy: DisclosurePolicy = OPEN) -> dict:
    """The steps as the server runs them: next_step over the merges so far, until released."""
    parsed = parse_analysis_plan({"kind": "analysis", "schema": SCHEMA, "analysis": analysis})
    merged: dict = {}
    answers: list = []
    while (request := next_step(parsed.analysis, list(merged.values()))) is not None:
        step, params = request
        answers = [site_answer(parsed.analysis, step, params, df, policy) for df in frames]
        merged[step] = merge_step(parsed.analysis, step, answers)
    return release(parsed.analysis, merged, answers)


def cox(stratified: bool, **extra: object) -> dict:
    return {
        "kind": "cox",
        "time": "time",
        "event": "status",
        "covariates": COVARIATES,
        "stratified": stratified,
        **extra,
    }


def worst(ours: dict, reference: pd.Series) -> float:
    return max(abs(ours[name] - reference[name]) for name in reference.index)


@pytest.mark.parametrize("stratified", [True, False])
def test_cox_through_the_steps_equals_lifelines(lung: pd.DataFrame, stratified: bool) -> None:
    result = run(cox(stratified), by_site(lung))
    complete = lung[["time", "status", "inst", *COVARIATES]].dropna()
    reference = CoxPHFitter().fit(
        complete if stratified else complete.drop(columns="inst"),
        "time",
        "status",
        strata=["inst"] if stratified else None,
        fit_options=TIGHT,
    )
    assert worst(result["coef"], reference.params_) <= 1e-6
    assert worst(result["se"], reference.standard_errors_) <= 1e-6
    summary = reference.summary
    assert worst(result["p_value"], summary["p"]) <= 1e-6
    assert worst(result["ci_lower"], summary["coef lower 95%"]) <= 1e-6
    assert worst(result["hazard_ratio"], summary["exp(coef)"]) <= 1e-6
    assert result["kind"] == "cox" and result["stratified_by_site"] is stratified
    assert result["rows"] == len(complete) and result["events"] == int(complete.status.sum())
    assert result["sites"] == 18 and 2 <= result["newton_steps"] <= 10
    if not stratified:
        assert result["coarsening"] == "none: exact event times"


def test_unstratified_cox_with_breslow_ties_equals_statsmodels(lung: pd.DataFrame) -> None:
    result = run(cox(False, ties="breslow"), by_site(lung))
    complete = lung[["time", "status", *COVARIATES]].dropna()
    reference = PHReg(
        complete.time, complete[COVARIATES], status=complete.status, ties="breslow"
    ).fit()
    np.testing.assert_allclose([result["coef"][n] for n in COVARIATES], reference.params, atol=1e-6)
    np.testing.assert_allclose([result["se"][n] for n in COVARIATES], reference.bse, atol=1e-6)
    assert result["ties"] == "breslow"


def test_a_site_s_coarsened_times_are_stated_in_the_cox_result(lung: pd.DataFrame) -> None:
    result = run(cox(False), by_site(lung), DisclosurePolicy(1, 1, time_step=30.0))
    assert result["coarsening"] == "times floored to multiples of 30 at every site"


REGRESSORS = ["age", "female", "ph.ecog", "wt.loss"]


def test_linear_regression_through_the_steps_equals_statsmodels_ols(lung: pd.DataFrame) -> None:
    analysis = {"kind": "linear_regression", "outcome": "ph.karno", "covariates": REGRESSORS}
    result = run(analysis, by_site(lung))
    rows = lung.dropna(subset=["ph.karno", *REGRESSORS])
    reference = sm.OLS(rows["ph.karno"], sm.add_constant(rows[REGRESSORS])).fit()
    interval = reference.conf_int()
    for key, expected in (
        ("coef", reference.params),
        ("se", reference.bse),
        ("statistic", reference.tvalues),
        ("p_value", reference.pvalues),
        ("ci_lower", interval[0]),
        ("ci_upper", interval[1]),
    ):
        assert worst(result[key], expected) <= 1e-8, key
    assert abs(result["r_squared"] - reference.rsquared) <= 1e-8
    assert result["distribution"] == "t" and result["rows"] == len(rows)


def test_logistic_regression_by_irls_steps_equals_statsmodels_logit(lung: pd.DataFrame) -> None:
    analysis = {"kind": "logistic_regression", "outcome": "status", "covariates": REGRESSORS}
    result = run(analysis, by_site(lung))
    rows = lung.dropna(subset=REGRESSORS)
    reference = sm.Logit(rows["status"], sm.add_constant(rows[REGRESSORS])).fit(disp=0)
    interval = reference.conf_int()
    for key, expected in (
        ("coef", reference.params),
        ("se", reference.bse),
        ("statistic", reference.tvalues),
        ("p_value", reference.pvalues),
        ("ci_lower", interval[0]),
        ("ci_upper", interval[1]),
    ):
        assert worst(result[key], expected) <= 1e-8, key
    assert abs(result["loglik"] - reference.llf) <= 1e-8
    assert list(result["coef"]) == ["const", *REGRESSORS] and "odds_ratio" in result


def test_each_newton_step_asks_the_sites_at_the_server_s_coefficients(lung: pd.DataFrame) -> None:
    parsed = parse_analysis_plan({"kind": "analysis", "schema": SCHEMA, "analysis": cox(False)})
    step, params = next_step(parsed.analysis, [])
    assert step == "event_times" and params == {}
    answers = [site_answer(parsed.analysis, step, params, df, OPEN) for df in by_site(lung)]
    grid = merge_step(parsed.analysis, step, answers)
    step, params = next_step(parsed.analysis, [grid])
    assert step == "newton-1" and params["beta"] == [0.0, 0.0, 0.0]
    assert params["grid"] == grid["grid"]


@pytest.mark.parametrize(
    ("analysis", "path", "words"),
    [
        (cox(True, covariates=["age", "weight"]), "analysis.covariates", "not in the dataset"),
        (cox(True, covariates=["age", "time"]), "analysis.covariates", "already uses"),
        (cox(True, ties="exact"), "analysis.ties", "efron"),
        ({**cox(True), "stratified": "site"}, "analysis.stratified", "true"),
        (cox(True, max_iterations=0), "analysis.max_iterations", "1 to 100"),
        (
            {"kind": "logistic_regression", "outcome": "status", "covariates": []},
            "analysis.covariates",
            "numeric schema columns",
        ),
        (
            {"kind": "linear_regression", "outcome": "status", "covariates": ["age"]},
            "analysis.outcome",
            "not numeric",
        ),
    ],
)
def test_a_bad_model_plan_is_refused_at_proposal_with_its_path(analysis, path, words) -> None:
    with pytest.raises(PlanError) as caught:
        parse_analysis_plan({"kind": "analysis", "schema": SCHEMA, "analysis": analysis})
    assert path in caught.value.errors and words in caught.value.errors[path]


def test_a_site_refuses_a_model_whose_0_1_covariate_has_a_small_cell(lung: pd.DataFrame) -> None:
    site = by_site(lung)[0]
    few = site.assign(female=[1.0, 1.0] + [0.0] * (len(site) - 2))
    parsed = parse_analysis_plan(
        {
            "kind": "analysis",
            "schema": SCHEMA,
            "analysis": {
                "kind": "logistic_regression",
                "outcome": "status",
                "covariates": ["female"],
            },
        }
    )
    step, params = next_step(parsed.analysis, [])
    with pytest.raises(DisclosureRefused, match="female = 1"):
        site_answer(parsed.analysis, step, params, few, DisclosurePolicy())


def test_a_fit_that_does_not_converge_within_max_iterations_stops_with_the_reason(
    lung: pd.DataFrame,
) -> None:
    with pytest.raises(ValueError, match="no convergence in 1 Newton steps"):
        run(cox(True, max_iterations=1), by_site(lung))


def test_a_site_whose_sums_overflow_refuses_the_step_with_the_reason(lung: pd.DataFrame) -> None:
    parsed = parse_analysis_plan({"kind": "analysis", "schema": SCHEMA, "analysis": cox(True)})
    with pytest.raises(ValueError, match="overflow.*rescale the covariates"):
        site_answer(parsed.analysis, "newton-2", {"beta": [1000.0, 0.0, 0.0]}, lung, OPEN)


def test_a_two_valued_covariate_coded_1_2_is_held_to_the_minimum_cell_count_too(
    lung: pd.DataFrame,
) -> None:
    site = by_site(lung)[0]
    few = site.assign(sex=[2.0, 2.0] + [1.0] * (len(site) - 2))  # two women: sums reveal it
    parsed = parse_analysis_plan({"kind": "analysis", "schema": SCHEMA, "analysis": cox(True)})
    step, params = next_step(parsed.analysis, [])
    with pytest.raises(DisclosureRefused, match="sex = 2"):
        site_answer(parsed.analysis, step, params, few, DisclosurePolicy())


@pytest.mark.parametrize("stratified", [True, False])
def test_a_covariate_of_large_values_is_fitted_centred(lung: pd.DataFrame, stratified) -> None:
    # age plus 100 000 (a code, a date as a number): exp(x'beta) overflows at the first Newton
    # step's coefficients without the centring the sites apply (their own means stratified,
    # the pooled means otherwise; fedcore's cox_fit without a centre fails on these rows)
    days = lung.assign(**{"ph.karno": lung["age"] + 1e5})
    analysis = cox(stratified, covariates=["ph.karno", "sex"])
    result = run(analysis, by_site(days))
    complete = days[["time", "status", "inst", "ph.karno", "sex"]].dropna()
    reference = CoxPHFitter().fit(
        complete if stratified else complete.drop(columns="inst"),
        "time",
        "status",
        strata=["inst"] if stratified else None,
        fit_options=TIGHT,
    )
    assert worst(result["coef"], reference.params_) <= 1e-6
    assert worst(result["se"], reference.standard_errors_) <= 1e-6
