"""The pooled calibration curve of a binary model across sites, from per-site per-bin sums.

Each site bins the predicted probability of the rows it evaluates into :data:`CALIBRATION_BINS`
equal bins over [0, 1] (bin ``b`` holds ``b/B <= p < (b+1)/B``, the last bin also ``p = 1``;
:data:`CALIBRATION_GRID` names it on the wire) and sends per bin the row count, the sum of the
predicted probabilities and the count of positives (:func:`site_calibration`). The server adds
them (:func:`merge_calibration`) and :func:`calibration_curve` gives per bin the mean predicted
probability and the observed positive rate of the union of every site's rows -- exactly what a
calibration curve with these bins computes on the pooled rows (sklearn's
``calibration_curve(y, p, n_bins=10, strategy="uniform")`` for its non-empty bins), since both
are ratios of sums -- and the expected calibration error ``sum_b n_b / n * |mean_b - rate_b|``.

What it reveals beyond the score histogram (``fedcore.evaluation``), which already counts rows
and positives on a finer grid: the mean predicted probability per coarse bin. Pure numpy, no
Django: the server and the agent both import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedcore.evaluation import binary_scores

CALIBRATION_BINS = 10
CALIBRATION_GRID = "uniform[0,1]"
_MAX_COUNT = 1 << 53


class CalibrationReportError(ValueError):
    """A site's calibration sums are refused; the message names the field and the rule."""


@dataclass(frozen=True)
class CalibrationSums:
    """Per bin: rows, the sum of their predicted probabilities, positives."""

    count: tuple[int, ...]
    prob_sum: tuple[float, ...]
    positives: tuple[int, ...]

    @property
    def bins(self) -> int:
        """The number of bins."""
        return len(self.count)

    @property
    def n(self) -> int:
        """The rows counted."""
        return sum(self.count)

    def to_wire(self) -> dict[str, Any]:
        """The JSON form carried by an ``evaluation`` message (field ``calibration``)."""
        return {
            "grid": CALIBRATION_GRID,
            "bins": self.bins,
            "count": list(self.count),
            "prob_sum": [float(v) for v in self.prob_sum],
            "positives": list(self.positives),
        }


def calibration_bins(probs: ArrayLike, bins: int = CALIBRATION_BINS) -> np.ndarray:
    """The bin of each probability: ``min(floor(p * bins), bins - 1)``.

    Raises:
        ValueError: a probability outside [0, 1] or not finite.
    """
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if (~np.isfinite(p) | (p < 0.0) | (p > 1.0)).any():
        raise ValueError("probabilities must lie in [0, 1]")
    return np.minimum(np.floor(p * bins).astype(np.int64), bins - 1)


def site_calibration(
    y_true: ArrayLike, probs: ArrayLike, bins: int = CALIBRATION_BINS
) -> CalibrationSums:
    """One site's per-bin sums of its evaluated rows (labels 0/1, predicted probabilities).

    Raises:
        ValueError: lengths differ, a label is not 0/1, a probability is outside [0, 1].
    """
    y, p = binary_scores(y_true, probs)
    index = calibration_bins(p, bins)
    return CalibrationSums(
        count=tuple(int(v) for v in np.bincount(index, minlength=bins)),
        prob_sum=tuple(math.fsum(p[index == b]) for b in range(bins)),
        positives=tuple(int(v) for v in np.bincount(index[y == 1.0], minlength=bins)),
    )


def merge_calibration(parts: Iterable[CalibrationSums]) -> CalibrationSums:
    """The sums of the union of the sites' rows: bin-wise sums.

    Raises:
        ValueError: no part, or parts with different bins.
    """
    items = list(parts)
    if not items:
        raise ValueError("no calibration sums to merge")
    bins = items[0].bins
    if any(part.bins != bins for part in items):
        raise ValueError("calibration sums on different bins")
    return CalibrationSums(
        count=tuple(sum(part.count[b] for part in items) for b in range(bins)),
        prob_sum=tuple(math.fsum(part.prob_sum[b] for part in items) for b in range(bins)),
        positives=tuple(sum(part.positives[b] for part in items) for b in range(bins)),
    )


