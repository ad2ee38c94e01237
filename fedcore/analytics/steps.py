"""An analysis plan's run as steps: what each site answers, how the server merges, what it releases.

The wiring (the server's analysis run, the site agent) only moves the JSON these functions take
and return; the arithmetic is ``cohort``'s and ``survival``'s. A run is a sequence of steps
(:func:`plan_steps`); each step is one signed request to every site and one reply from each:

- ``"summary"``: the site's sums for the analysis (``site_crosstab``, ``site_moments``,
  ``site_histogram``, ``site_km``), merged by an elementwise sum;
- ``"event_times"`` (Kaplan-Meier's first step): the site's distinct event times, floored to
  its policy's ``time_step``; the server's merge is their union, the grid of the next step;
- ``"bisect-1"``, ``"bisect-2"``, ... (quantiles): the site's row count and how many of its
  values are at most each threshold (``site_count_below``); the server's ``QuantileSearch``,
  replayed over the merges so far, picks the next thresholds until every order statistic is
  exact (:func:`next_step`);
- ``"newton-1"``, ``"newton-2"``, ... (Cox, logistic regression): the site's log-likelihood,
  gradient and Hessian at the coefficients the request carries (``site_cox_stratified``,
  ``site_logistic_step``), or for the unstratified Cox model its risk-set sums on the grid of
  the ``"event_times"`` step before them (``site_cox_sums``; that step also sums the
  covariates, and every site centres them at the pooled means). The server's ``NewtonRaphson``,
  replayed over the merges so far, takes the next step until it converges, at most the plan's
  ``max_iterations`` Newton steps (a halved step is one more request);
- linear regression: ``"summary"`` (X'X, X'y, y'y) then ``"residuals"`` (the sum of squared
  residuals at the estimate, so the standard errors are exact).

Every answer carries the site's disclosure settings that the release must honour (its minimum
cell count, minimum number of sites, time step): :func:`release` suppresses with the largest
minimum cell count of the answering sites and refuses a result of fewer sites than any of them
requires.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from fedcore.analytics import secure as secure_encoding
from fedcore.analytics._newton import NewtonRaphson
from fedcore.analytics._sums import merge_sums
from fedcore.analytics.cohort import (
    QuantileSearch,
    _complete,
    apply_filters,
    crosstab_result,
    moments_result,
    site_count_below,
    site_crosstab,
    site_histogram,
    site_moments,
)
from fedcore.analytics.disclosure import (
    DisclosurePolicy,
    DisclosureRefused,
    check_analysis_allowed,
    check_noise_allowed,
    check_site_count,
    suppress_table,
)
from fedcore.analytics.noise import AnalysisNoise
from fedcore.analytics.regression import (
    SEPARATION_HINT,
    design,
    linear_fit,
    linear_result,
    logistic_result,
    site_linear_rss,
    site_linear_sums,
    site_logistic_step,
)
from fedcore.analytics.survival import (
    MONOTONE_HINT,
    _cox_rows,
    cox_from_sums,
    cox_result,
    describe_coarsening,
    km_result,
    logrank_result,
    merge_event_times,
    site_cox_stratified,
    site_cox_sums,
    site_event_times,
    site_km,
    survival_rows,
)
from fedcore.plan.analysis import Analysis

__all__ = [
    "merge_step",
    "next_step",
    "plan_steps",
    "release",
    "secure_answer",
    "site_answer",
    "step_params",
]

SUMMARY, EVENT_TIMES, BISECT, NEWTON, RESIDUALS = (
    "summary",
    "event_times",
    "bisect-",
    "newton-",
    "residuals",
)
# Newton's convergence: every component of the step below this (the fit is then the maximum
# to ~1e-13 in the gradient; lifelines' default stops at 1e-7).
NEWTON_TOL = 1e-10
# A bisection over the 64-bit keys of doubles narrows each span about 16-fold a step (15 probes):
# 16 steps suffice; the cap stops a search that does not converge (sites changing their data).
MAX_BISECTIONS = 40


def plan_steps(analysis: Analysis) -> tuple[str, ...]:
    """The fixed steps of an analysis, in order (a quantile's steps depend on the answers:
    :func:`next_step`)."""
    if analysis.kind == "kaplan_meier":
        return (EVENT_TIMES, SUMMARY)
    if analysis.kind == "quantile":
        return ()
    if analysis.kind == "cox":
        return () if analysis.stratified else (EVENT_TIMES,)
    if analysis.kind == "logistic_regression":
        return ()
    if analysis.kind == "linear_regression":
        return (SUMMARY, RESIDUALS)
    return (SUMMARY,)


def _iterative(analysis: Analysis) -> bool:
    """Whether the analysis asks Newton steps after its fixed ones."""
    return analysis.kind in ("cox", "logistic_regression")


def _newton(
    analysis: Analysis, history: Sequence[Mapping[str, Any]], *, secure: bool = False
) -> NewtonRaphson:
    """The server's Newton-Raphson replayed over the merged Newton steps so far (``history``
    starts after the fixed steps). Deterministic: each replayed point is the one asked.
    ``secure``: the sums came through secure aggregation, in fixed point: two merged
    log-likelihoods may differ by up to 2 * sites * 2^-33 from rounding alone, a merged
    gradient component by sites * 2^-33 (``NewtonRaphson``'s slacks)."""
    hint = MONOTONE_HINT if analysis.kind == "cox" else SEPARATION_HINT
    sites = int(np.asarray(history[0].get("sites", 1))) if history else 1
    fit = NewtonRaphson(
        len(analysis.coefficients),
        tol=NEWTON_TOL,
        max_iter=analysis.max_iterations,
        hint=hint,
        loglik_slack=2 * sites * secure_encoding.RESOLUTION if secure else 0.0,
        gradient_slack=sites * secure_encoding.RESOLUTION if secure else 0.0,
    )
    for merged in history:
        data = {k: np.asarray(v, dtype=np.float64) for k, v in merged.items()}
        if analysis.kind == "cox" and not analysis.stratified:
            fit.observe(*cox_from_sums(data, fit.beta, ties=analysis.ties))
        else:
            fit.observe(float(data["loglik"]), data["gradient"], data["hessian"])
    return fit


def _search(analysis: Analysis, history: Sequence[Mapping[str, Any]], min_cell_count: int = 1):
    search = QuantileSearch(analysis.probs, method=analysis.method, min_cell_count=min_cell_count)
    for merged in history:
        search.thresholds()
        search.update({k: np.asarray(v) for k, v in merged.items()})
    return search


def next_step(
    analysis: Analysis, history: Sequence[Mapping[str, Any]], *, secure: bool = False
) -> tuple[str, dict[str, Any]] | None:
    """The next step to ask and its parameters, given the merges of the steps so far (in
    order); None when the result can be released. ``secure``: the merges are sums under
    secure aggregation (fixed point: :func:`_newton`).

    Raises:
        ValueError: a quantile search that cannot go on (no rows, the sites' count changed, more
            than ``MAX_BISECTIONS`` steps).
    """
    if _iterative(analysis):
        fixed = plan_steps(analysis)
        if len(history) < len(fixed):
            step = fixed[len(history)]
            return step, step_params(analysis, step, dict(zip(fixed, history, strict=False)))
        fit = _newton(analysis, history[len(fixed) :], secure=secure)
        if fit.done:
            return None
        params: dict[str, Any] = {"beta": fit.beta.tolist()}
        if fixed:
            params["grid"] = list(history[0]["grid"])
            params["center"] = list(history[0]["center"])
        return f"{NEWTON}{len(history) - len(fixed) + 1}", params
    if analysis.kind != "quantile":
        steps = plan_steps(analysis)
        if len(history) >= len(steps):
            return None
        step = steps[len(history)]
        merged = dict(zip(steps, history, strict=False))
        return step, step_params(analysis, step, merged)
    search = _search(analysis, history)
    if search.done:
        return None
    if len(history) >= MAX_BISECTIONS:
        raise ValueError(f"the quantile search did not converge in {MAX_BISECTIONS} steps")
    return f"{BISECT}{len(history) + 1}", {"thresholds": search.thresholds().tolist()}


def site_answer(
    analysis: Analysis,
    step: str,
    params: Mapping[str, Any],
    df: pd.DataFrame,
    policy: DisclosurePolicy,
    *,
    noise: AnalysisNoise | None = None,
    noise_source: random.Random | None = None,
) -> dict[str, Any]:
    """A site's answer to one step (JSON data), after its disclosure policy allowed it.

    Args:
        analysis: the plan's analysis (parsed by the site from the signed plan).
        step: the step requested (one of :func:`plan_steps`).
        params: what the server derived from earlier steps (``{"grid": [...]}`` for
            Kaplan-Meier's counts).
        df: the site's validated rows.
        policy: the site's ``[disclosure]``.
        noise: the plan's privacy section (``AnalysisPlan.privacy``): the site adds it to its
            count table and the answer says so (``"noise"``).
        noise_source: the noise's randomness; default the operating system's. Tests only.

    Raises:
        DisclosureRefused: the policy forbids the analysis, or the cohort (or a group of it)
            holds from 1 to ``min_cell_count - 1`` rows here.
        ValueError: a step this analysis does not have, or data the analysis cannot use.
    """
    bisect = analysis.kind == "quantile" and step.startswith(BISECT)
    newton = _iterative(analysis) and step.startswith(NEWTON)
    if step not in plan_steps(analysis) and not bisect and not newton:
        raise ValueError(
            f"step {step!r} is not a step of a {analysis.kind!r} analysis "
            f"({', '.join(plan_steps(analysis))})"
        )
    for kind in analysis.policy_kinds:
        check_analysis_allowed(policy, kind)
    check_noise_allowed(
        policy,
        None if noise is None else noise.epsilon,
        mechanism=None if noise is None else noise.mechanism,
    )
    _check_cohort(analysis, df, policy)
    out: dict[str, Any] = {
        "step": step,
        "min_cell_count": policy.min_cell_count,
        "min_sites": policy.min_sites,
        "time_step": policy.time_step,
    }
    if bisect:
        assert analysis.column is not None
        thresholds = params.get("thresholds")
        if not isinstance(thresholds, list) or not thresholds:
            raise ValueError("a bisection step needs the server's thresholds")
        part = site_count_below(df, analysis.column, thresholds, filters=analysis.filters)
        out["summary"] = {name: np.asarray(value).tolist() for name, value in part.items()}
        return out
    if newton or step == RESIDUALS:
        part = _site_model_step(analysis, params, df, policy)
        if not all(
            np.all(np.isfinite(np.asarray(value, dtype=np.float64))) for value in part.values()
        ):
            raise ValueError(
                f"the site's sums overflow at the coefficients of step {step!r} (exp of a "
                "large linear predictor): rescale the covariates with large values (days to "
                "years, say) and propose the plan again"
            )
        out["summary"] = {name: np.asarray(value).tolist() for name, value in part.items()}
        return out
    if step == EVENT_TIMES:
        assert analysis.time is not None and analysis.event is not None
        # Cox: the complete cases of its covariates, the rows its later steps use
        columns = [] if analysis.group is None else [analysis.group]
        times = site_event_times(
            df,
            analysis.time,
            analysis.event,
            columns=[*columns, *analysis.covariates],
            filters=analysis.filters,
            time_step=policy.time_step,
        )
        out["event_times"] = times.tolist()
        if analysis.kind == "cox":
            # The covariates' sums: the server centres every site's covariates at the pooled
            # means (the partial likelihood does not change; exp(x'beta) stays in range).
            _, _, x = _cox_rows(
                df, analysis.time, analysis.event, analysis.covariates, None, analysis.filters, None
            )
            out["summary"] = {"n": len(x), "xsum": x.sum(axis=0).tolist()}
        return out
    if noise is not None and analysis.kind == "moments":
        x = _complete(df, analysis.columns, analysis.filters)
        low, high = (np.array(side, dtype=np.float64) for side in zip(*noise.bounds, strict=True))
        centered = np.clip(x, low, high) - (low + high) / 2.0
        exact = {
            "n": np.float64(len(x)),
            "sum": centered.sum(axis=0),
            "cross": centered.T @ centered,
        }
        part = noise.add_moments(exact, noise_source)
        out["noise"] = noise.describe()
        out["summary"] = {name: np.asarray(value).tolist() for name, value in part.items()}
        out["summary"]["sites"] = 1
        return out
    part = _site_summary(analysis, params, df, policy)
    if noise is not None:
        if "counts" not in part:  # the plan language allows noise on count tables only
            raise ValueError(f"a {analysis.kind!r} analysis cannot be noised")
        part = {**part, "counts": noise.add(part["counts"], noise_source)}
        out["noise"] = noise.describe()
    out["summary"] = {name: np.asarray(value).tolist() for name, value in part.items()}
    return out


def _beta(analysis: Analysis, params: Mapping[str, Any]) -> np.ndarray:
    beta = params.get("beta")
    size = len(analysis.coefficients)
    if (
        not isinstance(beta, list)
        or len(beta) != size
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in beta)
        or not np.all(np.isfinite(np.asarray(beta, dtype=np.float64)))
    ):
        raise ValueError(f"a model step needs the server's {size} finite coefficients (beta)")
    return np.asarray(beta, dtype=np.float64)


