"""Exact pooled metrics of multi-class and regression models from per-site sums and counts.

A mean of site metrics is not the metric of the pooled rows (a site with 10 rows would weigh as
much as one with 10,000, and an AUC ignores every cross-site pair). Here each site computes a
*part* of its held-out rows: integers and sums that add up across sites (``*_part``), the
server adds the parts (``merge_*``) and computes the metrics of the union of the held-out rows
from the sum (``*_report``), without any row leaving a site.

Multi-class (labels are class indices ``0..K-1``, predictions the arg-max of the softmax):

* the K x K confusion matrix (rows: true class, columns: predicted class), summed exactly;
  accuracy, per-class precision, recall and F1, macro F1 and support-weighted F1 follow from
  it with scikit-learn's semantics (``f1_score(average="macro" | "weighted")``): the classes are
  those present among the true or predicted labels, and a 0/0 precision, recall or F1 is 0;
* the summed cross-entropy (probabilities clipped to ``[1e-15, 1 - 1e-15]``);
* one-vs-rest AUC from per-class score histograms: for class k, the rows of class k (positives)
  and the others (negatives) are counted per bin of ``p_k`` on the final evaluation's grid
  (:data:`SCORE_BINS` bins equal in the logit over [-20, 20], ``fedcore.evaluation``). The AUC of a histogram treats a shared bin
  as a tie; it is exact when no bin holds two different scores (scores on the grid), and within
  ``sum_b pos_b * neg_b / (2 P N)`` of the exact AUC otherwise (that bound is reported). The
  histograms are of the kind the final binary evaluation pools (``fedcore.evaluation``, same
  grid and formula): one binary histogram per class.

Regression (``y`` and predictions in the target's units):

* ``count``, ``mean`` and ``m2`` (sum of squared deviations) of the targets, merged with Chan,
  Golub and LeVeque's pairwise update (more stable than raw sums of y and y squared; the same
  information), and the sums of the squared, absolute and signed residuals (prediction minus
  target), added with ``math.fsum``;
* RMSE, MAE, mean error and R^2 = 1 - SS_res / SS_tot with SS_tot = the pooled m2, as
  scikit-learn's ``r2_score`` (1.0 when both are 0, 0.0 when only SS_tot is).

Every part and report is JSON-able. Pure numpy and Python; the server and the agent both import
it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from fedcore import evaluation, tabular
from fedcore.metrics import LOG_LOSS_EPS

__all__ = [
    "SCORE_BINS",
    "TaskPartError",
    "check_multiclass_part",
    "check_regression_part",
    "class_histograms",
    "histogram_auc",
    "merge_multiclass",
    "merge_regression",
    "multiclass_metrics",
    "multiclass_part",
    "multiclass_report",
    "regression_metrics",
    "regression_part",
    "regression_report",
    "round_bins",
    "score_bins",
]

SCORE_BINS = evaluation.SCORE_BINS  # one grid for every task (fedcore.evaluation)
MAX_COUNT = evaluation.MAX_COUNT
# A round's part carries coarser one-vs-rest histograms (a per-round AUC, its error bound
# reported), and only while they stay small: 2 x classes x ROUND_BINS counts at most.
ROUND_BINS = 200
ROUND_HISTOGRAM_CELLS = 4000


def round_bins(classes: int) -> int | None:
    """The grid of a multi-class round part's histograms: ``ROUND_BINS`` (logit steps of 0.2)
    when ``2 * classes * ROUND_BINS <= ROUND_HISTOGRAM_CELLS`` (up to 10 classes), else None
    (no per-round AUC; the final evaluation's AUC is always computed)."""
    return ROUND_BINS if 2 * classes * ROUND_BINS <= ROUND_HISTOGRAM_CELLS else None


class TaskPartError(ValueError):
    """A site's metrics part is refused; the message names the field and the rule."""


# --- multi-class ---------------------------------------------------------------------------------


def _codes(y_true: ArrayLike, n_classes: int) -> np.ndarray:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    bad = (y != np.round(y)) | (y < 0) | (y >= n_classes)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"y_true must hold class indices 0..{n_classes - 1}; found {float(y[index])!r} at "
            f"index {index}"
        )
    return y.astype(np.int64)


