"""Federated Newton-Raphson: the server's side of Cox and logistic regression, and their tables.

The server holds the coefficients; each round every site evaluates its log-likelihood, gradient
and Hessian at them (sums over its rows, or over risk sets the server combines), the server adds
them up and takes a Newton step. A step that lowers the log-likelihood is halved, as lifelines and
statsmodels do. Because the merged gradient and Hessian are those of the pooled rows, the
iterates, and so the estimates and their standard errors, are those of a fit on the pooled rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["ConvergenceError", "NewtonRaphson", "coefficient_table"]


class ConvergenceError(ValueError):
    """The federated fit did not converge; the message says the likely cause."""


@dataclass
class _Point:
    beta: np.ndarray
    loglik: float
    gradient: np.ndarray
    hessian: np.ndarray


class NewtonRaphson:
    """Newton-Raphson with step halving, driven one evaluation at a time.

    Usage: ``while not nr.done: nr.observe(*evaluate(nr.beta))``; then ``nr.beta`` is the
    estimate and ``nr.hessian`` the Hessian of the log-likelihood there.
    """

    def __init__(
        self,
        n_params: int,
        *,
        start: ArrayLike | None = None,
        tol: float = 1e-10,
        max_iter: int = 100,
        max_halvings: int = 40,
        hint: str = "",
        loglik_slack: float = 0.0,
        gradient_slack: float = 0.0,
    ) -> None:
        """Start at ``start`` (zeros by default).

        Args:
            n_params: number of coefficients.
            start: first point to evaluate.
            tol: converged when every component of the Newton step is below this.
            max_iter: Newton steps before giving up.
            max_halvings: successive halvings of one step before giving up.
            hint: appended to every failure message (the model's likely cause).
            loglik_slack: how far the merged log-likelihood may be off (sums in fixed point
                under secure aggregation): a fall within it is rounding, not a worse point,
                and halves no step.
            gradient_slack: how far each merged gradient component may be off (likewise):
                the fit has also converged when the step is within twice what that error
                can move it (``|H^-1|`` row sums times it), since a smaller one is rounding.
        """
        self.beta = np.zeros(n_params) if start is None else np.asarray(start, dtype=np.float64)
        if self.beta.shape != (n_params,):
            raise ValueError(f"start must have {n_params} values, got shape {self.beta.shape}")
        self.tol = tol
        self.max_iter = max_iter
        self.max_halvings = max_halvings
        self.hint = f"; {hint}" if hint else ""
        self.loglik_slack = float(loglik_slack)
        self.gradient_slack = float(gradient_slack)
        self.iterations = 0
        self.evaluations = 0
        self.done = False
        self._accepted: _Point | None = None
        self._step = np.zeros(n_params)
        self._halvings = 0

    @property
    def hessian(self) -> np.ndarray:
        """The Hessian of the log-likelihood at the last accepted point."""
        if self._accepted is None:
            raise ValueError("nothing evaluated yet")
        return self._accepted.hessian

    @property
    def loglik(self) -> float:
        """The log-likelihood at the last accepted point."""
        if self._accepted is None:
            raise ValueError("nothing evaluated yet")
        return self._accepted.loglik

    def observe(self, loglik: float, gradient: ArrayLike, hessian: ArrayLike) -> None:
        """Take the merged log-likelihood, gradient and Hessian at ``self.beta``."""
        if self.done:
            raise ValueError("the fit has converged; start a new one")
        g = np.asarray(gradient, dtype=np.float64)
        h = np.asarray(hessian, dtype=np.float64)
        self.evaluations += 1
        if not (math.isfinite(loglik) and np.all(np.isfinite(g)) and np.all(np.isfinite(h))):
            raise ConvergenceError(
                "the log-likelihood or its derivatives are not finite at the current "
                "coefficients; rescale large covariates or give a centre for them" + self.hint
            )
        accepted = self._accepted
        slack = 1e-12 * (1 + abs(accepted.loglik)) + self.loglik_slack if accepted else 0.0
        if accepted is not None and loglik < accepted.loglik - slack:
            self._halvings += 1
            if self._halvings > self.max_halvings:
                raise ConvergenceError(
                    "step halving did not raise the log-likelihood; the model may be "
                    "non-identifiable (collinear covariates)" + self.hint
                )
            self._step = self._step / 2
            self.beta = accepted.beta + self._step
            return
        self._accepted = _Point(self.beta.copy(), float(loglik), g, h)
        self._halvings = 0
        try:
            step = np.linalg.solve(-h, g)
        except np.linalg.LinAlgError as error:
            raise ConvergenceError(
                f"the information matrix is singular at coefficients "
                f"{np.round(self.beta, 3).tolist()}: covariates may be collinear or constant in "
                "the pooled rows (drop one of them)" + self.hint
            ) from error
        tol = self.tol
        if self.gradient_slack:
            rounding = np.abs(np.linalg.inv(h)).sum(axis=1) * self.gradient_slack
            tol = max(tol, 2.0 * float(np.max(rounding, initial=0.0)))
        if np.max(np.abs(step), initial=0.0) < tol:
            self.done = True
            return
        self.iterations += 1
        if self.iterations > self.max_iter:
            raise ConvergenceError(
                f"no convergence in {self.max_iter} Newton steps (coefficients "
                f"{np.round(self.beta, 3).tolist()})" + self.hint
            )
        self._step = step
        self.beta = self.beta + step


def coefficient_table(
    names: Sequence[str],
    coef: ArrayLike,
    covariance: ArrayLike,
    *,
    alpha: float = 0.05,
    df_resid: float | None = None,
) -> dict[str, Any]:
    """Coefficients with standard errors, Wald statistics, p-values and confidence intervals.

    Args:
        names: one per coefficient.
        coef: the estimates.
        covariance: their covariance matrix.
        alpha: 1 - confidence level.
        df_resid: residual degrees of freedom for t statistics (linear regression); None for
            z statistics (likelihood fits).

    Returns:
        ``{"coef", "se", "statistic", "p_value", "ci_lower", "ci_upper"}``, each name -> value,
        plus ``"distribution"`` ("t" or "normal").
    """
    # scipy.stats takes about a second to import: here, so that reading a plan or starting the
    # agent's command line (fedcore.analytics is on both paths) does not pay it.
    from scipy import stats

    beta = np.asarray(coef, dtype=np.float64)
    se = np.sqrt(np.diag(np.asarray(covariance, dtype=np.float64)))
    statistic = beta / se
    if df_resid is None:
        p_value = 2 * stats.norm.sf(np.abs(statistic))
        quantile = stats.norm.ppf(1 - alpha / 2)
    else:
        p_value = 2 * stats.t.sf(np.abs(statistic), df_resid)
        quantile = stats.t.ppf(1 - alpha / 2, df_resid)
    names = list(names)

    def named(values: np.ndarray) -> dict[str, float]:
        return {name: float(value) for name, value in zip(names, values, strict=True)}

    return {
        "coef": named(beta),
        "se": named(se),
        "statistic": named(statistic),
        "p_value": named(p_value),
        "ci_lower": named(beta - quantile * se),
        "ci_upper": named(beta + quantile * se),
        "distribution": "normal" if df_resid is None else "t",
        "alpha": alpha,
    }