def _site_model_step(
    analysis: Analysis, params: Mapping[str, Any], df: pd.DataFrame, policy: DisclosurePolicy
) -> dict[str, np.ndarray]:
    """A site's sums of one Newton step (or of linear regression's residuals) at ``beta``."""
    beta = _beta(analysis, params)
    if analysis.kind == "cox":
        assert analysis.time is not None and analysis.event is not None
        if analysis.stratified:
            # The site is its own stratum: centring at its own means changes nothing in its
            # partial likelihood and keeps exp(x'beta) in range.
            _, _, x = _cox_rows(
                df, analysis.time, analysis.event, analysis.covariates, None, analysis.filters, None
            )
            return site_cox_stratified(
                df,
                analysis.time,
                analysis.event,
                analysis.covariates,
                beta,
                ties=analysis.ties,
                center=x.mean(axis=0) if len(x) else None,
                filters=analysis.filters,
            )
        grid = params.get("grid")
        if not isinstance(grid, list) or not grid:
            raise ValueError("an unstratified Cox step needs the server's grid of event times")
        center = params.get("center")
        if (
            not isinstance(center, list)
            or len(center) != len(analysis.covariates)
            or not all(isinstance(c, int | float) and not isinstance(c, bool) for c in center)
        ):
            raise ValueError("an unstratified Cox step needs the server's centre of each covariate")
        return site_cox_sums(
            df,
            analysis.time,
            analysis.event,
            analysis.covariates,
            beta,
            grid,
            center=center,
            filters=analysis.filters,
            time_step=policy.time_step,
        )
    assert analysis.outcome is not None
    if analysis.kind == "logistic_regression":
        return site_logistic_step(
            df,
            analysis.outcome,
            analysis.covariates,
            beta,
            intercept=analysis.intercept,
            filters=analysis.filters,
        )
    return site_linear_rss(
        df,
        analysis.outcome,
        analysis.covariates,
        beta,
        intercept=analysis.intercept,
        filters=analysis.filters,
    )


