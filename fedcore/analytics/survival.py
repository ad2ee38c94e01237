"""Survival: Kaplan-Meier with Greenwood intervals, the log-rank test, Cox proportional hazards.

Times first go through the site's coarsening (``coarsen_times``: floored to a multiple of the
policy's ``time_step``, or left exact). Round one collects the sites' distinct event times
(``site_event_times``, a set, not a sum: it reveals the event times as coarsened) and the server
takes their union as the grid. Every later summary is a sum over that grid:

* ``site_km``: per group and grid time ``t_j``, the rows at risk ``#{T >= t_j}`` and the events
  with ``t_j <= T < t_{j+1}``. With the grid holding every event time this is exactly the table
  lifelines builds from the pooled rows, so ``km_result`` and ``logrank_result`` equal
  lifelines' ``KaplanMeierFitter`` (exponential Greenwood intervals, the log-log form) and
  ``logrank_test``/``multivariate_logrank_test``.
* ``site_cox_sums``: per grid time, the risk-set sums of w, w x and w x x' (w = exp(x'beta)) and
  the same sums over the events there; ``cox_from_sums`` turns the merged sums into the partial
  log-likelihood, gradient and Hessian with Efron's ties (lifelines' and R's default) or
  Breslow's, and ``NewtonRaphson`` steps. The pooled-rows fit is reproduced exactly.
* ``site_cox_stratified``: stratified by site the partial likelihood is a sum over sites, so each
  site evaluates its own on its own exact times and sends three sums; no time leaves the site.

With a coarsening step the results are those of the pooled rows with times floored to the step,
exactly; ``coarsening`` in every result says which step applied.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats

from fedcore.analytics._newton import NewtonRaphson, coefficient_table
from fedcore.analytics._sums import Summary, merge_sums, summary
from fedcore.analytics.cohort import OTHER_LEVEL, Filter, _label_values, _level_index, apply_filters

__all__ = [
    "MONOTONE_HINT",
    "TIES",
    "coarsen_times",
    "describe_coarsening",
    "cox_fit",
    "cox_from_sums",
    "cox_result",
    "km_result",
    "logrank_result",
    "merge_event_times",
    "site_cox_stratified",
    "site_cox_sums",
    "site_event_times",
    "site_km",
    "survival_rows",
]

TIES: tuple[str, ...] = ("efron", "breslow")
MONOTONE_HINT = (
    "in a Cox model this usually means a covariate orders the events perfectly (monotone "
    "likelihood), which makes the estimate infinite: drop or coarsen that covariate"
)


def coarsen_times(times: ArrayLike, step: float | None) -> np.ndarray:
    """Floor every time to a multiple of ``step`` (None: the times as they are)."""
    values = np.asarray(times, dtype=np.float64)
    if step is None:
        return values
    return np.floor(values / step) * step


def survival_rows(
    df: pd.DataFrame,
    time: str,
    event: str,
    columns: Sequence[str] = (),
    *,
    filters: Sequence[Filter] = (),
    time_step: float | None = None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """The complete cases of a survival analysis: times (coarsened), events (bool), columns.

    Raises:
        ValueError: an event value other than 0/1, or a negative time.
    """
    selected = df.loc[apply_filters(df, filters)]
    times = pd.to_numeric(selected[time], errors="coerce").to_numpy(dtype=np.float64)
    events = pd.to_numeric(selected[event], errors="coerce").to_numpy(dtype=np.float64)
    keep = np.isfinite(times) & np.isfinite(events)
    for name in columns:
        column = selected[name]
        if pd.api.types.is_numeric_dtype(column.dtype):
            keep &= np.isfinite(pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64))
        else:
            keep &= ~np.asarray(column.isna())
    bad = keep & ~np.isin(events, (0.0, 1.0))
    if bad.any():
        raise ValueError(
            f"event column {event!r} must hold 0 (censored) or 1 (event); found "
            f"{events[bad][0]!r}: recode it in the site's data"
        )
    if np.any(times[keep] < 0):
        raise ValueError(f"time column {time!r} holds a negative time; times start at 0")
    return (
        coarsen_times(times[keep], time_step),
        events[keep] == 1.0,
        selected.loc[keep, list(columns)],
    )


def site_event_times(
    df: pd.DataFrame,
    time: str,
    event: str,
    *,
    columns: Sequence[str] = (),
    filters: Sequence[Filter] = (),
    time_step: float | None = None,
) -> np.ndarray:
    """Round one: the site's distinct event times (coarsened). A set, not a sum."""
    times, events, _ = survival_rows(df, time, event, columns, filters=filters, time_step=time_step)
    return np.unique(times[events])


