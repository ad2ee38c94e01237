"""Group fairness of multi-class and regression models, exact across sites.

As :mod:`fedcore.fairness` does for binary classifiers: each site computes per-group sums of
its held-out rows (``*_group_part``), the server adds them (``merge_*_groups``) and the report
(``*_group_report``) equals fairlearn's ``MetricFrame`` on the pooled held-out rows:
``by_group`` values, and ``difference()`` (``method="between_groups"``: the largest minus the
smallest group value). Groups are those present in the merged rows.

Multi-class (class indices, prediction = arg-max), per group and class k:

* ``selection_rate`` = share of the group's rows predicted k
  (``MetricFrame(metrics=lambda t, p: mean(p == k))``);
* ``recall`` = share of the group's rows of class k predicted k
  (``recall_score(t == k, p == k)``; a group without rows of class k has 0, scikit-learn's
  ``zero_division`` value, and is listed under ``undefined``).

The report names, per metric, the class with the largest between-group difference, and the
largest disparity over both.

Regression (prediction minus target is the error), per group:

* ``mean_error`` (over- or under-prediction), ``mean_absolute_error`` and ``mean_prediction``
  (fairlearn's ``mean_prediction``), each with its between-group difference, and the largest
  of the three.

Parts are JSON-able: ``{group: K x K confusion}`` and ``{group: {"count", "sum_error",
"sum_abs_error", "sum_prediction"}}``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from fedcore.tabular import MISSING_CATEGORY

__all__ = [
    "MULTICLASS_METRICS",
    "GroupPartError",
    "check_multiclass_group_part",
    "check_regression_group_part",
    "REGRESSION_METRICS",
    "merge_multiclass_groups",
    "merge_regression_groups",
    "multiclass_group_part",
    "multiclass_group_report",
    "regression_group_part",
    "regression_group_report",
]

MULTICLASS_METRICS: tuple[str, ...] = ("selection_rate", "recall")
REGRESSION_METRICS: tuple[str, ...] = ("mean_error", "mean_absolute_error", "mean_prediction")


def _groups(sensitive: ArrayLike, n: int) -> np.ndarray:
    values = np.asarray(sensitive, dtype=object).reshape(-1)
    if values.size != n:
        raise ValueError(f"sensitive has {values.size} values for {n} rows")
    labels = np.array([str(v) for v in values], dtype=object)
    labels[np.asarray(pd.isna(values), dtype=bool)] = MISSING_CATEGORY
    return labels


def _codes(values: ArrayLike, k: int, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    bad = (array != np.round(array)) | (array < 0) | (array >= k)
    if bad.any():
        raise ValueError(f"{what} must hold class indices 0..{k - 1}")
    return array.astype(np.int64)


def multiclass_group_part(
    y_true: ArrayLike, y_pred: ArrayLike, sensitive: ArrayLike, *, classes: int
) -> dict[str, list[list[int]]]:
    """One site's confusion matrix (rows: true class, columns: predicted) per group."""
    t = _codes(y_true, classes, "y_true")
    p = _codes(y_pred, classes, "y_pred")
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} values but y_pred has {p.size}")
    groups = _groups(sensitive, t.size)
    part: dict[str, list[list[int]]] = {}
    for group in sorted(set(groups.tolist())):
        rows = groups == group
        confusion = np.zeros((classes, classes), dtype=np.int64)
        np.add.at(confusion, (t[rows], p[rows]), 1)
        part[str(group)] = confusion.tolist()
    return part


def merge_multiclass_groups(
    parts: Iterable[Mapping[str, Sequence[Sequence[int]]]],
) -> dict[str, list[list[int]]]:
    """The per-group confusion matrices of the union of the sites' rows."""
    merged: dict[str, np.ndarray] = {}
    for part in parts:
        for group, confusion in part.items():
            matrix = np.asarray(confusion, dtype=np.int64)
            merged[group] = merged[group] + matrix if group in merged else matrix
    return {group: merged[group].tolist() for group in sorted(merged)}


def _difference(values: Mapping[str, float]) -> float:
    return max(values.values()) - min(values.values()) if values else 0.0