def _check_model_cohort(analysis: Analysis, df: pd.DataFrame, policy: DisclosurePolicy) -> None:
    """The complete cases of a model fit, a Cox model's events and the rows of each value of
    every two-valued column are 0 or at least the minimum cell count at this site."""
    what = "the cohort" if analysis.filters else "the site's rows"
    covariates = ", ".join(analysis.covariates)
    if analysis.kind == "cox":
        assert analysis.time is not None and analysis.event is not None
        times, events, extra = _cox_rows(
            df, analysis.time, analysis.event, analysis.covariates, None, analysis.filters, None
        )
        check_site_count(policy, len(times), f"{what} (complete cases of {covariates})")
        check_site_count(policy, int(events.sum()), f"the events of {what}")
        _check_two_valued(policy, extra, analysis.covariates)
        return
    assert analysis.outcome is not None
    x, y, names = design(
        df, analysis.outcome, analysis.covariates, intercept=False, filters=analysis.filters
    )
    check_site_count(policy, len(y), f"{what} (complete cases of {covariates})")
    _check_two_valued(policy, np.concatenate([x, y[:, None]], axis=1), [*names, analysis.outcome])


def _check_two_valued(policy: DisclosurePolicy, x: np.ndarray, names: Sequence[str]) -> None:
    """A column with two values at the site is a count table in disguise: its sums (in X'X,
    X'y, a gradient) and the row count give how many rows hold each value. Each count must be
    0 or at least the minimum cell count (``check_binary_cells`` for any two values)."""
    for j, name in enumerate(names):
        values, counts = np.unique(x[:, j], return_counts=True)
        if values.size == 2:
            for value, count in zip(values, counts, strict=True):
                check_site_count(policy, int(count), f"the rows with {name} = {value:g}")


