"""Linear regression from the sites' X'X and X'y, logistic regression by federated IRLS.

* Linear: each site sends n, X'X, X'y and y'y over its complete cases; the server solves the
  normal equations. The residual sum of squares from those sums (y'y - 2 b'X'y + b'X'X b) loses
  digits when the fit is close; a second round (``site_linear_rss``: each site's sum of squared
  residuals at the estimate) gives it to full precision, so standard errors, t statistics,
  p-values and confidence intervals equal statsmodels' OLS on the pooled rows.
* Logistic: each round every site sends its log-likelihood, X'(y - p) and -X'WX at the current
  coefficients; ``NewtonRaphson`` steps (Newton on the canonical link is IRLS). Standard errors
  from the inverse information, Wald z statistics, as statsmodels' ``Logit``.

Design matrices: the named numeric columns, plus a leading intercept column ``"const"`` unless
``intercept=False``. Binary covariates and a binary outcome are held to the minimum cell count
by the callers (``check_binary_cells``): their entries of X'X are counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from fedcore.analytics._newton import NewtonRaphson, coefficient_table
from fedcore.analytics._sums import Summary, merge_sums, summary
from fedcore.analytics.cohort import Filter, apply_filters
from fedcore.analytics.disclosure import DisclosurePolicy, check_site_count

__all__ = [
    "INTERCEPT",
    "SEPARATION_HINT",
    "check_binary_cells",
    "design",
    "linear_fit",
    "linear_result",
    "logistic_fit",
    "logistic_result",
    "site_linear_rss",
    "site_linear_sums",
    "site_logistic_step",
]

INTERCEPT = "const"
SEPARATION_HINT = (
    "in a logistic model this usually means a covariate separates the outcome perfectly, which "
    "makes the estimate infinite: drop or coarsen that covariate"
)


def design(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    *,
    intercept: bool = True,
    filters: Sequence[Filter] = (),
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The complete-case design matrix, outcome vector and coefficient names."""
    selected = df.loc[apply_filters(df, filters), [*covariates, outcome]]
    values = selected.apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    values = values.reshape(len(selected), len(covariates) + 1)
    values = values[np.all(np.isfinite(values), axis=1)]
    x = values[:, :-1]
    names = list(covariates)
    if intercept:
        x = np.concatenate([np.ones((len(x), 1)), x], axis=1)
        names = [INTERCEPT, *names]
    return x, values[:, -1], names


def check_binary_cells(policy: DisclosurePolicy, x: np.ndarray, names: Sequence[str]) -> None:
    """Refuse when a 0/1 column has from 1 to min_cell_count - 1 ones or zeros at this site.

    X'X holds the count of ones of every binary covariate (and X'y the ones of a binary
    outcome), so such a column is a count table in disguise.
    """
    for j, name in enumerate(names):
        column = x[:, j]
        if name == INTERCEPT or not np.all(np.isin(column, (0.0, 1.0))):
            continue
        ones = int(column.sum())
        check_site_count(policy, ones, f"the rows with {name} = 1")
        check_site_count(policy, len(column) - ones, f"the rows with {name} = 0")


def site_linear_sums(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    *,
    intercept: bool = True,
    filters: Sequence[Filter] = (),
) -> Summary:
    """Site part of linear regression: ``{"n", "xtx", "xty", "yty", "sites"}``."""
    x, y, _ = design(df, outcome, covariates, intercept=intercept, filters=filters)
    return summary(n=len(y), xtx=x.T @ x, xty=x.T @ y, yty=float(y @ y))


def site_linear_rss(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    beta: ArrayLike,
    *,
    intercept: bool = True,
    filters: Sequence[Filter] = (),
) -> Summary:
    """Second round of linear regression: the site's sum of squared residuals at ``beta``."""
    x, y, _ = design(df, outcome, covariates, intercept=intercept, filters=filters)
    residuals = y - x @ np.asarray(beta, dtype=np.float64)
    return summary(rss=float(residuals @ residuals), n=len(y))


def linear_fit(merged: Mapping[str, np.ndarray]) -> np.ndarray:
    """The least-squares coefficients from merged X'X and X'y."""
    xtx = np.asarray(merged["xtx"], dtype=np.float64)
    if np.linalg.matrix_rank(xtx) < xtx.shape[0]:
        raise ValueError(
            "X'X is singular: a covariate is constant or a combination of others in the pooled "
            "rows; drop it"
        )
    return np.linalg.solve(xtx, np.asarray(merged["xty"], dtype=np.float64))


