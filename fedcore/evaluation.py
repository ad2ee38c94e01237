"""Exact pooled evaluation of a model across sites, from per-site score histograms.

Each site bins the predicted probability of its held-out rows on a fixed grid of
:data:`SCORE_BINS` bins, separately for positives and negatives, and adds the sum of its log
losses (:func:`site_histogram`). The bins are equal on the logit scale, ``log(p / (1 - p))``
over [-20, 20] (:data:`GRID`; the first and last bins take everything beyond): a confident
model puts most rows within 0.001 of 0 or 1, where equal bins over [0, 1] would lump half the
rows into one bin (on the thyroid demo the AUC bound was 0.0027 with 1,000 equal bins over
[0, 1], 0.00013 with this grid, actual error 0.00001). The server sums the histograms
(:func:`merge_histograms`) and computes, on the union of every site's held-out rows:

- **accuracy at threshold 0.5, exactly**: the grid has an edge at 0.5 (logit 0) and a
  probability is binned on the right side of it (``p >= 0.5`` always lands in bin ``B/2`` or
  above), so the confusion counts at 0.5 are sums of bins;
- **log loss, exactly**: the summed losses over the summed counts;
- **the AUC within a stated bound**: pairs of a positive and a negative in different bins are
  ordered exactly as their scores (the bins are ordered intervals), so only pairs that share a
  bin are uncertain. The histogram AUC counts each of those as one half (a tie), the truth counts
  it 0, 1/2 or 1, so ``|AUC_hist - AUC_exact| <= 1/2 * sum_b pos_b * neg_b / (P * N)``
  (:func:`histogram_auc` returns that bound, computed from the same histogram). The histogram
  AUC is the exact AUC of the scores rounded to their bins.

A mean of per-site AUCs is not the pooled AUC (it ignores every cross-site pair); these sums
are. Pure numpy and Python integers, no Django: the server and the agent both import it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedcore.metrics import LOG_LOSS_EPS

__all__ = [
    "GRID",
    "LOGIT_RANGE",
    "MAX_COUNT",
    "SCORE_BINS",
    "EvaluationReportError",
    "ScoreHistogram",
    "histogram_auc",
    "histogram_from_wire",
    "merge_histograms",
    "pooled_metrics",
    "score_bins",
    "site_histogram",
]

# The grid: 2,000 bins of width 0.02 in logit over [-20, 20] (a probability width of 0.005 at
# 0.5, finer towards 0 and 1). Even, so 0.5 is an edge (bin 1000 starts there). The AUC bound
# shrinks with finer bins; what a histogram tells about a site's held-out rows grows with them
# (docs/fairness.md, "The final evaluation"). ``GRID`` names it on the wire: a site binning on
# another grid is refused, never pooled.
SCORE_BINS = 2000
LOGIT_RANGE = 20.0
GRID = "logit[-20,20]"
MAX_COUNT = 1 << 53  # a count beyond this is no real held-out split (and not exact as a float)


class EvaluationReportError(ValueError):
    """A site's evaluation report is refused; the message names the field and the rule."""


@dataclass(frozen=True)
class ScoreHistogram:
    """Held-out rows per score bin, by label, and their summed log loss."""

    positives: tuple[int, ...]
    negatives: tuple[int, ...]
    loss_sum: float = 0.0

    @property
    def bins(self) -> int:
        """The number of bins of the grid."""
        return len(self.positives)

    @property
    def n(self) -> int:
        """The rows counted."""
        return sum(self.positives) + sum(self.negatives)

    def to_wire(self) -> dict[str, Any]:
        """The JSON form sent in an ``evaluation`` message (docs/protocol.md)."""
        return {
            "grid": GRID,
            "bins": self.bins,
            "positives": list(self.positives),
            "negatives": list(self.negatives),
            "loss_sum": float(self.loss_sum),
        }