def calibration_curve(sums: CalibrationSums) -> dict[str, Any]:
    """The calibration curve of (merged) sums: one row per bin, and the expected calibration
    error (None with no row). A bin without rows has None for its mean and rate."""
    n, bins = sums.n, sums.bins
    rows = []
    ece = 0.0
    for b in range(bins):
        count = sums.count[b]
        mean = sums.prob_sum[b] / count if count else None
        rate = sums.positives[b] / count if count else None
        if count:
            ece += count / n * abs(mean - rate)  # type: ignore[operator]
        rows.append(
            {
                "bin": b,
                "lower": b / bins,
                "upper": (b + 1) / bins,
                "count": count,
                "positives": sums.positives[b],
                "mean_predicted": mean,
                "observed_rate": rate,
            }
        )
    return {
        "grid": CALIBRATION_GRID,
        "bins": bins,
        "rows": rows,
        "n": n,
        "expected_calibration_error": ece if n else None,
        "method": (
            f"{bins} equal bins of the predicted probability over [0, 1], pooled from each "
            "site's per-bin row count, sum of predicted probabilities and positives: exact for "
            "these bins on the union of the evaluated rows"
        ),
    }


def calibration_from_wire(
    raw: Any, *, n: int, bins: int = CALIBRATION_BINS, where: str = "calibration"
) -> CalibrationSums:
    """Checked calibration sums from an ``evaluation`` message; CalibrationReportError naming
    the fault.

    Refused: not an object with exactly ``grid``, ``bins``, ``count``, ``prob_sum``,
    ``positives``; another grid; a list of the wrong length; a count that is not a whole number
    in [0, 2**53]; more positives than rows in a bin; a probability sum outside what the bin's
    rows can add up to (``count * lower <= sum <= count * upper``); counts that do not add up to
    the ``n`` rows of the message's score histogram.
    """
    if not isinstance(raw, Mapping):
        raise CalibrationReportError(f"{where} must be an object with count, prob_sum, positives")
    expected = {"grid", "bins", "count", "prob_sum", "positives"}
    if set(raw) != expected:
        raise CalibrationReportError(
            f"{where}: unknown key(s) {sorted(set(raw) - expected)}, missing "
            f"{sorted(expected - set(raw))}; expected exactly {sorted(expected)}"
        )
    if raw["grid"] != CALIBRATION_GRID or raw["bins"] != bins or isinstance(raw["bins"], bool):
        raise CalibrationReportError(
            f"{where} is binned on {str(raw['grid'])[:30]!r} with {str(raw['bins'])[:20]} bins; "
            f"this server pools {bins} bins on {CALIBRATION_GRID}"
        )
    lists = {}
    for field in ("count", "prob_sum", "positives"):
        value = raw[field]
        if not isinstance(value, list) or len(value) != bins:
            raise CalibrationReportError(f"{where}.{field} must be a list of {bins} values")
        lists[field] = value
    for field in ("count", "positives"):
        for i, v in enumerate(lists[field]):
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= _MAX_COUNT:
                raise CalibrationReportError(
                    f"{where}.{field}[{i}] must be a whole number of rows, got {str(v)[:30]!r}"
                )
    for b in range(bins):
        count, positives, total = lists["count"][b], lists["positives"][b], lists["prob_sum"][b]
        if positives > count:
            raise CalibrationReportError(
                f"{where}.positives[{b}] is {positives}, more than the bin's {count} rows"
            )
        low, high = count * b / bins, count * (b + 1) / bins
        if (
            isinstance(total, bool)
            or not isinstance(total, int | float)
            or not math.isfinite(total)
            or not low - 1e-9 * (1 + count) <= total <= high + 1e-9 * (1 + count)
        ):
            raise CalibrationReportError(
                f"{where}.prob_sum[{b}] must lie between {low:g} and {high:g} for the bin's "
                f"{count} rows, got {str(total)[:30]!r}"
            )
    if sum(lists["count"]) != n:
        raise CalibrationReportError(
            f"{where} counts {sum(lists['count'])} rows, the score histogram {n}"
        )
    return CalibrationSums(
        count=tuple(lists["count"]),
        prob_sum=tuple(float(v) for v in lists["prob_sum"]),
        positives=tuple(lists["positives"]),
    )
