"""Binary-classification metrics in plain numpy (no scikit-learn at the sites)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["LOG_LOSS_EPS", "binary_metrics", "roc_auc"]

# Probabilities are clipped to [eps, 1 - eps] before taking logs so one confident mistake costs
# a large but finite loss.
LOG_LOSS_EPS = 1e-15


def _as_labels_and_scores(
    y_true: ArrayLike, scores: ArrayLike, what: str
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise ValueError(
            f"y_true has {y.size} values but {what} has {s.size}; pass one {what} value per label"
        )
    bad = ~np.isin(y, (0.0, 1.0))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"y_true must hold binary labels 0/1; found {float(y[index])!r} at index {index}"
        )
    not_finite = ~np.isfinite(s)
    if not_finite.any():
        index = int(np.flatnonzero(not_finite)[0])
        raise ValueError(f"{what} must be finite; found {float(s[index])!r} at index {index}")
    return y, s


def _average_ranks(values: np.ndarray) -> np.ndarray:
    # 1-based ranks; tied values share the mean of the ranks they span.
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    mean_rank = last_rank - (counts - 1) / 2.0
    return mean_rank[inverse]


def roc_auc(y_true: ArrayLike, scores: ArrayLike) -> float:
    """Return the area under the ROC curve (Mann-Whitney U statistic, ties count one half).

    Args:
        y_true: binary labels (0/1), any shape that flattens to n values.
        scores: finite scores, higher meaning "more likely positive"; n values.

    Returns:
        The AUC in [0, 1], or ``nan`` when only one class (or no data) is present.

    Raises:
        ValueError: lengths differ, a label is not 0/1, or a score is not finite.
    """
    y, s = _as_labels_and_scores(y_true, scores, "scores")
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = _average_ranks(s)
    rank_sum_pos = float(ranks[y == 1.0].sum())
    return (rank_sum_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def binary_metrics(y_true: ArrayLike, probs: ArrayLike) -> dict[str, Any]:
    """Return AUC, accuracy at threshold 0.5, mean log loss and the example count.

    Undefined values are ``None`` rather than NaN so the dict stays valid JSON: ``auc`` when only
    one class is present, everything but ``n`` when there are no examples.

    Args:
        y_true: binary labels (0/1), n values.
        probs: predicted probabilities of the positive class, n values in [0, 1].

    Returns:
        ``{"auc": float | None, "accuracy": float | None, "loss": float | None, "n": int}``.

    Raises:
        ValueError: lengths differ, a label is not 0/1, or a probability is outside [0, 1].
    """
    y, p = _as_labels_and_scores(y_true, probs, "probs")
    outside = (p < 0.0) | (p > 1.0)
    if outside.any():
        index = int(np.flatnonzero(outside)[0])
        raise ValueError(
            f"probs must lie in [0, 1]; found {float(p[index])!r} at index {index} "
            "(pass probabilities, e.g. from predict_proba, not logits)"
        )
    n = int(y.size)
    if n == 0:
        return {"auc": None, "accuracy": None, "loss": None, "n": 0}
    auc = roc_auc(y, p)
    accuracy = float(np.mean((p >= 0.5) == (y == 1.0)))
    clipped = np.clip(p, LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    loss = float(-np.mean(y * np.log(clipped) + (1.0 - y) * np.log1p(-clipped)))
    return {
        "auc": None if math.isnan(auc) else float(auc),
        "accuracy": accuracy,
        "loss": loss,
        "n": n,
    }