def score_bins(probs: ArrayLike, bins: int = SCORE_BINS) -> np.ndarray:
    """The bin of each probability on the grid: ``floor((logit(p) + 20) / 40 * bins)``, the
    logit clipped to [-20, 20] (p = 0 in the first bin, p = 1 in the last), and ``p >= 0.5``
    never below bin ``bins // 2`` nor ``p < 0.5`` at or above it (float rounding near 0.5), so
    the bin index is monotone in ``p`` and splits exactly at the threshold.

    Args:
        probs: probabilities in [0, 1].
        bins: the grid's size, even.

    Raises:
        ValueError: a probability outside [0, 1] or not finite, or an odd ``bins``.
    """
    if bins < 2 or bins % 2:
        raise ValueError(f"bins must be an even number >= 2, got {bins}")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"probabilities must lie in [0, 1]; found {float(p[index])!r} at index {index}"
        )
    with np.errstate(divide="ignore"):  # p = 0 or 1: an infinite logit, clipped
        logit = np.clip(np.log(p) - np.log1p(-p), -LOGIT_RANGE, LOGIT_RANGE)
    scaled = (logit + LOGIT_RANGE) / (2 * LOGIT_RANGE) * bins
    index = np.minimum(np.floor(scaled).astype(np.int64), bins - 1)
    half = bins // 2
    index = np.where((p >= 0.5) & (index < half), half, index)
    return np.where((p < 0.5) & (index >= half), half - 1, index)