def merge_event_times(parts: Sequence[ArrayLike]) -> np.ndarray:
    """The grid: the sorted union of the sites' event times."""
    arrays = [np.asarray(part, dtype=np.float64).ravel() for part in parts]
    if not arrays:
        raise ValueError("no site sent event times")
    grid = np.unique(np.concatenate(arrays))
    if not np.all(np.isfinite(grid)):
        raise ValueError("an event time is not finite")
    return grid


def _grid_positions(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    # Index of the grid point each time is floored to (-1: before the grid starts).
    return np.searchsorted(grid, times, side="right") - 1


def _at_risk(times: np.ndarray, grid: np.ndarray) -> np.ndarray:
    ordered = np.sort(times)
    return len(ordered) - np.searchsorted(ordered, grid, side="left")


def _check_grid(grid: ArrayLike) -> np.ndarray:
    values = np.asarray(grid, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or np.any(np.diff(values) <= 0):
        raise ValueError("the time grid must be a non-empty increasing list of times")
    return values


def _event_positions(times: np.ndarray, events: np.ndarray, grid: np.ndarray) -> np.ndarray:
    positions = _grid_positions(times[events], grid)
    if np.any(positions < 0):
        raise ValueError(
            "an event precedes the first time of the grid; the grid must start at or before "
            "the earliest event (take the union of every site's event times)"
        )
    return positions


def site_km(
    df: pd.DataFrame,
    time: str,
    event: str,
    grid: ArrayLike,
    *,
    group: str | None = None,
    levels: Sequence[str] = (),
    filters: Sequence[Filter] = (),
    time_step: float | None = None,
) -> Summary:
    """Site part of Kaplan-Meier and the log-rank test: events and at-risk counts on the grid.

    Args:
        df: the site's validated rows.
        time, event: the duration column and the 0/1 event column.
        grid: the merged event times (``merge_event_times``).
        group: the grouping column (None: one curve).
        levels: the group levels fixed by the request; other values count in ``"__other__"``.
        filters: the cohort.
        time_step: the site's coarsening step.

    Returns:
        ``{"events": (g, m), "at_risk": (g, m), "rows": (g,), "sites": 1}``, with
        g = len(levels) + 1 (or 1 without a group) and m = len(grid).
    """
    points = _check_grid(grid)
    columns = [] if group is None else [group]
    times, events, extra = survival_rows(
        df, time, event, columns, filters=filters, time_step=time_step
    )
    if group is None:
        index = np.zeros(len(times), dtype=np.int64)
        n_groups = 1
    else:
        index = _level_index(_label_values(extra[group]), levels)
        n_groups = len(levels) + 1
    event_counts = np.zeros((n_groups, points.size), dtype=np.int64)
    at_risk = np.zeros((n_groups, points.size), dtype=np.int64)
    rows = np.zeros(n_groups, dtype=np.int64)
    for g in range(n_groups):
        mine = index == g
        rows[g] = int(mine.sum())
        at_risk[g] = _at_risk(times[mine], points)
        positions = _event_positions(times[mine], events[mine], points)
        event_counts[g] = np.bincount(positions, minlength=points.size)
    return summary(events=event_counts, at_risk=at_risk, rows=rows)


def km_result(
    merged: Mapping[str, np.ndarray],
    grid: ArrayLike,
    *,
    levels: Sequence[str] = (),
    alpha: float = 0.05,
    coarsening: str = "none: exact event times",
) -> dict[str, Any]:
    """Kaplan-Meier curves with exponential Greenwood (log-log) intervals, per group.

    Each curve lists time 0 and the grid times at which its group has events, as lifelines'
    ``survival_function_`` and ``confidence_interval_`` do at those times (between them the curve
    and its band are constant). Groups without rows are left out.
    """
    points = _check_grid(grid)
    names = [str(level) for level in levels] + [OTHER_LEVEL] if levels else ["all"]
    events = np.asarray(merged["events"], dtype=np.float64)
    at_risk = np.asarray(merged["at_risk"], dtype=np.float64)
    z = stats.norm.ppf(1 - alpha / 2)
    curves: dict[str, Any] = {}
    for g, name in enumerate(names):
        if merged["rows"][g] == 0:
            continue
        d, n = events[g], at_risk[g]
        with np.errstate(divide="ignore", invalid="ignore"):
            # lifelines: S = exp(cumsum(log(n - d) - log(n))), -inf (S = 0) once n = d
            survival = np.exp(np.cumsum(np.where(d > 0, np.log(n - d) - np.log(n), 0.0)))
            terms = np.where((d > 0) & (n > d), d / (n * (n - d)), 0.0)
            greenwood = np.cumsum(terms)
            v = np.log(survival)
            lower = np.exp(-np.exp(np.log(-v) - z * np.sqrt(greenwood) / v))
            upper = np.exp(-np.exp(np.log(-v) + z * np.sqrt(greenwood) / v))
        lower = np.where(np.isnan(lower), 1.0, lower)
        upper = np.where(np.isnan(upper), 1.0, upper)
        shown = d > 0
        curves[name] = {
            "time": [0.0, *points[shown].tolist()],
            "survival": [1.0, *survival[shown].tolist()],
            "ci_lower": [1.0, *lower[shown].tolist()],
            "ci_upper": [1.0, *upper[shown].tolist()],
            "at_risk": [int(merged["rows"][g]), *n[shown].astype(int).tolist()],
            "events": [0, *d[shown].astype(int).tolist()],
        }
    return {
        "curves": curves,
        "alpha": alpha,
        "interval": "exponential Greenwood (log-log)",
        "coarsening": coarsening,
        "sites": int(merged["sites"]),
    }


def describe_coarsening(steps: Sequence[float | None]) -> str:
    """How the sites' times were coarsened, for the result (one entry per site)."""
    distinct = sorted({step for step in steps if step is not None})
    if not distinct:
        return "none: exact event times"
    if len(distinct) == 1 and None not in steps:
        return f"times floored to multiples of {distinct[0]:g} at every site"
    shown = ", ".join(f"{step:g}" for step in distinct)
    return f"times floored at some sites (steps {shown}); exact at the others"


def logrank_result(merged: Mapping[str, np.ndarray], *, levels: Sequence[str]) -> dict[str, Any]:
    """The log-rank test across the groups present (chi-square, groups - 1 degrees of freedom)."""
    names = [str(level) for level in levels] + [OTHER_LEVEL]
    present = np.flatnonzero(np.asarray(merged["rows"]) > 0)
    if present.size < 2:
        raise ValueError("the log-rank test needs at least two groups with rows")
    d_g = np.asarray(merged["events"], dtype=np.float64)[present]
    n_g = np.asarray(merged["at_risk"], dtype=np.float64)[present]
    d = d_g.sum(axis=0)
    n = n_g.sum(axis=0)
    used = (d > 0) & (n > 0)
    d, n, d_g, n_g = d[used], n[used], d_g[:, used], n_g[:, used]
    expected = (n_g * (d / n)).sum(axis=1)
    observed = d_g.sum(axis=1)
    # Hypergeometric covariance: d (n - d) / (n - 1) * (n_g / n) (delta_gh - n_h / n).
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(n > 1, d * (n - d) / (n - 1), 0.0)
    share = n_g / n
    covariance = np.einsum("t,gt,ht->gh", scale, share, np.ones_like(share)) * np.eye(
        len(present)
    ) - np.einsum("t,gt,ht->gh", scale, share, share)
    z_scores = (observed - expected)[:-1]
    statistic = float(z_scores @ np.linalg.pinv(covariance[:-1, :-1]) @ z_scores)
    dof = len(present) - 1
    return {
        "statistic": statistic,
        "p_value": float(stats.chi2.sf(statistic, dof)),
        "degrees_of_freedom": dof,
        "observed": {names[g]: float(o) for g, o in zip(present, observed, strict=True)},
        "expected": {names[g]: float(e) for g, e in zip(present, expected, strict=True)},
        "sites": int(merged["sites"]),
    }


def _cox_rows(
    df: pd.DataFrame,
    time: str,
    event: str,
    covariates: Sequence[str],
    center: ArrayLike | None,
    filters: Sequence[Filter],
    time_step: float | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    times, events, extra = survival_rows(
        df, time, event, covariates, filters=filters, time_step=time_step
    )
    x = extra.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    x = x.reshape(len(times), len(covariates))
    if center is not None:
        x = x - np.asarray(center, dtype=np.float64)
    return times, events, x


def _risk_sums(
    times: np.ndarray, events: np.ndarray, x: np.ndarray, beta: np.ndarray, grid: np.ndarray
) -> dict[str, np.ndarray]:
    p = x.shape[1]
    m = grid.size
    w = np.exp(x @ beta)
    order = np.argsort(times, kind="stable")
    t_sorted, w_sorted, x_sorted = times[order], w[order], x[order]
    wx = w_sorted[:, None] * x_sorted
    wxx = wx[:, :, None] * x_sorted[:, None, :]

    def tail_sums(values: np.ndarray) -> np.ndarray:
        # sum over rows i >= k for every k, with a zero row appended for k = n
        reversed_sums = np.cumsum(values[::-1], axis=0)[::-1]
        return np.concatenate([reversed_sums, np.zeros((1, *values.shape[1:]))], axis=0)

    start = np.searchsorted(t_sorted, grid, side="left")
    s0 = tail_sums(w_sorted)[start]
    s1 = tail_sums(wx)[start]
    s2 = tail_sums(wxx)[start]
    positions = _event_positions(times, events, grid)
    we = w[events]
    xe = x[events]
    d0 = np.zeros(m)
    d1 = np.zeros((m, p))
    d2 = np.zeros((m, p, p))
    np.add.at(d0, positions, we)
    np.add.at(d1, positions, we[:, None] * xe)
    np.add.at(d2, positions, we[:, None, None] * xe[:, :, None] * xe[:, None, :])
    return {
        "s0": s0,
        "s1": s1,
        "s2": s2,
        "d0": d0,
        "d1": d1,
        "d2": d2,
        "deaths": np.bincount(positions, minlength=m).astype(np.int64),
        "xsum": xe.sum(axis=0),
    }


def site_cox_sums(
    df: pd.DataFrame,
    time: str,
    event: str,
    covariates: Sequence[str],
    beta: ArrayLike,
    grid: ArrayLike,
    *,
    center: ArrayLike | None = None,
    filters: Sequence[Filter] = (),
    time_step: float | None = None,
) -> Summary:
    """Site part of one Newton step of the unstratified Cox model: risk-set sums on the grid.

    Args:
        df: the site's validated rows (complete cases of time, event and covariates are used).
        time, event: duration and 0/1 event columns.
        covariates: numeric covariate columns.
        beta: the current coefficients (from the server).
        grid: the merged event times.
        center: subtracted from the covariates before exp(x'beta) (the pooled means, say):
            the partial likelihood does not change, exp() stays in range.
        filters: the cohort.
        time_step: the site's coarsening step.

    Returns:
        ``{"s0", "s1", "s2"}`` (risk-set sums of w, w x, w x x'), ``{"d0", "d1", "d2"}`` (the
        same over the events at each grid time, Efron's correction needs them), ``"deaths"``
        (events per grid time), ``"xsum"`` (sum of x over events), ``"rows"``, ``"sites"``.
    """
    points = _check_grid(grid)
    times, events, x = _cox_rows(df, time, event, covariates, center, filters, time_step)
    b = np.asarray(beta, dtype=np.float64)
    sums = _risk_sums(times, events, x, b, points)
    return summary(**sums, rows=len(times))


def cox_from_sums(
    sums: Mapping[str, np.ndarray], beta: ArrayLike, *, ties: str = "efron"
) -> tuple[float, np.ndarray, np.ndarray]:
    """Partial log-likelihood, gradient and Hessian from (merged) risk-set sums."""
    if ties not in TIES:
        raise ValueError(f"ties {ties!r} unknown; use one of {', '.join(TIES)}")
    b = np.asarray(beta, dtype=np.float64)
    xsum = np.asarray(sums["xsum"], dtype=np.float64)
    loglik = float(xsum @ b)
    gradient = xsum.copy()
    hessian = np.zeros((b.size, b.size))
    deaths = np.asarray(sums["deaths"])
    for j in np.flatnonzero(deaths > 0):
        count = int(deaths[j])
        if ties == "efron":
            fractions = np.arange(count) / count
        else:
            fractions = np.zeros(count)
        phi = sums["s0"][j] - fractions * sums["d0"][j]
        a1 = sums["s1"][j][None, :] - fractions[:, None] * sums["d1"][j][None, :]
        a2 = sums["s2"][j][None] - fractions[:, None, None] * sums["d2"][j][None]
        loglik -= float(np.sum(np.log(phi)))
        gradient -= np.sum(a1 / phi[:, None], axis=0)
        hessian -= np.sum(a2 / phi[:, None, None], axis=0) - np.einsum(
            "l,li,lj->ij", 1.0 / phi**2, a1, a1
        )
    return loglik, gradient, hessian


def site_cox_stratified(
    df: pd.DataFrame,
    time: str,
    event: str,
    covariates: Sequence[str],
    beta: ArrayLike,
    *,
    ties: str = "efron",
    center: ArrayLike | None = None,
    filters: Sequence[Filter] = (),
) -> Summary:
    """Site part of one Newton step of the Cox model stratified by site.

    The site is its own stratum, so it evaluates its partial likelihood on its own exact
    times (they never leave it) and sends three sums.

    Returns:
        ``{"loglik": (), "gradient": (p,), "hessian": (p, p), "rows", "events", "sites"}``.
    """
    times, events, x = _cox_rows(df, time, event, covariates, center, filters, None)
    b = np.asarray(beta, dtype=np.float64)
    p = len(covariates)
    if not events.any():
        return summary(
            loglik=0.0, gradient=np.zeros(p), hessian=np.zeros((p, p)), rows=len(times), events=0
        )
    grid = np.unique(times[events])
    loglik, gradient, hessian = cox_from_sums(_risk_sums(times, events, x, b, grid), b, ties=ties)
    return summary(
        loglik=loglik,
        gradient=gradient,
        hessian=hessian,
        rows=len(times),
        events=int(events.sum()),
    )


def cox_result(
    fit: NewtonRaphson,
    covariates: Sequence[str],
    *,
    stratified: bool,
    ties: str,
    rows: int,
    events: int,
    sites: int,
    coarsening: str = "none: exact event times",
    alpha: float = 0.05,
) -> dict[str, Any]:
    """The Cox coefficient table (hazard ratios too) from a converged ``NewtonRaphson``."""
    covariance = np.linalg.inv(-fit.hessian)
    table = coefficient_table(covariates, fit.beta, covariance, alpha=alpha)
    table["hazard_ratio"] = {name: math.exp(value) for name, value in table["coef"].items()}
    table.update(
        {
            "model": "cox",
            "stratified_by_site": stratified,
            "ties": ties,
            "partial_loglik": fit.loglik,
            "iterations": fit.iterations,
            "rows": rows,
            "events": events,
            "sites": sites,
            "coarsening": "none: each site uses its own exact times" if stratified else coarsening,
        }
    )
    return table


def cox_fit(
    sites: Sequence[pd.DataFrame],
    time: str,
    event: str,
    covariates: Sequence[str],
    *,
    stratified: bool,
    ties: str = "efron",
    center: ArrayLike | None = None,
    filters: Sequence[Filter] = (),
    time_steps: Sequence[float | None] | None = None,
    tol: float = 1e-10,
) -> dict[str, Any]:
    """Run the whole federated Cox fit in one process (the wiring's reference and the tests').

    Each site's part is called exactly as an agent would call it; only ``merge_sums`` and the
    server's steps see more than one site.
    """
    steps = list(time_steps) if time_steps is not None else [None] * len(sites)
    fit = NewtonRaphson(len(covariates), tol=tol, hint=MONOTONE_HINT)
    if stratified:
        while not fit.done:
            merged = merge_sums(
                [
                    site_cox_stratified(
                        df,
                        time,
                        event,
                        covariates,
                        fit.beta,
                        ties=ties,
                        center=center,
                        filters=filters,
                    )
                    for df in sites
                ]
            )
            fit.observe(float(merged["loglik"]), merged["gradient"], merged["hessian"])
        rows, n_events = int(merged["rows"]), int(merged["events"])
    else:
        grid = merge_event_times(
            [
                site_event_times(df, time, event, columns=covariates, filters=filters, time_step=s)
                for df, s in zip(sites, steps, strict=True)
            ]
        )
        while not fit.done:
            merged = merge_sums(
                [
                    site_cox_sums(
                        df,
                        time,
                        event,
                        covariates,
                        fit.beta,
                        grid,
                        center=center,
                        filters=filters,
                        time_step=s,
                    )
                    for df, s in zip(sites, steps, strict=True)
                ]
            )
            fit.observe(*cox_from_sums(merged, fit.beta, ties=ties))
        rows, n_events = int(merged["rows"]), int(merged["deaths"].sum())
    return cox_result(
        fit,
        covariates,
        stratified=stratified,
        ties=ties,
        rows=rows,
        events=n_events,
        sites=int(merged["sites"]),
        coarsening=describe_coarsening(steps),
    )