def _check_cohort(analysis: Analysis, df: pd.DataFrame, policy: DisclosurePolicy) -> None:
    if analysis.kind in ("cox", "linear_regression", "logistic_regression"):
        _check_model_cohort(analysis, df, policy)
        return
    what = "the cohort" if analysis.filters else "the site's rows"
    if analysis.kind == "kaplan_meier":
        assert analysis.time is not None and analysis.event is not None
        columns = [] if analysis.group is None else [analysis.group]
        times, _, extra = survival_rows(
            df, analysis.time, analysis.event, columns, filters=analysis.filters
        )
        check_site_count(policy, len(times), what)
        if analysis.group is not None:
            for level, count in extra[analysis.group].astype(str).value_counts().items():
                check_site_count(policy, int(count), f"group {analysis.group}={level}")
        return
    if analysis.kind in ("moments", "quantile"):
        columns = analysis.columns or (analysis.column,)
        rows = len(_complete(df, columns, analysis.filters))
        check_site_count(policy, rows, f"{what} (complete cases of {', '.join(columns)})")
        return
    check_site_count(policy, int(apply_filters(df, analysis.filters).sum()), what)


def _site_summary(
    analysis: Analysis, params: Mapping[str, Any], df: pd.DataFrame, policy: DisclosurePolicy
) -> dict[str, np.ndarray]:
    if analysis.kind in ("count", "crosstab"):
        assert analysis.rows is not None and analysis.levels is not None
        return site_crosstab(
            df, analysis.rows, analysis.levels, cols=analysis.cols, filters=analysis.filters
        )
    if analysis.kind == "moments":
        return site_moments(df, analysis.columns, filters=analysis.filters)
    if analysis.kind == "histogram":
        assert analysis.column is not None
        return site_histogram(df, analysis.column, analysis.edges, filters=analysis.filters)
    if analysis.kind == "linear_regression":
        assert analysis.outcome is not None
        return site_linear_sums(
            df,
            analysis.outcome,
            analysis.covariates,
            intercept=analysis.intercept,
            filters=analysis.filters,
        )
    assert analysis.time is not None and analysis.event is not None
    grid = params.get("grid")
    if not isinstance(grid, list) or not grid:
        raise ValueError("the Kaplan-Meier counts step needs the server's grid of event times")
    return site_km(
        df,
        analysis.time,
        analysis.event,
        grid,
        group=analysis.group,
        levels=analysis.group_levels,
        filters=analysis.filters,
        time_step=policy.time_step,
    )


