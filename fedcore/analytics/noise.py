"""Noise on a site's count tables: an analysis plan's ``privacy`` section (docs/analytics.md).

A site adds its own noise to every cell of its count table (a count, a cross-tabulation, a
histogram), or to its moment sums of values clipped to the schema's bounds (``add_moments``), before the table leaves it, so its release is differentially private whoever sees it
(the server; the other sites through the result). Sensitivity: every row of the site falls in at
most one cell (rows outside the filters in none; ``__other__``, a histogram's underflow and
overflow are cells), so adding or removing one row changes one cell by 1: L1 = L2 sensitivity 1
(add/remove adjacency, as the privacy ledger's accountant assumes).

* ``"laplace"``: discrete Laplace noise, P(z) proportional to exp(-epsilon |z|), on every cell;
  pure epsilon-DP, charged to the ledger as a pure entry.
* ``"gaussian"``: discrete Gaussian noise with sigma^2 = 1 / (2 rho), rho the largest whose
  (epsilon, delta) conversion is the plan's; rho-zCDP, which is the Renyi DP of a Gaussian
  mechanism of noise multiplier sigma (sensitivity 1, no sampling): the ledger composes it as
  one such step with the silo's other Gaussian mechanisms.

The samplers are ``fedcore.fairness``'s exact ones (rational arithmetic, uniform integers from
the operating system's randomness: no floating-point leakage). Each site's noise is
independent: the merged table carries the sum of k sites' noise (variance k times one site's),
which the result states.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from fedcore.fairness import _SIGMA_SAFETY, _discrete_gaussian, _discrete_laplace, _gaussian_rho

NOISE_MECHANISMS: tuple[str, ...] = ("laplace", "gaussian")
# The analyses whose site answer is one release of bounded sensitivity: a count table
# (sensitivity 1) or clipped moment sums (``moment_sensitivity``); the others refuse a
# privacy section at proposal (docs/analytics.md says why).
NOISE_ANALYSES: tuple[str, ...] = ("count", "crosstab", "histogram", "moments")


@dataclass(frozen=True)
class AnalysisNoise:
    """An analysis plan's ``privacy`` section: the noise every site adds to its table."""

    mechanism: str
    epsilon: float
    delta: float | None = None  # gaussian only
    # moments: each column's clipping bounds (the schema's min and max), in column order
    bounds: tuple[tuple[float, float], ...] = ()

    @property
    def sigma(self) -> float | None:
        """The discrete Gaussian's sigma (None for Laplace)."""
        if self.mechanism != "gaussian":
            return None
        return math.sqrt(float(self._sigma2()))

    def _sigma2(self) -> Fraction:
        assert self.delta is not None
        return Fraction(_SIGMA_SAFETY / (2.0 * _gaussian_rho(self.epsilon, self.delta)))

    def cell_std(self) -> float:
        """The standard deviation of one site's noise on one cell."""
        if self.mechanism == "gaussian":
            return float(self.sigma or 0.0)  # the discrete Gaussian's is at most sigma
        q = math.exp(-self.epsilon)
        return math.sqrt(2.0 * q) / (1.0 - q)

    def describe(self) -> dict[str, Any]:
        """What an answer and a result carry about the noise (the plan's parameters)."""
        out: dict[str, Any] = {
            "mechanism": self.mechanism,
            "epsilon": self.epsilon,
            "delta": self.delta,
            "scale": 1.0 / self.epsilon if self.mechanism == "laplace" else None,
            "sigma": self.sigma,
        }
        if self.bounds:
            out["clip"] = [list(pair) for pair in self.bounds]
            out["sensitivity"] = list(self.moment_sensitivity())
        return out

    def _moment_deltas(self) -> np.ndarray:
        """Each moment sum's sensitivity, in the order [n, sum_j, the upper triangle of cross]
        when every value is clipped to its bounds and centred at their midpoint: one row added
        or removed moves n by 1, sum_j by at most h_j = (max_j - min_j) / 2 and cross_jk by at
        most h_j h_k."""
        h = np.array([(high - low) / 2.0 for low, high in self.bounds])
        upper = np.outer(h, h)[np.triu_indices(len(h))]
        return np.concatenate([[1.0], h, upper])

    def moment_sensitivity(self) -> tuple[float, float]:
        """(L1, L2) sensitivity of a site's moment sums as one vector (what the release
        states)."""
        deltas = self._moment_deltas()
        return float(deltas.sum()), float(np.sqrt((deltas**2).sum()))

    def _moment_scales(self) -> np.ndarray:
        """Each moment sum's noise: the budget split equally over its k sums, each sum's noise
        in proportion to its own sensitivity, so that every sum has about the same relative
        error (one scale L1 / epsilon for all would drown n, whose sensitivity is 1, in the
        cross products' noise). Laplace: scale k Delta_i / epsilon, the k releases composing to
        epsilon; Gaussian: sigma sqrt(k) Delta_i times the unit sigma, the same zCDP rho as one
        release of sensitivity 1 (sum over i of Delta_i^2 / (2 sigma_i^2))."""
        deltas = self._moment_deltas()
        k = deltas.size
        if self.mechanism == "laplace":
            return deltas * k / self.epsilon
        return deltas * math.sqrt(k) * float(self.sigma or 0.0)

    def add_moments(
        self, sums: Mapping[str, np.ndarray], source: random.Random | None = None
    ) -> dict[str, np.ndarray]:
        """Continuous noise on moment sums (``site_moments`` of clipped values centred at the
        bounds' midpoints), each sum's as :meth:`_moment_scales` says: on n, every sum and the
        upper triangle of the cross products (mirrored, so the matrix stays symmetric and each
        entry is noised once)."""
        rng = source if source is not None else random.SystemRandom()
        scales = iter(self._moment_scales())
        if self.mechanism == "laplace":

            def draw() -> float:
                return next(scales) * (rng.expovariate(1.0) - rng.expovariate(1.0))

        else:

            def draw() -> float:
                return rng.gauss(0.0, next(scales))

        n = float(np.asarray(sums["n"])) + draw()
        total = np.asarray(sums["sum"], dtype=np.float64) + [draw() for _ in self.bounds]
        cross = np.array(sums["cross"], dtype=np.float64)
        p = len(self.bounds)
        for j in range(p):
            for k in range(j, p):  # the order of np.triu_indices, as in _moment_deltas
                cross[j, k] += draw()
                cross[k, j] = cross[j, k]
        return {**sums, "n": np.float64(n), "sum": total, "cross": cross}

    def moment_stds(self) -> dict[str, Any]:
        """The standard deviation of one site's noise on n, on each sum and on each cross
        product."""
        scales = self._moment_scales()
        std = scales * math.sqrt(2.0) if self.mechanism == "laplace" else scales
        p = len(self.bounds)
        cross = np.zeros((p, p))
        cross[np.triu_indices(p)] = std[1 + p :]
        cross = np.triu(cross) + np.triu(cross, 1).T
        return {"n": float(std[0]), "sum": std[1 : 1 + p].tolist(), "cross": cross.tolist()}

    def add(self, counts: np.ndarray, source: random.Random | None = None) -> np.ndarray:
        """``counts`` plus independent noise on every cell (integers, possibly negative: the
        server clamps the merged table at 0, a post-processing).

        ``source``: default ``random.SystemRandom()`` (os.urandom); tests inject a seeded
        ``random.Random``, never production code.
        """
        rng = source if source is not None else random.SystemRandom()
        table = np.asarray(counts, dtype=np.int64)
        if self.mechanism == "laplace":
            scale = 1 / Fraction(self.epsilon)
            noise = [_discrete_laplace(scale, rng) for _ in range(table.size)]
        else:
            sigma2 = self._sigma2()
            noise = [_discrete_gaussian(sigma2, rng) for _ in range(table.size)]
        return table + np.asarray(noise, dtype=np.int64).reshape(table.shape)