def binary_scores(y_true: ArrayLike, probs: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Evaluated rows' labels and predicted probabilities as flat float arrays, checked.

    Raises:
        ValueError: lengths differ, or a label is not 0/1.
    """
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but probs has {p.size}")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("y_true must hold binary labels 0/1")
    return y, p


def site_histogram(y_true: ArrayLike, probs: ArrayLike, bins: int = SCORE_BINS) -> ScoreHistogram:
    """One site's histogram of its held-out rows (labels 0/1, predicted probabilities).

    Raises:
        ValueError: lengths differ, a label is not 0/1, a probability is outside [0, 1].
    """
    y, p = binary_scores(y_true, probs)
    index = score_bins(p, bins)
    positives = np.bincount(index[y == 1.0], minlength=bins)
    negatives = np.bincount(index[y == 0.0], minlength=bins)
    clipped = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    loss_sum = float(-np.sum(y * np.log(clipped) + (1.0 - y) * np.log1p(-clipped)))
    return ScoreHistogram(
        positives=tuple(int(v) for v in positives),
        negatives=tuple(int(v) for v in negatives),
        loss_sum=loss_sum,
    )


def merge_histograms(histograms: Iterable[ScoreHistogram]) -> ScoreHistogram:
    """The histogram of the union of the sites' rows: bin-wise sums.

    Raises:
        ValueError: no histogram, or histograms on different grids.
    """
    items = list(histograms)
    if not items:
        raise ValueError("no histogram to merge")
    bins = items[0].bins
    for i, h in enumerate(items):
        if h.bins != bins:
            raise ValueError(f"histogram {i} has {h.bins} bins, the first has {bins}")
    return ScoreHistogram(
        positives=tuple(sum(h.positives[b] for h in items) for b in range(bins)),
        negatives=tuple(sum(h.negatives[b] for h in items) for b in range(bins)),
        loss_sum=math.fsum(h.loss_sum for h in items),
    )


def histogram_auc(h: ScoreHistogram) -> tuple[float | None, float | None]:
    """The AUC of the binned scores and the bound on its distance to the exact AUC.

    ``AUC = sum_b pos_b * (neg_below_b + neg_b / 2) / (P N)`` (Mann-Whitney, a shared bin a
    tie) and ``bound = sum_b pos_b * neg_b / (2 P N)``: only positive/negative pairs sharing a
    bin can be ordered differently by the exact scores, and each moves the AUC by at most
    ``1 / (2 P N)``. Integer arithmetic up to the final division. ``(None, None)`` when a class
    is absent (the AUC is undefined).
    """
    positives, negatives = sum(h.positives), sum(h.negatives)
    if positives == 0 or negatives == 0:
        return None, None
    twice_wins, same_bin, below = 0, 0, 0
    for pos, neg in zip(h.positives, h.negatives, strict=True):
        twice_wins += pos * (2 * below + neg)
        same_bin += pos * neg
        below += neg
    pairs = positives * negatives
    return twice_wins / (2 * pairs), same_bin / (2 * pairs)


def pooled_metrics(h: ScoreHistogram) -> dict[str, Any]:
    """AUC (with its error bound), accuracy at 0.5 and log loss of a (merged) histogram.

    Returns:
        ``{"auc", "auc_error_bound", "accuracy", "loss", "n", "positives", "negatives",
        "bins"}``; ``auc`` and its bound are None with one class, every rate None with no row.
    """
    n, half = h.n, h.bins // 2
    auc, bound = histogram_auc(h)
    correct = sum(h.positives[half:]) + sum(h.negatives[:half])
    return {
        "auc": auc,
        "auc_error_bound": bound,
        "accuracy": correct / n if n else None,
        "loss": h.loss_sum / n if n else None,
        "n": n,
        "positives": sum(h.positives),
        "negatives": sum(h.negatives),
        "bins": h.bins,
    }


def _counts(value: Any, field: str, bins: int) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) != bins:
        got = f"{len(value)} values" if isinstance(value, list) else type(value).__name__
        raise EvaluationReportError(f"{field} must be a list of {bins} counts, got {got}")
    for i, count in enumerate(value):
        if isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
            raise EvaluationReportError(
                f"{field}[{i}] must be a whole number of rows between 0 and 2**53, "
                f"got {str(count)[:30]!r}"
            )
    return tuple(value)


def histogram_from_wire(
    raw: Any, *, bins: int = SCORE_BINS, where: str = "evaluation"
) -> ScoreHistogram:
    """A checked histogram from an ``evaluation`` message; EvaluationReportError naming the fault.

    Refused: not an object, a key other than ``grid``, ``bins``, ``positives``, ``negatives``,
    ``loss_sum``, a grid other than :data:`GRID` with ``bins`` bins (the one both sides use),
    a count that is not a
    whole number in [0, 2**53], a list of the wrong length, a loss sum that is negative, not
    finite or impossible (above the loss of every row at the probability clip), and no row.
    """
    if not isinstance(raw, Mapping):
        raise EvaluationReportError(f"{where} must be an object with bins, positives, negatives")
    expected = {"grid", "bins", "positives", "negatives", "loss_sum"}
    unknown = sorted(set(raw) - expected)
    missing = sorted(expected - set(raw))
    if unknown or missing:
        raise EvaluationReportError(
            f"{where}: unknown key(s) {unknown}, missing {missing}; expected exactly "
            f"{sorted(expected)}"
        )
    if raw["grid"] != GRID or raw["bins"] != bins or isinstance(raw["bins"], bool):
        raise EvaluationReportError(
            f"{where} is binned on {str(raw['grid'])[:30]!r} with {str(raw['bins'])[:20]} "
            f"bins; this server pools histograms of {bins} bins on {GRID} (the logit of the "
            "probability; update the site agent)"
        )
    positives = _counts(raw["positives"], f"{where}.positives", bins)
    negatives = _counts(raw["negatives"], f"{where}.negatives", bins)
    n = sum(positives) + sum(negatives)
    if n == 0:
        raise EvaluationReportError(f"{where} counts no held-out row")
    loss = raw["loss_sum"]
    worst = -math.log(LOG_LOSS_EPS) * n
    if (
        isinstance(loss, bool)
        or not isinstance(loss, int | float)
        or not math.isfinite(loss)
        or not 0.0 <= loss <= worst * (1 + 1e-9)
    ):
        raise EvaluationReportError(
            f"{where}.loss_sum must be a finite number between 0 and {worst:.6g} for {n} rows, "
            f"got {str(loss)[:30]!r}"
        )
    return ScoreHistogram(positives=positives, negatives=negatives, loss_sum=float(loss))