def merge_step(
    analysis: Analysis,
    step: str,
    answers: Sequence[Mapping[str, Any]],
    *,
    summed: Mapping[str, Any] | None = None,
) -> dict:
    """The server's merge of one step's answers (JSON data).

    Args:
        summed: the sum of the answers' summaries when secure aggregation computed it (the
            answers then carry no summary, :func:`secure_answer`); None: summed here.

    Raises:
        ValueError: answers that do not fit the step (the message says which).
    """

    def sums() -> dict[str, np.ndarray]:
        if summed is not None:
            return {k: np.asarray(v) for k, v in summed.items()}
        return merge_sums(
            [{k: np.asarray(v) for k, v in answer["summary"].items()} for answer in answers]
        )

    if step == EVENT_TIMES:
        grid = merge_event_times([answer["event_times"] for answer in answers])
        out: dict[str, Any] = {"grid": grid.tolist()}
        if analysis.kind == "cox":
            merged = sums()
            n = max(int(merged["n"]), 1)
            out["center"] = (np.asarray(merged["xsum"], dtype=np.float64) / n).tolist()
        return out
    return {name: value.tolist() for name, value in sums().items()}


def secure_answer(answer: Mapping[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """A site's answer for a plan under secure aggregation: what travels in clear, and the
    summary as the count tail of its SecAgg vector (``fedcore.analytics.secure``).

    The clear part is the answer without its ``summary``, with ``"masked"`` (the summary's
    layout) in its place: the server opens the step's SecAgg session from it. An answer without
    a summary (Kaplan-Meier's event times) travels as it is, with no cells.
    """
    if "summary" not in answer:
        return dict(answer), []
    clear = {k: v for k, v in answer.items() if k != "summary"}
    spec = secure_encoding.layout(answer["summary"])
    clear["masked"] = {"layout": spec}
    return clear, secure_encoding.to_cells(answer["summary"], spec)


def step_params(analysis: Analysis, step: str, merged: Mapping[str, Any]) -> dict[str, Any]:
    """What the request of ``step`` carries, given the merge of the steps before it."""
    if analysis.kind == "kaplan_meier" and step == SUMMARY:
        return {"grid": list(merged[EVENT_TIMES]["grid"])}
    if analysis.kind == "linear_regression" and step == RESIDUALS:
        data = {k: np.asarray(v, dtype=np.float64) for k, v in merged[SUMMARY].items()}
        return {"beta": linear_fit(data).tolist()}
    return {}


def release(
    analysis: Analysis,
    merged: Mapping[str, Any],
    answers: Sequence[Mapping[str, Any]],
    *,
    min_silos: int = 1,
    noise: AnalysisNoise | None = None,
    secure: bool = False,
) -> dict[str, Any]:
    """The released result of a finished analysis (``secure``: as for :func:`next_step`).

    Args:
        merged: step -> its merge (:func:`merge_step`).
        answers: the last step's answers (their disclosure settings bind the release).
        min_silos: the plan's minimum.
        noise: the plan's privacy section: the merged table (the sum of the sites' noised
            tables) is clamped at 0 before suppression, and the result states the noise.

    Raises:
        DisclosureRefused: fewer sites answered than the plan or any answering site requires.
    """
    sites = len(answers)
    needed = max([min_silos, *(int(a["min_sites"]) for a in answers)])
    if sites < needed:
        raise DisclosureRefused(
            f"{sites} site(s) answered; the plan or a site's disclosure policy releases only "
            f"results of at least {needed} sites, so nothing is released"
        )
    min_cell = max(int(a["min_cell_count"]) for a in answers)
    result: dict[str, Any] = {"kind": analysis.kind, "sites": sites}
    if analysis.kind == "quantile":
        # Replayed with the strictest site's minimum: no order statistic fewer than that many
        # rows from either end (the minimum or the maximum is one patient's value).
        history = [merged[f"{BISECT}{i}"] for i in range(1, len(merged) + 1)]
        result.update(_search(analysis, history, min_cell).result())
        result["column"] = analysis.column
        result["min_cell_count"] = min_cell
        result["sites"] = sites
        return result
    if analysis.kind in ("cox", "linear_regression", "logistic_regression"):
        result.update(_model_result(analysis, merged, answers, secure=secure))
        result["sites"] = sites
        return result
    data = {k: np.asarray(v) for k, v in merged[SUMMARY].items()}
    if noise is not None and analysis.kind == "moments":
        result.update(_noised_moments_result(analysis, data, noise, sites))
        return result
    if noise is not None:
        data["counts"] = np.maximum(np.asarray(data["counts"], dtype=np.int64), 0)
        result["noise"] = {
            **noise.describe(),
            "cell_std": noise.cell_std() * sites**0.5,
            "note": (
                f"every site added independent {noise.mechanism} noise to each cell of its "
                f"table (epsilon {noise.epsilon:g} per site"
                + (f", delta {noise.delta:g}" if noise.delta is not None else "")
                + f"); each released cell carries the sum of {sites} sites' noise (standard "
                "deviation cell_std), clamped at 0, then suppressed as exact counts are"
            ),
        }
    if analysis.kind in ("count", "crosstab"):
        assert analysis.rows is not None and analysis.levels is not None
        result.update(
            crosstab_result(
                data, analysis.levels, analysis.rows, analysis.cols, min_cell_count=min_cell
            )
        )
        result["min_cell_count"] = min_cell
    elif analysis.kind == "moments":
        result.update(moments_result(data, analysis.columns))
    elif analysis.kind == "histogram":
        table = suppress_table(np.asarray(data["counts"], dtype=np.int64), min_cell).released()
        result.update(table)
        result["edges"] = list(analysis.edges)
        result["bins"] = "[below first edge, bins as numpy.histogram..., above last edge]"
        result["min_cell_count"] = min_cell
    else:
        grid = merged[EVENT_TIMES]["grid"]
        coarsening = describe_coarsening([a["time_step"] for a in answers])
        result.update(
            km_result(
                data,
                grid,
                levels=analysis.group_levels,
                alpha=analysis.alpha,
                coarsening=coarsening,
            )
        )
        if analysis.logrank:
            result["logrank"] = logrank_result(data, levels=analysis.group_levels)
    result["sites"] = sites
    return result


def _noised_moments_result(
    analysis: Analysis, data: dict[str, np.ndarray], noise: AnalysisNoise, sites: int
) -> dict[str, Any]:
    """Moments from noised sums of clipped values: n rounded, variances clamped at 0,
    correlations to [-1, 1] (post-processing), and the noise and clipping stated."""
    low, high = (np.array(side, dtype=np.float64) for side in zip(*noise.bounds, strict=True))
    data = {**data, "n": np.asarray(round(float(data["n"])))}
    with np.errstate(invalid="ignore", divide="ignore"):  # a noised variance may be < 0
        out = moments_result(data, analysis.columns, shift=(low + high) / 2.0)
    variance = np.maximum(np.asarray(out["variance"], dtype=np.float64), 0.0)
    sd = np.sqrt(variance)
    cov = np.asarray(out["covariance"], dtype=np.float64)
    np.fill_diagonal(cov, variance)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.clip(cov / np.outer(sd, sd), -1.0, 1.0)
    np.fill_diagonal(corr, 1.0)

    def finite(values: np.ndarray) -> list:
        return np.where(np.isfinite(values), values, None).tolist()

    out.update(
        variance=variance.tolist(),
        sd=sd.tolist(),
        covariance=finite(cov),
        correlation=finite(corr),
        mean=np.clip(np.asarray(out["mean"], dtype=np.float64), low, high).tolist(),
        noise={
            **noise.describe(),
            **{
                f"{what}_std": (np.asarray(std) * sites**0.5).tolist()
                for what, std in noise.moment_stds().items()
            },
            "note": (
                f"every site clipped each column to its schema bounds and added independent "
                f"{noise.mechanism} noise to its count, sums and cross products (epsilon "
                f"{noise.epsilon:g} per site"
                + (f", delta {noise.delta:g}" if noise.delta is not None else "")
                + ", split equally over them, each noised in proportion to its sensitivity"
                + f"); each released figure carries {sites} sites' noise (standard deviations "
                "n_std, sum_std per column, cross_std); the count is rounded, variances "
                "clamped at 0, correlations to [-1, 1], means to the bounds"
            ),
        },
        sites=sites,
    )
    return out


def _model_result(
    analysis: Analysis,
    merged: Mapping[str, Any],
    answers: Sequence[Mapping[str, Any]],
    *,
    secure: bool = False,
) -> dict[str, Any]:
    """A model's coefficient table (coef, se, statistic, p_value, ci_lower, ci_upper; hazard or
    odds ratios) from the merges of its steps."""
    sites = len(answers)
    if analysis.kind == "linear_regression":
        data = {k: np.asarray(v, dtype=np.float64) for k, v in merged[SUMMARY].items()}
        beta = linear_fit(data)
        rss = float(np.asarray(merged[RESIDUALS]["rss"]))
        table = linear_result(data, analysis.coefficients, beta, rss=rss, alpha=analysis.alpha)
        table["outcome"] = analysis.outcome
        return table
    fixed = plan_steps(analysis)
    steps = [*fixed, *sorted((s for s in merged if s.startswith(NEWTON)), key=_newton_index)]
    history = [merged[s] for s in steps[len(fixed) :]]
    fit = _newton(analysis, history, secure=secure)
    if not fit.done:
        raise ValueError("the model fit has not converged; nothing to release")
    last = {k: np.asarray(v) for k, v in history[-1].items()}
    if analysis.kind == "logistic_regression":
        table = logistic_result(
            fit, analysis.coefficients, rows=int(last["n"]), sites=sites, alpha=analysis.alpha
        )
        table["events"] = int(last["events"])
        table["outcome"] = analysis.outcome
    else:
        events = int(last["events"]) if analysis.stratified else int(last["deaths"].sum())
        table = cox_result(
            fit,
            analysis.covariates,
            stratified=analysis.stratified,
            ties=analysis.ties,
            rows=int(last["rows"]),
            events=events,
            sites=sites,
            coarsening=describe_coarsening([a.get("time_step") for a in answers]),
            alpha=analysis.alpha,
        )
    table["newton_steps"] = len(history)
    return table


def _newton_index(step: str) -> int:
    return int(step[len(NEWTON) :])
