"""Analysis summaries under secure aggregation (issue 16, "sums can travel under secure
aggregation"): the fixed-point cells (fedcore.analytics.secure) sum counts exactly and reals to
2^-33 per site, through real SecAgg clients and server with real masks, and every model fit run
through the steps on those sums still meets the analysis bars (lifelines, statsmodels)."""

from __future__ import annotations

import time
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.datasets import load_lung

from fedcore.analytics import DisclosurePolicy, merge_sums
from fedcore.analytics import secure as sec
from fedcore.analytics.steps import merge_step, next_step, release, secure_answer, site_answer
from fedcore.plan import PlanError, parse_analysis_plan
from fedcore.secagg import SecAggClient, SecAggConfig, SecAggServer, Stage
from tests.unit.test_analysis_models import COVARIATES, REGRESSORS, SCHEMA, TIGHT, by_site, worst
from tests.unit.test_analysis_models import run as clear_run

OPEN = DisclosurePolicy(min_cell_count=1, min_sites=1)


@pytest.fixture(scope="module")
def lung() -> pd.DataFrame:
    df = load_lung().dropna(subset=["inst"])
    return df.assign(female=(df.sex == 2).astype(float))


def secagg_sum(cell_lists: list[list[int]], round_id: str = "analysis:1:summary:1") -> list[int]:
    """The count tails summed by real SecAgg clients and server (masks and all)."""
    n = len(cell_lists)
    config = SecAggConfig(
        round_id=round_id,
        client_ids=tuple(range(1, n + 1)),
        threshold=n // 2 + 1,
        vector_length=1 + len(cell_lists[0]),
        count_length=len(cell_lists[0]),
    )
    server = SecAggServer(config)
    clients = {i: SecAggClient(i) for i in config.client_ids}
    now = time.time()
    requests = server.start(now)
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING):
        for cid, request in requests.items():
            client = clients[cid]
            if stage is Stage.ADVERTISE_KEYS:
                reply = client.advertise_keys(request)
            elif stage is Stage.SHARE_KEYS:
                reply = client.share_keys(request)
            elif stage is Stage.MASKED_INPUT:
                reply = client.masked_input(request, [1.0], cell_lists[cid - 1])
            else:
                reply = client.unmask(request)
            server.collect(cid, reply, now)
        requests = server.advance(now)
    assert server.stage is Stage.DONE
    assert abs(server.result[0] - n) < 1e-6  # every site's float coordinate is 1.0
    return server.counts.tolist()


def test_counts_sum_exactly_under_real_masks_negative_and_large_ones_too() -> None:
    rng = np.random.default_rng(1)
    parts = [
        {
            "counts": rng.integers(-50, 2**40, size=(3, 4)),  # noised counts may be negative
            "n": np.asarray(rng.integers(0, 10**6)),
            "sites": np.asarray(1),
        }
        for _ in range(3)
    ]
    spec = sec.layout(parts[0])
    assert spec == [["counts", [3, 4], "int"], ["n", [], "int"], ["sites", [], "int"]]
    merged = sec.from_cells(secagg_sum([sec.to_cells(p, spec) for p in parts]), spec)
    exact = merge_sums(parts)
    for name in exact:
        assert merged[name].dtype == np.int64 and np.array_equal(merged[name], exact[name])
    assert merged["sites"] == 3


def test_real_sums_are_fixed_point_to_2_to_the_minus_33_per_site() -> None:
    rng = np.random.default_rng(2)
    parts = [
        {"cross": rng.normal(0, 1e6, (4, 4)), "sum": rng.normal(0, 1e-3, 4), "sites": np.asarray(1)}
        for _ in range(5)
    ]
    spec = sec.layout(parts[0])
    cells = [sec.to_cells(p, spec) for p in parts]
    merged = sec.from_cells(np.sum(cells, axis=0), spec)  # what the unmasked sum holds
    scale = 2**32
    for name in ("cross", "sum"):
        values = np.stack([p[name] for p in parts])
        # exactly the sum of the sites' values rounded to multiples of 2^-32 ...
        rounded = [
            float(sum(Fraction(round(v * scale), scale) for v in column))
            for column in values.reshape(5, -1).T
        ]
        assert merged[name].reshape(-1).tolist() == rounded
        # ... so within m * 2^-33 of the sum of the doubles
        error = np.abs(merged[name] - values.sum(axis=0))
        assert error.max() <= 5 * 2.0**-33 + 1e-16 * np.abs(values).sum(axis=0).max()


def test_a_summary_that_cannot_be_encoded_or_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot be summed securely"):
        sec.to_cells({"x": np.asarray([2.0**61])}, [["x", [1], "float"]])
    with pytest.raises(ValueError, match="does not match the layout"):
        sec.to_cells({"x": np.zeros(2)}, [["x", [3], "float"]])
    with pytest.raises(ValueError, match="at most"):
        sec.check_layout([["x", [sec.MAX_CELLS + 1], "float"]])
    with pytest.raises(ValueError, match="sorted"):
        sec.check_layout([["b", [1], "int"], ["a", [1], "int"]])