def _probabilities(probs: ArrayLike, n: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise ValueError(f"probs must be (n={n}, classes >= 2), got shape {p.shape}")
    if not np.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError("probs must be probabilities in [0, 1] (softmax outputs)")
    return p


def score_bins(scores: ArrayLike, bins: int = SCORE_BINS) -> np.ndarray:
    """The bin of each score in [0, 1] on the final evaluation's logit grid
    (:func:`fedcore.evaluation.score_bins`: one grid for every task's histograms)."""
    return evaluation.score_bins(scores, bins)


def class_histograms(
    y_true: ArrayLike, probs: ArrayLike, bins: int = SCORE_BINS
) -> list[dict[str, list[int]]]:
    """One-vs-rest score histograms, one per class: ``{"positives", "negatives"}`` counts per
    bin of ``p_k`` for the rows of class k and for the others."""
    p = np.asarray(probs, dtype=np.float64)
    y = _codes(y_true, p.shape[1])
    p = _probabilities(p, y.size)
    result = []
    for k in range(p.shape[1]):
        index = score_bins(p[:, k], bins)
        result.append(
            {
                "positives": [int(v) for v in np.bincount(index[y == k], minlength=bins)],
                "negatives": [int(v) for v in np.bincount(index[y != k], minlength=bins)],
            }
        )
    return result


def histogram_auc(
    positives: Sequence[int], negatives: Sequence[int]
) -> tuple[float | None, float | None]:
    """AUC of binned scores (a shared bin is a tie) and the bound on its distance to the exact
    AUC; ``(None, None)`` when a side is empty (:func:`fedcore.evaluation.histogram_auc`)."""
    return evaluation.histogram_auc(
        evaluation.ScoreHistogram(
            tuple(int(v) for v in positives), tuple(int(v) for v in negatives)
        )
    )


def multiclass_part(
    y_true: ArrayLike, probs: ArrayLike, *, bins: int | None = SCORE_BINS
) -> dict[str, Any]:
    """One site's part of the pooled multi-class metrics.

    Args:
        y_true: class indices 0..K-1, n values.
        probs: (n, K) predicted class probabilities (softmax); the prediction is the arg-max
            (the first class on a tie, as ``numpy.argmax``).
        bins: the grid of the one-vs-rest histograms; None leaves them out (no AUC).

    Returns:
        ``{"classes": K, "confusion": K x K, "loss_sum", "bins", "histograms"}``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be (n, classes), got shape {p.shape}")
    k = p.shape[1]
    y = _codes(y_true, k)
    p = _probabilities(p, y.size)
    predicted = np.argmax(p, axis=1) if y.size else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    chosen = np.clip(p[np.arange(y.size), y], LOG_LOSS_EPS, 1.0 - LOG_LOSS_EPS)
    part: dict[str, Any] = {
        "classes": k,
        "confusion": confusion.tolist(),
        "loss_sum": float(-np.log(chosen).sum()),
        "bins": bins,
        "histograms": None if bins is None else class_histograms(y, p, bins),
    }
    return part


def merge_multiclass(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The part of the union of the sites' rows: confusion matrices and histograms added.

    Raises:
        ValueError: no part, or parts of different class counts or grids.
    """
    items = list(parts)
    if not items:
        raise ValueError("no multi-class part to merge")
    k, bins = items[0]["classes"], items[0]["bins"]
    for i, part in enumerate(items):
        if part["classes"] != k or part["bins"] != bins:
            raise ValueError(
                f"part {i} has {part['classes']} classes and {part['bins']} bins, the first "
                f"{k} and {bins}"
            )
    confusion = np.sum([np.asarray(part["confusion"], dtype=np.int64) for part in items], axis=0)
    histograms = None
    if bins is not None:
        histograms = [
            {
                side: [sum(part["histograms"][c][side][b] for part in items) for b in range(bins)]
                for side in ("positives", "negatives")
            }
            for c in range(k)
        ]
    return {
        "classes": k,
        "confusion": confusion.tolist(),
        "loss_sum": math.fsum(float(part["loss_sum"]) for part in items),
        "bins": bins,
        "histograms": histograms,
    }


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


def multiclass_report(part: Mapping[str, Any]) -> dict[str, Any]:
    """Accuracy, macro and weighted F1, per-class figures, loss and one-vs-rest AUC of a part.

    Returns:
        ``{"accuracy", "macro_f1", "weighted_f1", "loss", "n", "confusion", "per_class":
        [{"precision", "recall", "f1", "support", "auc", "auc_error_bound"}], "auc_ovr",
        "auc_ovr_weighted", "auc_error_bound", "bins"}``. ``auc_ovr`` is the mean of the
        per-class AUCs that are defined (a class absent from the rows, or present in all of
        them, has none), ``auc_ovr_weighted`` weights them by support; every rate is None
        with no row.
    """
    confusion = np.asarray(part["confusion"], dtype=np.int64)
    n = int(confusion.sum())
    support = confusion.sum(axis=1)
    predicted = confusion.sum(axis=0)
    tp = np.diag(confusion)
    per_class: list[dict[str, Any]] = []
    present: list[int] = []
    for c in range(confusion.shape[0]):
        entry: dict[str, Any] = {
            "precision": _ratio(int(tp[c]), int(predicted[c])),
            "recall": _ratio(int(tp[c]), int(support[c])),
            "f1": _ratio(2 * int(tp[c]), int(support[c]) + int(predicted[c])),
            "support": int(support[c]),
            "auc": None,
            "auc_error_bound": None,
        }
        if support[c] + predicted[c] > 0:
            present.append(c)
        per_class.append(entry)
    histograms = part.get("histograms")
    aucs: list[tuple[float, float, int]] = []
    if histograms is not None:
        for c, histogram in enumerate(histograms):
            auc, bound = histogram_auc(histogram["positives"], histogram["negatives"])
            per_class[c]["auc"], per_class[c]["auc_error_bound"] = auc, bound
            if auc is not None and bound is not None:
                aucs.append((auc, bound, int(support[c])))
    f1s = [per_class[c]["f1"] for c in present]
    weights = sum(int(support[c]) for c in present)
    return {
        "accuracy": int(tp.sum()) / n if n else None,
        "macro_f1": math.fsum(f1s) / len(f1s) if f1s else None,
        "weighted_f1": (
            math.fsum(per_class[c]["f1"] * int(support[c]) for c in present) / weights
            if weights
            else None
        ),
        "loss": float(part["loss_sum"]) / n if n else None,
        "n": n,
        "confusion": confusion.tolist(),
        "per_class": per_class,
        "auc_ovr": math.fsum(a for a, _, _ in aucs) / len(aucs) if aucs else None,
        "auc_ovr_weighted": (
            math.fsum(a * s for a, _, s in aucs) / sum(s for _, _, s in aucs) if aucs else None
        ),
        "auc_error_bound": max((b for _, b, _ in aucs), default=None),
        "bins": part.get("bins"),
    }


def multiclass_metrics(y_true: ArrayLike, probs: ArrayLike) -> dict[str, Any]:
    """One site's own multi-class metrics: accuracy, macro F1, weighted F1, loss, n."""
    report = multiclass_report(multiclass_part(y_true, probs, bins=None))
    return {key: report[key] for key in ("accuracy", "macro_f1", "weighted_f1", "loss", "n")}


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise TaskPartError(f"{where} must be a whole number between 0 and 2**53")
    return value


def check_multiclass_part(
    raw: Any, *, classes: int, bins: int | None = SCORE_BINS, where: str = "part"
) -> dict[str, Any]:
    """A checked multi-class part from the wire; TaskPartError naming the faulty field."""
    if not isinstance(raw, Mapping):
        raise TaskPartError(f"{where} must be an object")
    expected = {"classes", "confusion", "loss_sum", "bins", "histograms"}
    if set(raw) != expected:
        raise TaskPartError(f"{where} must have exactly the keys {sorted(expected)}")
    if raw["classes"] != classes or raw["bins"] != bins:
        raise TaskPartError(
            f"{where} is for {raw['classes']!r} classes and {raw['bins']!r} bins; the plan has "
            f"{classes} classes and this server pools {bins} bins"
        )
    confusion = raw["confusion"]
    if not isinstance(confusion, list) or len(confusion) != classes:
        raise TaskPartError(f"{where}.confusion must be {classes} rows of {classes} counts")
    for i, row in enumerate(confusion):
        if not isinstance(row, list) or len(row) != classes:
            raise TaskPartError(f"{where}.confusion[{i}] must be {classes} counts")
        for j, value in enumerate(row):
            _count(value, f"{where}.confusion[{i}][{j}]")
    n = sum(sum(row) for row in confusion)
    loss = raw["loss_sum"]
    worst = -math.log(LOG_LOSS_EPS) * n
    if (
        isinstance(loss, bool)
        or not isinstance(loss, int | float)
        or not math.isfinite(loss)
        or not 0 <= loss <= worst * (1 + 1e-9)
    ):
        raise TaskPartError(f"{where}.loss_sum must be a number in [0, {worst:.6g}]")
    if bins is None:
        if raw["histograms"] is not None:
            raise TaskPartError(f"{where}.histograms must be null without bins")
        return dict(raw)
    histograms = raw["histograms"]
    if not isinstance(histograms, list) or len(histograms) != classes:
        raise TaskPartError(f"{where}.histograms must be {classes} histograms")
    for c, histogram in enumerate(histograms):
        if not isinstance(histogram, Mapping) or set(histogram) != {"positives", "negatives"}:
            raise TaskPartError(f"{where}.histograms[{c}] must be {{positives, negatives}}")
        for side in ("positives", "negatives"):
            values = histogram[side]
            if not isinstance(values, list) or len(values) != bins:
                raise TaskPartError(f"{where}.histograms[{c}].{side} must be {bins} counts")
            for b, value in enumerate(values):
                _count(value, f"{where}.histograms[{c}].{side}[{b}]")
        if sum(histogram["positives"]) != sum(confusion[c]) or (
            sum(histogram["positives"]) + sum(histogram["negatives"]) != n
        ):
            raise TaskPartError(
                f"{where}.histograms[{c}] does not count the rows the confusion matrix counts"
            )
    return dict(raw)


# --- regression ----------------------------------------------------------------------------------


def _pair(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"y_true has {y.size} values but y_pred has {p.size}")
    if not np.isfinite(y).all() or not np.isfinite(p).all():
        raise ValueError("y_true and y_pred must be finite")
    return y, p


def regression_part(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """One site's part of the pooled regression metrics (targets and predictions in the
    target's units).

    Returns:
        ``{"count", "mean", "m2", "sum_sq_error", "sum_abs_error", "sum_error"}``: the targets'
        count, mean and sum of squared deviations, and the sums of the squared, absolute and
        signed residuals (prediction minus target).
    """
    y, p = _pair(y_true, y_pred)
    residual = p - y
    mean = float(y.mean()) if y.size else 0.0
    return {
        "count": int(y.size),
        "mean": mean,
        "m2": float(np.square(y - mean).sum()) if y.size else 0.0,
        "sum_sq_error": math.fsum(np.square(residual).tolist()),
        "sum_abs_error": math.fsum(np.abs(residual).tolist()),
        "sum_error": math.fsum(residual.tolist()),
    }


def merge_regression(parts: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """The part of the union of the sites' rows (Chan et al. for the targets' moments)."""
    items = list(parts)
    if not items:
        raise ValueError("no regression part to merge")
    count, mean, m2 = tabular.merge_moments(items)
    return {
        "count": count,
        "mean": mean,
        "m2": m2,
        **{
            key: math.fsum(float(part[key]) for part in items)
            for key in ("sum_sq_error", "sum_abs_error", "sum_error")
        },
    }


def regression_report(part: Mapping[str, Any]) -> dict[str, Any]:
    """RMSE, MAE, R^2 and mean error of a (merged) part; None for each with no row."""
    n = int(part["count"])
    if n == 0:
        return {"rmse": None, "mae": None, "r2": None, "mean_error": None, "loss": None, "n": 0}
    sse, total = float(part["sum_sq_error"]), float(part["m2"])
    if total > 0:
        r2 = 1.0 - sse / total
    else:
        r2 = 1.0 if sse == 0 else 0.0
    return {
        "rmse": math.sqrt(sse / n),
        "mae": float(part["sum_abs_error"]) / n,
        "r2": r2,
        "mean_error": float(part["sum_error"]) / n,
        "loss": sse / n,  # the mean squared error
        "n": n,
    }


def regression_metrics(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, Any]:
    """One site's own regression metrics: RMSE, MAE, R^2, mean error, loss (MSE), n."""
    return regression_report(regression_part(y_true, y_pred))


def check_regression_part(raw: Any, *, where: str = "part") -> dict[str, Any]:
    """A checked regression part from the wire; TaskPartError naming the faulty field."""
    if not isinstance(raw, Mapping):
        raise TaskPartError(f"{where} must be an object")
    expected = {"count", "mean", "m2", "sum_sq_error", "sum_abs_error", "sum_error"}
    if set(raw) != expected:
        raise TaskPartError(f"{where} must have exactly the keys {sorted(expected)}")
    _count(raw["count"], f"{where}.count")
    for key in expected - {"count"}:
        value = raw[key]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise TaskPartError(f"{where}.{key} must be a finite number")
    for key in ("m2", "sum_sq_error", "sum_abs_error"):
        if raw[key] < 0:
            raise TaskPartError(f"{where}.{key} must be >= 0")
    return dict(raw)