def linear_result(
    merged: Mapping[str, np.ndarray],
    names: Sequence[str],
    beta: ArrayLike,
    *,
    rss: float | None = None,
    alpha: float = 0.05,
) -> dict[str, Any]:
    """OLS table: coefficients, SEs, t statistics, p-values, intervals, R^2 (as statsmodels)."""
    b = np.asarray(beta, dtype=np.float64)
    xtx = np.asarray(merged["xtx"], dtype=np.float64)
    xty = np.asarray(merged["xty"], dtype=np.float64)
    n = int(merged["n"])
    p = b.size
    if n <= p:
        raise ValueError(f"linear regression needs more rows ({n}) than coefficients ({p})")
    if rss is None:
        rss = float(merged["yty"]) - 2 * float(b @ xty) + float(b @ xtx @ b)
    df_resid = n - p
    sigma2 = rss / df_resid
    table = coefficient_table(names, b, sigma2 * np.linalg.inv(xtx), alpha=alpha, df_resid=df_resid)
    out: dict[str, Any] = {**table, "model": "linear", "rows": n, "rss": rss, "df_resid": df_resid}
    if INTERCEPT in names:
        # y's mean is X'y's intercept entry over n
        mean = xty[list(names).index(INTERCEPT)] / n
        tss = float(merged["yty"]) - n * mean * mean
        out["r_squared"] = 1 - rss / tss
    out["sites"] = int(merged["sites"])
    return out


def site_logistic_step(
    df: pd.DataFrame,
    outcome: str,
    covariates: Sequence[str],
    beta: ArrayLike,
    *,
    intercept: bool = True,
    filters: Sequence[Filter] = (),
) -> Summary:
    """Site part of one IRLS step: ``{"loglik", "gradient", "hessian", "n", "sites"}``.

    Raises:
        ValueError: an outcome value other than 0/1.
    """
    x, y, _ = design(df, outcome, covariates, intercept=intercept, filters=filters)
    if not np.all(np.isin(y, (0.0, 1.0))):
        bad = y[~np.isin(y, (0.0, 1.0))][0]
        raise ValueError(
            f"outcome {outcome!r} must hold 0/1 for logistic regression; found {bad!r}"
        )
    eta = x @ np.asarray(beta, dtype=np.float64)
    prob = 1.0 / (1.0 + np.exp(-eta))
    # log(1 + e^eta) computed stably for large |eta|
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    weights = prob * (1.0 - prob)
    return summary(
        loglik=loglik,
        gradient=x.T @ (y - prob),
        hessian=-(x.T * weights) @ x,
        n=len(y),
        events=int(y.sum()),
    )


def logistic_result(
    fit: NewtonRaphson, names: Sequence[str], *, rows: int, sites: int, alpha: float = 0.05
) -> dict[str, Any]:
    """Logistic table: coefficients, SEs, Wald z, p-values, intervals, odds ratios."""
    covariance = np.linalg.inv(-fit.hessian)
    table = coefficient_table(names, fit.beta, covariance, alpha=alpha)
    table["odds_ratio"] = {name: float(np.exp(value)) for name, value in table["coef"].items()}
    table.update(
        {
            "model": "logistic",
            "loglik": fit.loglik,
            "iterations": fit.iterations,
            "rows": rows,
            "sites": sites,
        }
    )
    return table


def logistic_fit(
    sites: Sequence[pd.DataFrame],
    outcome: str,
    covariates: Sequence[str],
    *,
    intercept: bool = True,
    filters: Sequence[Filter] = (),
    tol: float = 1e-10,
) -> dict[str, Any]:
    """Run the whole federated logistic fit in one process (the wiring's reference, the tests')."""
    names = [INTERCEPT, *covariates] if intercept else list(covariates)
    fit = NewtonRaphson(len(names), tol=tol, hint=SEPARATION_HINT)
    while not fit.done:
        merged = merge_sums(
            [
                site_logistic_step(
                    df, outcome, covariates, fit.beta, intercept=intercept, filters=filters
                )
                for df in sites
            ]
        )
        fit.observe(float(merged["loglik"]), merged["gradient"], merged["hessian"])
    return logistic_result(fit, names, rows=int(merged["n"]), sites=int(merged["sites"]))
