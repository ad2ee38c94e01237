"""Survival analyses from site sums equal lifelines (and statsmodels) on the pooled rows.

Data: the NCCTG lung cancer trial as lifelines ships it (228 patients; status 1 = death,
0 = censored), one site per institution (``inst``; the one row without an institution is left
out, 227 rows in 18 sites).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

# lifelines is a dev dependency (pyproject's dev extra): imported plainly so that a missing
# install fails the bar instead of skipping it.
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_lung
from lifelines.statistics import logrank_test, multivariate_logrank_test

from fedcore.analytics import merge_sums
from fedcore.analytics.survival import (
    coarsen_times,
    cox_fit,
    km_result,
    logrank_result,
    merge_event_times,
    site_event_times,
    site_km,
)

COVARIATES = ["age", "sex", "ph.ecog"]
# lifelines stops Newton-Raphson when the step falls under 1e-7; its estimate is then ~2e-6
# from the maximum (its own gradient there is ~1e-3), ours is the maximum (gradient ~1e-13).
# The comparison runs lifelines to the maximum too.
TIGHT = {"precision": 1e-12, "r_precision": 1e-14}


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    return load_lung().dropna(subset=["inst"])


def by_site(df: pd.DataFrame) -> list[pd.DataFrame]:
    return [rows for _, rows in df.groupby("inst")]


def km_by_group(df: pd.DataFrame, group: str, levels: list[str], step: float | None = None):
    sites = by_site(df)
    grid = merge_event_times(
        [site_event_times(s, "time", "status", columns=[group], time_step=step) for s in sites]
    )
    merged = merge_sums(
        [
            site_km(s, "time", "status", grid, group=group, levels=levels, time_step=step)
            for s in sites
        ]
    )
    return grid, merged


def max_curve_difference(curve: dict, fitter: KaplanMeierFitter) -> float:
    # Our curve lists 0 and the event times; between them it is a step function. Evaluate it on
    # lifelines' whole timeline (censoring times included).
    times = np.asarray(curve["time"])
    worst = 0.0
    ci = fitter.confidence_interval_
    for name, reference in (
        ("survival", fitter.survival_function_.iloc[:, 0]),
        ("ci_lower", ci.iloc[:, 0]),
        ("ci_upper", ci.iloc[:, 1]),
    ):
        ours = np.asarray(curve[name])[
            np.searchsorted(times, reference.index.to_numpy(), "right") - 1
        ]
        worst = max(worst, float(np.max(np.abs(ours - reference.to_numpy()))))
    return worst


def test_kaplan_meier_and_greenwood_intervals_equal_lifelines(lung: pd.DataFrame) -> None:
    grid, merged = km_by_group(lung, "sex", ["1", "2"])
    result = km_result(merged, grid, levels=["1", "2"])
    assert int(merged["sites"]) == 18
    assert result["coarsening"] == "none: exact event times"
    for level, code in (("1", 1), ("2", 2)):
        rows = lung[lung.sex == code]
        fitter = KaplanMeierFitter().fit(rows.time, rows.status)
        assert max_curve_difference(result["curves"][level], fitter) <= 1e-9
    assert "__other__" not in result["curves"]


def test_one_curve_without_groups(lung: pd.DataFrame) -> None:
    sites = by_site(lung)
    grid = merge_event_times([site_event_times(s, "time", "status") for s in sites])
    merged = merge_sums([site_km(s, "time", "status", grid) for s in sites])
    curve = km_result(merged, grid)["curves"]["all"]
    fitter = KaplanMeierFitter().fit(lung.time, lung.status)
    assert max_curve_difference(curve, fitter) <= 1e-9


def test_logrank_equals_lifelines(lung: pd.DataFrame) -> None:
    grid, merged = km_by_group(lung, "sex", ["1", "2"])
    result = logrank_result(merged, levels=["1", "2"])
    men, women = lung[lung.sex == 1], lung[lung.sex == 2]
    reference = logrank_test(men.time, women.time, men.status, women.status)
    assert abs(result["statistic"] - reference.test_statistic) <= 1e-9
    assert abs(result["p_value"] - reference.p_value) <= 1e-9
    assert result["degrees_of_freedom"] == 1


def test_logrank_over_several_groups_equals_lifelines(lung: pd.DataFrame) -> None:
    rows = lung.dropna(subset=["ph.ecog"])
    rows = rows[rows["ph.ecog"] < 3]  # one patient has ECOG 3
    levels = ["0", "1", "2"]
    grid, merged = km_by_group(rows, "ph.ecog", levels)
    result = logrank_result(merged, levels=levels)
    reference = multivariate_logrank_test(rows.time, rows["ph.ecog"], rows.status)
    assert abs(result["statistic"] - reference.test_statistic) <= 1e-9
    assert result["degrees_of_freedom"] == 2


def test_coarsened_times_give_lifelines_on_the_floored_rows(lung: pd.DataFrame) -> None:
    step = 30.0
    grid, merged = km_by_group(lung, "sex", ["1", "2"], step=step)
    result = km_result(merged, grid, levels=["1", "2"], coarsening="times floored to 30")
    assert set(grid) <= set(np.arange(0, 1100, 30.0))
    floored = lung.assign(time=coarsen_times(lung.time, step))
    for level, code in (("1", 1), ("2", 2)):
        rows = floored[floored.sex == code]
        fitter = KaplanMeierFitter().fit(rows.time, rows.status)
        assert max_curve_difference(result["curves"][level], fitter) <= 1e-9
    men, women = floored[floored.sex == 1], floored[floored.sex == 2]
    reference = logrank_test(men.time, women.time, men.status, women.status)
    assert (
        abs(logrank_result(merged, levels=["1", "2"])["statistic"] - reference.test_statistic)
        <= 1e-9
    )


@pytest.fixture(scope="module")
def complete(lung: pd.DataFrame) -> pd.DataFrame:
    return lung[["time", "status", "inst", *COVARIATES]].dropna()


def test_cox_stratified_by_site_equals_lifelines_with_strata(complete: pd.DataFrame) -> None:
    center = complete[COVARIATES].mean().to_numpy()
    ours = cox_fit(by_site(complete), "time", "status", COVARIATES, stratified=True, center=center)
    reference = CoxPHFitter().fit(complete, "time", "status", strata=["inst"], fit_options=TIGHT)
    for name in COVARIATES:
        assert abs(ours["coef"][name] - reference.params_[name]) <= 1e-6
        assert abs(ours["se"][name] - reference.standard_errors_[name]) <= 1e-6
    assert ours["stratified_by_site"] is True and ours["sites"] == 18
    assert ours["rows"] == len(complete) and ours["events"] == int(complete.status.sum())


def test_cox_unstratified_with_efron_ties_equals_lifelines(complete: pd.DataFrame) -> None:
    center = complete[COVARIATES].mean().to_numpy()
    ours = cox_fit(by_site(complete), "time", "status", COVARIATES, stratified=False, center=center)
    reference = CoxPHFitter().fit(
        complete.drop(columns="inst"), "time", "status", fit_options=TIGHT
    )
    for name in COVARIATES:
        assert abs(ours["coef"][name] - reference.params_[name]) <= 1e-6
        assert abs(ours["se"][name] - reference.standard_errors_[name]) <= 1e-6
    # lifelines with its default stopping rule is within its own tolerance of the same maximum
    default = CoxPHFitter().fit(complete.drop(columns="inst"), "time", "status")
    assert max(abs(ours["coef"][n] - default.params_[n]) for n in COVARIATES) <= 1e-5


def test_cox_with_breslow_ties_equals_statsmodels_phreg(complete: pd.DataFrame) -> None:
    from statsmodels.duration.hazard_regression import PHReg

    ours = cox_fit(
        by_site(complete), "time", "status", COVARIATES, stratified=False, ties="breslow"
    )
    reference = PHReg(
        complete.time, complete[COVARIATES], status=complete.status, ties="breslow"
    ).fit()
    np.testing.assert_allclose([ours["coef"][n] for n in COVARIATES], reference.params, atol=1e-6)
    np.testing.assert_allclose([ours["se"][n] for n in COVARIATES], reference.bse, atol=1e-6)


def test_cox_on_coarsened_times_is_lifelines_on_the_floored_rows(complete: pd.DataFrame) -> None:
    sites = by_site(complete)
    ours = cox_fit(
        sites, "time", "status", COVARIATES, stratified=False, time_steps=[30.0] * len(sites)
    )
    assert ours["coarsening"] == "times floored to multiples of 30 at every site"
    floored = complete.drop(columns="inst").assign(time=coarsen_times(complete.time, 30.0))
    reference = CoxPHFitter().fit(floored, "time", "status", fit_options=TIGHT)
    for name in COVARIATES:
        assert abs(ours["coef"][name] - reference.params_[name]) <= 1e-6


def test_an_event_column_that_is_not_zero_one_is_refused(lung: pd.DataFrame) -> None:
    recoded = lung.assign(status=lung.status + 1)  # R's coding, 1 = censored, 2 = dead
    with pytest.raises(ValueError, match="must hold 0 \\(censored\\) or 1 \\(event\\)"):
        site_event_times(recoded, "time", "status")