def parse_noise(raw: Any, kind: str | None, errors: dict[str, str]) -> AnalysisNoise | None:
    """Parse an analysis plan's ``privacy`` section (None: exact, no noise), recording each
    problem under ``privacy.*`` in ``errors``."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        errors["privacy"] = (
            "must be an object {mechanism: 'laplace' | 'gaussian', epsilon, delta (gaussian)}: "
            "the noise every site adds to its table, charged to its privacy ledger"
        )
        return None
    before = len(errors)
    allowed = {"mechanism", "epsilon", "delta"}
    for key in sorted(str(k) for k in raw if k not in allowed):
        errors[f"privacy.{key}"] = (
            f"unknown key {key!r} in an analysis plan's privacy section; allowed: "
            f"{', '.join(sorted(allowed))}"
        )
    mechanism = raw.get("mechanism", "laplace")
    if mechanism not in NOISE_MECHANISMS:
        errors["privacy.mechanism"] = (
            f"{mechanism!r} is not a noise mechanism; use one of {', '.join(NOISE_MECHANISMS)}"
        )
    epsilon = raw.get("epsilon")
    if not _positive(epsilon) or epsilon > 100:
        errors["privacy.epsilon"] = (
            "needs a number in (0, 100]: the epsilon each site's table is released with"
        )
    delta = raw.get("delta")
    if mechanism == "gaussian":
        if not _positive(delta) or not delta < 1:
            errors["privacy.delta"] = "the gaussian mechanism needs a delta in (0, 1), say 1e-6"
    elif delta is not None:
        errors["privacy.delta"] = "applies to the gaussian mechanism only (laplace is pure DP)"
    if kind is not None and kind not in NOISE_ANALYSES:
        errors["privacy"] = (
            f"noise is added to count tables and clipped moments only "
            f"({', '.join(NOISE_ANALYSES)}); a {kind!r} analysis asks several data-dependent "
            "rounds (event times, bisection, Newton steps) or sums without bounds, so it cannot "
            "be noised soundly: remove the privacy section (its result is exact, under the "
            "sites' disclosure control) or ask a count, crosstab, histogram or moments"
        )
    if len(errors) > before:
        return None
    return AnalysisNoise(
        mechanism=str(mechanism),
        epsilon=float(epsilon),
        delta=float(delta) if mechanism == "gaussian" else None,
    )


def _positive(value: Any) -> bool:
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value > 0
    )