def multiclass_group_report(
    part: Mapping[str, Sequence[Sequence[int]]], class_names: Sequence[str] | None = None
) -> dict[str, Any]:
    """Selection rate and recall per group and class, their differences, the largest one.

    Returns:
        ``{"by_group": {group: {"n", "selection_rate": {class: rate}, "recall": {class:
        rate}}}, "difference": {metric: {class: difference}}, "largest": {metric: {"class",
        "difference"}}, "largest_disparity": {"metric", "class", "difference"} | None,
        "undefined": [{"group", "class", "metric"}]}``.
    """
    by_group: dict[str, Any] = {}
    undefined: list[dict[str, str]] = []
    k = 0
    for group, confusion in sorted(part.items()):
        matrix = np.asarray(confusion, dtype=np.int64)
        n = int(matrix.sum())
        if n == 0:
            continue
        k = matrix.shape[0]
        names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
        support, predicted = matrix.sum(axis=1), matrix.sum(axis=0)
        recall: dict[str, float] = {}
        for c in range(k):
            if support[c] == 0:
                recall[names[c]] = 0.0
                undefined.append({"group": group, "class": names[c], "metric": "recall"})
            else:
                recall[names[c]] = int(matrix[c, c]) / int(support[c])
        by_group[group] = {
            "n": n,
            "selection_rate": {names[c]: int(predicted[c]) / n for c in range(k)},
            "recall": recall,
        }
    names = list(class_names) if class_names is not None else [str(c) for c in range(k)]
    difference = {
        metric: {
            name: _difference({g: entry[metric][name] for g, entry in by_group.items()})
            for name in names[:k]
        }
        for metric in MULTICLASS_METRICS
    }
    largest = {}
    for metric, values in difference.items():
        if values:
            name = max(values, key=lambda c: (values[c], -names.index(c)))
            largest[metric] = {"class": name, "difference": values[name]}
    overall = None
    if largest:
        metric = max(largest, key=lambda m: largest[m]["difference"])
        overall = {"metric": metric, **largest[metric]}
    return {
        "by_group": by_group,
        "difference": difference,
        "largest": largest,
        "largest_disparity": overall,
        "undefined": undefined,
    }


def regression_group_part(
    y_true: ArrayLike, y_pred: ArrayLike, sensitive: ArrayLike
) -> dict[str, dict[str, Any]]:
    """One site's per-group count and sums of error, absolute error and prediction (in the
    target's units; error = prediction - target)."""
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.size != p.size:
        raise ValueError(f"y_true has {t.size} values but y_pred has {p.size}")
    if not np.isfinite(t).all() or not np.isfinite(p).all():
        raise ValueError("y_true and y_pred must be finite")
    groups = _groups(sensitive, t.size)
    part: dict[str, dict[str, Any]] = {}
    for group in sorted(set(groups.tolist())):
        rows = groups == group
        error = p[rows] - t[rows]
        part[str(group)] = {
            "count": int(rows.sum()),
            "sum_error": math.fsum(error.tolist()),
            "sum_abs_error": math.fsum(np.abs(error).tolist()),
            "sum_prediction": math.fsum(p[rows].tolist()),
        }
    return part


def merge_regression_groups(
    parts: Iterable[Mapping[str, Mapping[str, Any]]],
) -> dict[str, dict[str, Any]]:
    """The per-group sums of the union of the sites' rows."""
    collected: dict[str, list[Mapping[str, Any]]] = {}
    for part in parts:
        for group, sums in part.items():
            collected.setdefault(group, []).append(sums)
    return {
        group: {
            "count": sum(int(s["count"]) for s in items),
            **{
                key: math.fsum(float(s[key]) for s in items)
                for key in ("sum_error", "sum_abs_error", "sum_prediction")
            },
        }
        for group, items in sorted(collected.items())
    }