def secure_run(analysis: dict, frames: list[pd.DataFrame], policy=OPEN) -> tuple[dict, list]:
    """The steps as the server runs them under secure aggregation: every summary leaves as
    cells, only their sum is merged; returns the result and the clear answers the server saw."""
    parsed = parse_analysis_plan(
        {"kind": "analysis", "schema": SCHEMA, "analysis": analysis, "secure_aggregation": True}
    )
    merged: dict = {}
    seen: list = []
    answers: list = []
    while (request := next_step(parsed.analysis, list(merged.values()), secure=True)) is not None:
        step, params = request
        answers, cells = [], []
        for df in frames:
            clear, part = secure_answer(site_answer(parsed.analysis, step, params, df, policy))
            answers.append(clear)
            cells.append(part)
        assert all("summary" not in a for a in answers)
        seen.extend(answers)
        summed = None
        if cells[0]:
            summed = sec.from_cells(np.sum(cells, axis=0), answers[0]["masked"]["layout"])
        merged[step] = merge_step(parsed.analysis, step, answers, summed=summed)
    return release(parsed.analysis, merged, answers, secure=True), seen


@pytest.mark.parametrize("stratified", [True, False])
def test_cox_on_secure_sums_equals_lifelines(lung: pd.DataFrame, stratified: bool) -> None:
    analysis = {
        "kind": "cox",
        "time": "time",
        "event": "status",
        "covariates": COVARIATES,
        "stratified": stratified,
    }
    result, seen = secure_run(analysis, by_site(lung))
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
    # the one thing that travels in clear: the unstratified model's event times (a set)
    assert any("event_times" in a for a in seen) is (not stratified)
    # rounding of the sums neither halves a step nor delays convergence
    assert result["newton_steps"] == clear_run(analysis, by_site(lung))["newton_steps"]


def test_logistic_and_linear_regression_on_secure_sums_equal_statsmodels(
    lung: pd.DataFrame,
) -> None:
    logistic, _ = secure_run(
        {"kind": "logistic_regression", "outcome": "status", "covariates": REGRESSORS},
        by_site(lung),
    )
    rows = lung.dropna(subset=REGRESSORS)
    reference = sm.Logit(rows["status"], sm.add_constant(rows[REGRESSORS])).fit(disp=0)
    for key, expected in (("coef", reference.params), ("se", reference.bse)):
        assert worst(logistic[key], expected) <= 1e-8, key
    clear = clear_run(
        {"kind": "logistic_regression", "outcome": "status", "covariates": REGRESSORS},
        by_site(lung),
    )
    assert worst(logistic["coef"], pd.Series(clear["coef"])) <= 1e-9
    assert logistic["newton_steps"] == clear["newton_steps"]
    linear, _ = secure_run(
        {"kind": "linear_regression", "outcome": "ph.karno", "covariates": REGRESSORS},
        by_site(lung),
    )
    rows = lung.dropna(subset=["ph.karno", *REGRESSORS])
    ols = sm.OLS(rows["ph.karno"], sm.add_constant(rows[REGRESSORS])).fit()
    for key, expected in (("coef", ols.params), ("se", ols.bse)):
        assert worst(linear[key], expected) <= 1e-8, key


def test_kaplan_meier_counts_and_quantiles_on_secure_sums_are_exact(lung: pd.DataFrame) -> None:
    km = {"kind": "kaplan_meier", "time": "time", "event": "status"}
    result, _ = secure_run(km, by_site(lung))
    fitter = KaplanMeierFitter().fit(lung["time"], lung["status"])
    curve = result["curves"]["all"]
    times = curve["time"]
    np.testing.assert_allclose(
        curve["survival"], fitter.survival_function_.loc[times].iloc[:, 0], rtol=0, atol=1e-9
    )
    quantile = {"kind": "quantile", "column": "age", "probs": [0.25, 0.5, 0.9]}
    result, _ = secure_run(quantile, by_site(lung))
    assert result["values"] == np.quantile(lung["age"], [0.25, 0.5, 0.9]).tolist()


def test_an_analysis_plan_takes_secure_aggregation_but_no_secagg_section() -> None:
    spec = {
        "kind": "analysis",
        "schema": SCHEMA,
        "analysis": {"kind": "moments", "columns": ["age"]},
        "secure_aggregation": True,
    }
    plan = parse_analysis_plan(spec)
    assert plan.secure_aggregation and plan.min_sites == 2
    with pytest.raises(PlanError) as caught:
        parse_analysis_plan({**spec, "secagg": {"threshold": 2}})
    assert "takes no settings" in caught.value.errors["secagg"]
    with pytest.raises(PlanError) as caught:
        parse_analysis_plan({**spec, "secure_aggregation": "yes"})
    assert "secure_aggregation" in caught.value.errors
