"""Linear and logistic regression from site sums equal statsmodels on the pooled rows (1e-8)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from lifelines.datasets import load_lung

from fedcore.analytics import ConvergenceError, DisclosurePolicy, DisclosureRefused, merge_sums
from fedcore.analytics.regression import (
    check_binary_cells,
    design,
    linear_fit,
    linear_result,
    logistic_fit,
    site_linear_rss,
    site_linear_sums,
)

COVARIATES = ["age", "female", "ph.ecog", "wt.loss"]


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    df = load_lung().dropna(subset=["inst", "age", "ph.ecog", "ph.karno", "wt.loss"])
    return df.assign(female=(df.sex == 2).astype(float))


def by_site(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [rows for _, rows in df.groupby("inst")]


def max_difference(ours: dict, reference: pd.Series) -> float:
    return max(abs(ours[name] - reference[name]) for name in reference.index)


def test_linear_regression_equals_statsmodels_ols(lung: pd.DataFrame) -> None:
    sites = by_site(lung)
    merged = merge_sums([site_linear_sums(s, "ph.karno", COVARIATES) for s in sites])
    beta = linear_fit(merged)
    rss = float(
        merge_sums([site_linear_rss(s, "ph.karno", COVARIATES, beta) for s in sites])["rss"]
    )
    ours = linear_result(merged, ["const", *COVARIATES], beta, rss=rss)
    reference = sm.OLS(lung["ph.karno"], sm.add_constant(lung[COVARIATES])).fit()
    interval = reference.conf_int()
    assert max_difference(ours["coef"], reference.params) <= 1e-8
    assert max_difference(ours["se"], reference.bse) <= 1e-8
    assert max_difference(ours["statistic"], reference.tvalues) <= 1e-8
    assert max_difference(ours["p_value"], reference.pvalues) <= 1e-8
    assert max_difference(ours["ci_lower"], interval[0]) <= 1e-8
    assert max_difference(ours["ci_upper"], interval[1]) <= 1e-8
    assert abs(ours["r_squared"] - reference.rsquared) <= 1e-8
    assert ours["df_resid"] == reference.df_resid and ours["sites"] == len(sites)


def test_logistic_regression_equals_statsmodels_logit(lung: pd.DataFrame) -> None:
    ours = logistic_fit(by_site(lung), "status", COVARIATES)
    reference = sm.Logit(lung["status"], sm.add_constant(lung[COVARIATES])).fit(disp=0)
    interval = reference.conf_int()
    assert max_difference(ours["coef"], reference.params) <= 1e-8
    assert max_difference(ours["se"], reference.bse) <= 1e-8
    assert max_difference(ours["statistic"], reference.tvalues) <= 1e-8
    assert max_difference(ours["p_value"], reference.pvalues) <= 1e-8
    assert max_difference(ours["ci_lower"], interval[0]) <= 1e-8
    assert max_difference(ours["ci_upper"], interval[1]) <= 1e-8
    assert abs(ours["loglik"] - reference.llf) <= 1e-8


def test_a_perfectly_separated_outcome_is_refused_with_the_reason() -> None:
    rng = np.random.default_rng(3)
    sites = []
    for _ in range(3):
        x = rng.normal(size=30)
        sites.append(pd.DataFrame({"x": x, "y": (x > 0).astype(float)}))
    with pytest.raises(ConvergenceError, match="separates the outcome perfectly"):
        logistic_fit(sites, "y", ["x"])


def test_collinear_covariates_are_refused(lung: pd.DataFrame) -> None:
    df = lung.assign(age2=lung.age * 2)
    merged = merge_sums([site_linear_sums(s, "ph.karno", ["age", "age2"]) for s in by_site(df)])
    with pytest.raises(ValueError, match="X'X is singular"):
        linear_fit(merged)


def test_a_binary_covariate_with_few_ones_at_a_site_is_refused() -> None:
    df = pd.DataFrame({"x": [1.0, 0, 0, 0, 0, 0, 0, 0], "y": np.arange(8.0)})
    x, _, names = design(df, "y", ["x"])
    with pytest.raises(DisclosureRefused, match="x = 1"):
        check_binary_cells(DisclosurePolicy(), x, names)
    check_binary_cells(DisclosurePolicy(min_cell_count=1), x, names)