def regression_group_report(part: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Mean error, mean absolute error and mean prediction per group, their differences and
    the largest of them.

    Returns:
        ``{"by_group": {group: {"n", "mean_error", "mean_absolute_error",
        "mean_prediction"}}, "difference": {metric: value}, "largest_disparity": {"metric",
        "difference"} | None}``.
    """
    by_group = {
        group: {
            "n": int(sums["count"]),
            "mean_error": float(sums["sum_error"]) / int(sums["count"]),
            "mean_absolute_error": float(sums["sum_abs_error"]) / int(sums["count"]),
            "mean_prediction": float(sums["sum_prediction"]) / int(sums["count"]),
        }
        for group, sums in sorted(part.items())
        if int(sums["count"]) > 0
    }
    difference = {
        metric: _difference({g: entry[metric] for g, entry in by_group.items()})
        for metric in REGRESSION_METRICS
    }
    overall = None
    if by_group:
        metric = max(REGRESSION_METRICS, key=lambda m: difference[m])
        overall = {"metric": metric, "difference": difference[metric]}
    return {"by_group": by_group, "difference": difference, "largest_disparity": overall}


# --- checking a part from the wire ---------------------------------------------------------------

MAX_COUNT = 2**53  # a count above this is not exact in a float64 sum


class GroupPartError(ValueError):
    """A site's group part is malformed (the message names the faulty field)."""


def _checked_groups(raw: Any, groups: Sequence[str], where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise GroupPartError(f"{where} must be an object of groups")
    unknown = sorted(str(g) for g in raw if g not in groups)
    if unknown:
        raise GroupPartError(
            f"{where} names groups outside the plan's public ones: {', '.join(unknown[:5])}"
        )
    return raw


def _whole(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
        raise GroupPartError(f"{where} must be a whole number between 0 and 2**53")
    return value


def check_multiclass_group_part(
    raw: Any, *, classes: int, groups: Sequence[str], n: int, where: str = "part"
) -> dict[str, list[list[int]]]:
    """A checked multi-class group part from the wire: a K x K count matrix per public group
    (``groups``), counting ``n`` rows in all; GroupPartError naming the faulty field."""
    part = _checked_groups(raw, groups, where)
    total = 0
    for group, confusion in part.items():
        at = f"{where}.{group}"
        if not isinstance(confusion, list) or len(confusion) != classes:
            raise GroupPartError(f"{at} must be {classes} rows of {classes} counts")
        for i, row in enumerate(confusion):
            if not isinstance(row, list) or len(row) != classes:
                raise GroupPartError(f"{at}[{i}] must be {classes} counts")
            total += sum(_whole(value, f"{at}[{i}][{j}]") for j, value in enumerate(row))
    if total != n:
        raise GroupPartError(f"{where} counts {total} rows; the evaluation counts {n}")
    return {str(g): [list(row) for row in m] for g, m in part.items()}


def check_regression_group_part(
    raw: Any, *, groups: Sequence[str], n: int, where: str = "part"
) -> dict[str, dict[str, Any]]:
    """A checked regression group part from the wire: per public group (``groups``) its count
    and sums, counting ``n`` rows in all; GroupPartError naming the faulty field."""
    part = _checked_groups(raw, groups, where)
    keys = {"count", "sum_error", "sum_abs_error", "sum_prediction"}
    total = 0
    for group, sums in part.items():
        at = f"{where}.{group}"
        if not isinstance(sums, Mapping) or set(sums) != keys:
            raise GroupPartError(f"{at} must have exactly the keys {sorted(keys)}")
        total += _whole(sums["count"], f"{at}.count")
        for key in keys - {"count"}:
            value = sums[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise GroupPartError(f"{at}.{key} must be a finite number")
            if not math.isfinite(value):
                raise GroupPartError(f"{at}.{key} must be a finite number")
        if (
            sums["sum_abs_error"] < 0
            or abs(sums["sum_error"]) > sums["sum_abs_error"] * (1 + 1e-9) + 1e-9
        ):
            raise GroupPartError(f"{at}: |sum_error| cannot exceed sum_abs_error >= 0")
    if total != n:
        raise GroupPartError(f"{where} counts {total} rows; the evaluation counts {n}")
    return {str(g): dict(s) for g, s in part.items()}
