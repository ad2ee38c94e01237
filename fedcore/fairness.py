"""Group fairness for federated evaluation: per-group confusion counts, exact merge, metrics.

Each site counts, on its held-out split, the confusion cells {tp, fp, tn, fn} of every sensitive
group (``group_counts``). Counts are integers, so the server's sum (``merge_counts``) is exactly
the counts of the pooled evaluation data, and ``fairness_report`` of the merged counts equals
fairlearn's ``MetricFrame`` and disparity metrics computed on the pooled rows -- without any row
leaving a site.

Semantics matched with fairlearn 0.15 (``fairlearn.metrics``), binary labels, positive label 1:

* ``selection_rate`` = (tp + fp) / n, ``accuracy`` = (tp + tn) / n (``accuracy_score``).
* ``tpr`` = tp / (tp + fn) and ``fpr`` = fp / (fp + tn), as ``true_positive_rate`` and
  ``false_positive_rate``. A group with no positive labels has an undefined TPR; fairlearn
  computes it through scikit-learn's ``confusion_matrix(normalize="true")``, which turns 0/0 into
  0 silently (``nan_to_num``), and ``MetricFrame`` with ``recall_score`` also gives 0 (with an
  ``UndefinedMetricWarning``). So an undefined TPR (no positives) or FPR (no negatives) is 0.0
  here too, and it enters the equalized odds difference as 0 -- a group with no positive labels
  can therefore inflate that difference. The report lists every such substitution under
  ``undefined_rates`` so that a reader can tell a real gap from a missing class.
* Groups are those present in the data: a group whose merged count is 0 (absent everywhere, e.g.
  declared but never seen) is left out of ``by_group`` and of the differences, as it would be
  absent from the pooled rows fairlearn sees.
* ``demographic_parity_difference`` = max - min of the groups' selection rates;
  ``equalized_odds_difference`` = max(TPR max - min, FPR max - min) -- fairlearn's defaults
  (``method="between_groups"``, ``agg="worst_case"``). One group gives 0.

Group labels are strings; a missing sensitive value (None, NaN, pd.NA) is the group
``"__missing__"``, as in ``fedcore.tabular``. Every dict returned is JSON-able (str keys, int
counts, float rates) with groups in sorted order.

A site may release its counts with differential privacy (``noisy_counts``: exact discrete Laplace
or discrete Gaussian noise, L1/L2 sensitivity 1 under add/remove adjacency); the epsilon it returns
goes in the privacy ledger like any other spend.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from fedcore.tabular import MISSING_CATEGORY, DatasetSchema

__all__ = [
    "CELLS",
    "MECHANISMS",
    "OTHER_GROUP",
    "SPREAD_METRICS",
    "THRESHOLD_METRICS",
    "fairness_report",
    "group_counts",
    "merge_counts",
    "noisy_counts",
    "performance_spread",
    "predictions_at",
    "public_groups",
    "reported_attributes",
    "representation",
    "threshold_flags",
]

Counts = dict[str, dict[str, int]]

CELLS: tuple[str, ...] = ("tp", "fp", "tn", "fn")
# The group of a sensitive value that is not in the attribute's public group list (a category
# only this site's held-out split holds, say): released under this label, never its own.
OTHER_GROUP = "__other__"
MECHANISMS: tuple[str, ...] = ("laplace", "gaussian")
SPREAD_METRICS: tuple[str, ...] = ("accuracy", "auc")
# Plan threshold key (TrainingPlan.spec["fairness"]) -> the report value it bounds.
THRESHOLD_METRICS: dict[str, str] = {
    "max_demographic_parity_difference": "demographic_parity_difference",
    "max_equalized_odds_difference": "equalized_odds_difference",
}
# Rates are ratios of integers, so a difference equal to a limit can still land one or two ulps
# above it; only an excess beyond this is flagged.
_FLAG_TOLERANCE = 1e-12
# The Gaussian noise scale is computed in floating point; widening it by this factor keeps the
# guarantee at or below the epsilon charged despite rounding.
_SIGMA_SAFETY = 1.0 + 1e-9


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _binary(values: ArrayLike, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(f"{what} must be one-dimensional; got shape {array.shape}")
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
    ):
        raise ValueError(f"{what} must hold binary labels 0/1; got dtype {array.dtype}")
    floats = array.astype(np.float64)
    bad = ~np.isin(floats, (0.0, 1.0))
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"{what} must hold binary labels 0/1; found {array[index].item()!r} at index {index}"
        )
    return floats == 1.0


def _label(value: object) -> str:
    # Booleans read as fedcore.tabular writes them, so raw and transformed data agree.
    if isinstance(value, bool | np.bool_):
        return "true" if value else "false"
    return str(value)


def _group_labels(sensitive: ArrayLike) -> np.ndarray:
    values = np.asarray(sensitive, dtype=object)
    if values.ndim != 1:
        raise ValueError(f"sensitive must be one-dimensional; got shape {values.shape}")
    missing = np.asarray(pd.isna(values), dtype=bool)
    labels = np.array([_label(value) for value in values], dtype=object)
    labels[missing] = MISSING_CATEGORY
    return labels


def predictions_at(probs: ArrayLike, threshold: float = 0.5) -> np.ndarray:
    """Turn predicted probabilities into hard 0/1 predictions.

    A probability equal to the threshold predicts 1, as ``fedcore.metrics.binary_metrics`` does
    for its accuracy.

    Args:
        probs: probabilities of the positive class, n values in [0, 1].
        threshold: decision threshold in [0, 1].

    Returns:
        int64 array of n values, 1 where ``probs >= threshold``.

    Raises:
        ValueError: a probability is not finite or lies outside [0, 1], or the threshold does.
    """
    if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be a number in [0, 1]; got {threshold!r}")
    p = np.asarray(probs, dtype=np.float64).reshape(-1)
    bad = ~np.isfinite(p) | (p < 0.0) | (p > 1.0)
    if bad.any():
        index = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"probs must be finite and lie in [0, 1]; found {float(p[index])!r} at index {index}"
        )
    return (p >= threshold).astype(np.int64)


def group_counts(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    sensitive: ArrayLike,
    *,
    groups: Sequence[str] | None = None,
) -> Counts:
    """Count the confusion cells of every sensitive group on a site's held-out split.

    Args:
        y_true: true binary labels (0/1 or bool), n values.
        y_pred: hard binary predictions (0/1 or bool), n values; see ``predictions_at``.
        sensitive: the sensitive attribute, n values. Labels are ``str(value)``, booleans
            ``"true"``/``"false"``; None, NaN and pd.NA become ``"__missing__"`` (as
            ``fedcore.tabular.transform`` labels groups).
        groups: optional fixed list of group labels. Every listed group appears in the result
            (with zero counts if absent here), so the set of keys reveals nothing about the data;
            a label seen in the data but not listed is an error.

    Returns:
        ``{group: {"tp", "fp", "tn", "fn"}}`` with plain int counts, groups sorted.

    Raises:
        ValueError: lengths differ, a label or prediction is not binary, an input is not
            one-dimensional, or a label is missing from ``groups``.
    """
    truth = _binary(y_true, "y_true")
    predicted = _binary(y_pred, "y_pred")
    labels = _group_labels(sensitive)
    if not truth.size == predicted.size == labels.size:
        raise ValueError(
            f"y_true, y_pred and sensitive must have one value per record; got lengths "
            f"{truth.size}, {predicted.size} and {labels.size}"
        )
    names, inverse = np.unique(labels.astype(str), return_inverse=True)
    cells = {
        "tp": truth & predicted,
        "fp": ~truth & predicted,
        "tn": ~truth & ~predicted,
        "fn": truth & ~predicted,
    }
    tallies = {
        cell: np.bincount(inverse[mask], minlength=names.size) for cell, mask in cells.items()
    }
    counts: Counts = {
        str(name): {cell: int(tallies[cell][i]) for cell in CELLS} for i, name in enumerate(names)
    }
    if groups is not None:
        declared = [str(group) for group in groups]
        unknown = sorted(set(counts) - set(declared))
        if unknown:
            raise ValueError(
                f"sensitive holds group(s) {', '.join(map(repr, unknown))} not in groups "
                f"({', '.join(map(repr, declared)) or 'none'})"
            )
        for group in declared:
            counts.setdefault(group, dict.fromkeys(CELLS, 0))
    return {group: counts[group] for group in sorted(counts)}


def _checked_counts(counts: object, where: str) -> Counts:
    if not isinstance(counts, Mapping):
        raise ValueError(
            f"{where}: counts must be a mapping group -> {{tp, fp, tn, fn}}; "
            f"got {type(counts).__name__}"
        )
    checked: Counts = {}
    for group, cells in counts.items():
        if not isinstance(group, str):
            raise ValueError(f"{where}: group {group!r} is not a string label")
        if not isinstance(cells, Mapping):
            raise ValueError(
                f"{where}, group {group!r}: expected a mapping with keys tp, fp, tn, fn; "
                f"got {type(cells).__name__}"
            )
        unknown = [key for key in cells if key not in CELLS]
        if unknown:
            raise ValueError(
                f"{where}, group {group!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
                "allowed: tp, fp, tn, fn"
            )
        absent = [cell for cell in CELLS if cell not in cells]
        if absent:
            raise ValueError(f"{where}, group {group!r}: missing key(s) {', '.join(absent)}")
        for cell in CELLS:
            value = cells[cell]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise ValueError(
                    f"{where}, group {group!r}: {cell} = {value!r} is not an integer count"
                )
            if value < 0:
                raise ValueError(f"{where}, group {group!r}: {cell} = {value!r} is negative")
        checked[group] = {cell: int(cells[cell]) for cell in CELLS}
    return checked


def merge_counts(list_of_counts: Sequence[Mapping[str, Mapping[str, int]]]) -> Counts:
    """Sum per-group confusion counts across sites, exactly.

    A group absent at a site counts 0 there. Because counts are integers the sum is exact: the
    merged counts equal ``group_counts`` of the pooled rows.

    Args:
        list_of_counts: one ``group_counts`` result per site (e.g. decoded from JSON).

    Returns:
        ``{group: {"tp", "fp", "tn", "fn"}}`` over the union of groups, sorted; ``{}`` for no
        sites.

    Raises:
        ValueError: a site's counts are malformed -- not a mapping, a non-string group, an unknown
            or missing cell key, a negative or non-integer count; the message names the site
            index (0-based) and the group.
    """
    merged: Counts = {}
    for index, counts in enumerate(list_of_counts):
        for group, cells in _checked_counts(counts, f"site {index}").items():
            total = merged.setdefault(group, dict.fromkeys(CELLS, 0))
            for cell in CELLS:
                total[cell] += cells[cell]
    return {group: merged[group] for group in sorted(merged)}


def _rates(cells: Mapping[str, int]) -> dict[str, Any]:
    tp, fp, tn, fn = (cells[cell] for cell in CELLS)
    n = tp + fp + tn + fn
    positives, negatives = tp + fn, fp + tn
    # 0/0 -> 0.0 as fairlearn (scikit-learn's confusion_matrix normalize="true" + nan_to_num).
    return {
        "selection_rate": (tp + fp) / n,
        "tpr": tp / positives if positives else 0.0,
        "fpr": fp / negatives if negatives else 0.0,
        "accuracy": (tp + tn) / n,
        "count": n,
    }


def _undefined(cells: Mapping[str, int], group: str | None) -> list[dict[str, Any]]:
    found = []
    if cells["tp"] + cells["fn"] == 0:
        found.append({"group": group, "metric": "tpr", "reason": "no positive labels"})
    if cells["fp"] + cells["tn"] == 0:
        found.append({"group": group, "metric": "fpr", "reason": "no negative labels"})
    return found


def _spread(values: Sequence[float]) -> float:
    return max(values) - min(values)


def fairness_report(counts: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Compute group metrics and disparity differences from (merged) confusion counts.

    Equal to fairlearn on the pooled rows: ``MetricFrame`` with ``selection_rate``,
    ``true_positive_rate``, ``false_positive_rate`` and ``accuracy_score`` (``by_group`` and
    ``overall``), ``demographic_parity_difference`` and ``equalized_odds_difference``. An undefined
    rate is 0.0 as in fairlearn (see the module docstring) and is listed in ``undefined_rates``.

    Args:
        counts: ``{group: {"tp", "fp", "tn", "fn"}}``, usually from ``merge_counts``.

    Returns:
        ``{"by_group": {group: {"selection_rate", "tpr", "fpr", "accuracy", "count"}},
        "overall": {same keys}, "demographic_parity_difference": float,
        "equalized_odds_difference": float, "undefined_rates": [{"group": str | None,
        "metric": "tpr" | "fpr", "reason": str}]}``. Groups with a count of 0 are omitted;
        ``"group": None`` in ``undefined_rates`` means the overall rate.

    Raises:
        ValueError: the counts are malformed (as ``merge_counts``) or hold no record at all.
    """
    checked = _checked_counts(counts, "counts")
    present = {group: cells for group, cells in sorted(checked.items()) if sum(cells.values())}
    if not present:
        raise ValueError("counts hold no record; a fairness report needs at least one")
    totals = {cell: sum(cells[cell] for cells in present.values()) for cell in CELLS}
    by_group = {group: _rates(cells) for group, cells in present.items()}
    undefined = [entry for group, cells in present.items() for entry in _undefined(cells, group)]
    undefined += _undefined(totals, None)
    tpr_difference = _spread([rates["tpr"] for rates in by_group.values()])
    fpr_difference = _spread([rates["fpr"] for rates in by_group.values()])
    return {
        "by_group": by_group,
        "overall": _rates(totals),
        "demographic_parity_difference": _spread(
            [rates["selection_rate"] for rates in by_group.values()]
        ),
        "equalized_odds_difference": max(tpr_difference, fpr_difference),
        "undefined_rates": undefined,
    }


def performance_spread(per_silo_metrics: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Compare the worst and the best silo on accuracy and AUC.

    Args:
        per_silo_metrics: silo -> its evaluation metrics (``binary_metrics`` output; keys other
            than accuracy and auc are ignored). A metric that is missing, None or NaN (AUC with
            one class) is undefined at that silo and skipped.

    Returns:
        ``{metric: None | {"worst": {"silo", "value"}, "best": {"silo", "value"},
        "difference": best - worst, "ratio": worst / best (None when best is 0), "silos": int}}``
        for ``accuracy`` and ``auc``; None when no silo defines the metric. Ties go to the silo
        seen first.

    Raises:
        ValueError: a silo's metrics are not a mapping, or a value is not a number in [0, 1].
    """
    spread: dict[str, Any] = {}
    for metric in SPREAD_METRICS:
        values: list[tuple[str, float]] = []
        for silo, metrics in per_silo_metrics.items():
            if not isinstance(metrics, Mapping):
                raise ValueError(
                    f"silo {silo!r}: metrics must be a mapping; got {type(metrics).__name__}"
                )
            value = metrics.get(metric)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                continue
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"silo {silo!r}: {metric} = {value!r} is not a number in [0, 1]")
            values.append((silo, float(value)))
        if not values:
            spread[metric] = None
            continue
        worst = min(values, key=lambda item: item[1])
        best = max(values, key=lambda item: item[1])
        spread[metric] = {
            "worst": {"silo": worst[0], "value": worst[1]},
            "best": {"silo": best[0], "value": best[1]},
            "difference": best[1] - worst[1],
            "ratio": worst[1] / best[1] if best[1] > 0.0 else None,
            "silos": len(values),
        }
    return spread


def _shares(counts: Counts, groups: Sequence[str]) -> dict[str, Any]:
    sizes = {group: sum(counts[group].values()) if group in counts else 0 for group in groups}
    total = sum(sizes.values())
    return {
        "count": total,
        "shares": {group: sizes[group] / total if total else None for group in groups},
    }


def representation(
    counts_by_silo: Mapping[str, Mapping[str, Mapping[str, int]]],
) -> dict[str, Any]:
    """Report each sensitive group's share of every silo's evaluation records.

    Args:
        counts_by_silo: silo -> its ``group_counts`` result.

    Returns:
        ``{"groups": [sorted union of groups], "by_silo": {silo: {"count": int, "shares":
        {group: float | None}}}, "overall": {"count": int, "shares": {...}}}``. Every silo lists
        every group (0.0 where absent); shares are None for a silo with no records.

    Raises:
        ValueError: a silo's counts are malformed; the message names the silo and the group.
    """
    checked = {
        silo: _checked_counts(counts, f"silo {silo!r}") for silo, counts in counts_by_silo.items()
    }
    groups = sorted({group for counts in checked.values() for group in counts})
    pooled = merge_counts(list(checked.values()))
    return {
        "groups": groups,
        "by_silo": {silo: _shares(counts, groups) for silo, counts in checked.items()},
        "overall": _shares(pooled, groups),
    }


def threshold_flags(
    report: Mapping[str, Any], thresholds: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """List the plan's fairness thresholds that a report exceeds.

    Args:
        report: a ``fairness_report`` result.
        thresholds: the plan's ``fairness`` section. ``max_demographic_parity_difference`` and
            ``max_equalized_odds_difference`` are read (absent or None: no limit); other keys,
            such as ``sensitive_attribute``, are ignored.

    Returns:
        One ``{"metric", "value", "limit", "threshold"}`` dict per exceeded limit (value above
        limit by more than 1e-12, so a value equal to its limit up to rounding passes), in the
        order above. An equalized-odds flag also carries the report's ``undefined_rates`` when
        there are any: a group without positives (TPR 0) may be what exceeds the limit.

    Raises:
        ValueError: a limit is not a non-negative number, or the report lacks a bounded value.
    """
    flags: list[dict[str, Any]] = []
    for key, metric in THRESHOLD_METRICS.items():
        limit = thresholds.get(key)
        if limit is None:
            continue
        if not _is_number(limit) or limit < 0:
            raise ValueError(f"{key} must be a non-negative number; got {limit!r}")
        value = report.get(metric)
        if not _is_number(value):
            raise ValueError(f"report has no numeric {metric!r} to compare with {key}")
        if value > limit + _FLAG_TOLERANCE:
            flag: dict[str, Any] = {
                "metric": metric,
                "value": value,
                "limit": limit,
                "threshold": key,
            }
            undefined = report.get("undefined_rates") or []
            if metric == "equalized_odds_difference" and undefined:
                flag["undefined_rates"] = list(undefined)
            flags.append(flag)
    return flags


# Exact samplers after Canonne, Kamath and Steinke, "The Discrete Gaussian for Differential
# Privacy" (NeurIPS 2020), Algorithms 1-3: rational arithmetic and uniform integers only, so there
# is no floating-point leakage (Mironov 2012) and no dependence on numpy's generators.


def _bernoulli(p: Fraction, source: random.Random) -> bool:
    return source.randrange(p.denominator) < p.numerator


def _bernoulli_exp(gamma: Fraction, source: random.Random) -> bool:
    """Return True with probability exp(-gamma), gamma >= 0."""
    while gamma > 1:
        if not _bernoulli_exp(Fraction(1), source):
            return False
        gamma -= 1
    k = 1
    while _bernoulli(gamma / k, source):
        k += 1
    return k % 2 == 1


def _discrete_laplace(scale: Fraction, source: random.Random) -> int:
    """Sample Z with P(Z = z) proportional to exp(-|z| / scale)."""
    t, s = scale.numerator, scale.denominator
    while True:
        u = source.randrange(t)
        if not _bernoulli_exp(Fraction(u, t), source):
            continue
        v = 0
        while _bernoulli_exp(Fraction(1), source):
            v += 1
        magnitude = (u + t * v) // s
        negative = source.randrange(2) == 1
        if negative and magnitude == 0:
            continue
        return -magnitude if negative else magnitude


def _discrete_gaussian(sigma2: Fraction, source: random.Random) -> int:
    """Sample Z with P(Z = z) proportional to exp(-z^2 / (2 sigma2))."""
    t = math.isqrt(sigma2.numerator // sigma2.denominator) + 1
    while True:
        y = _discrete_laplace(Fraction(t), source)
        gamma = (abs(y) - sigma2 / t) ** 2 / (2 * sigma2)
        if _bernoulli_exp(gamma, source):
            return y


def _gaussian_rho(epsilon: float, delta: float) -> float:
    # rho-zCDP implies (rho + 2 sqrt(rho log(1/delta)), delta)-DP (Bun and Steinke 2016, Prop.
    # 1.3); solve for the largest rho whose epsilon is the one charged.
    log_term = math.log(1.0 / delta)
    return (math.sqrt(log_term + epsilon) - math.sqrt(log_term)) ** 2


def noisy_counts(
    counts: Mapping[str, Mapping[str, int]],
    *,
    epsilon: float,
    source: random.Random | None = None,
    mechanism: str = "laplace",
    delta: float | None = None,
    groups: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Release a site's group counts with differential privacy.

    Sensitivity: every record falls in exactly one cell (its group x tp/fp/tn/fn), so adding or
    removing one record changes exactly one cell by 1: L1 = L2 sensitivity 1 under add/remove
    adjacency, which is what the noise is calibrated to (and what Opacus' accountant assumes).
    Under replace-one adjacency a record may leave one cell and enter another: sensitivity 2
    (L1) / sqrt(2) (L2), i.e. twice the epsilon for Laplace and twice the rho for Gaussian.

    * ``"laplace"``: discrete Laplace noise, P(z) proportional to exp(-epsilon |z|), added to
      every cell; pure epsilon-DP (delta 0).
    * ``"gaussian"``: discrete Gaussian noise with sigma^2 = 1 / (2 rho), which is rho-zCDP
      (Canonne, Kamath and Steinke 2020); rho is the largest value whose (epsilon, delta)
      conversion gives the epsilon charged. ``rho`` is returned for zCDP/RDP accounting.

    The noise is exact (integer samplers in rational arithmetic) and drawn from ``source``; the
    noisy counts are then clamped at 0 (post-processing: no extra privacy cost, but small counts
    are biased upwards). They are integers already, so no rounding is needed.

    The set of released groups is not noised. Pass ``groups`` -- a public list such as the
    categories every silo declared -- so that a rare group present only at this site (one
    ``"__missing__"`` record, say) is not revealed by its key; every listed group is released,
    absent ones as noisy zeros. Without ``groups`` the keys of ``counts`` are released as they are.
    Each call is one release: releasing the counts of several attributes or rounds costs epsilon
    each time, composed by the privacy ledger.

    Args:
        counts: a site's ``group_counts`` result.
        epsilon: privacy parameter charged for this release, > 0.
        source: random source; default ``random.SystemRandom()`` (os.urandom). Tests inject a
            seeded ``random.Random``; never pass a seeded source in production.
        mechanism: ``"laplace"`` or ``"gaussian"``.
        delta: for ``"gaussian"`` only, in (0, 1).
        groups: public list of groups to release (see above).

    Returns:
        ``{"counts": {group: {"tp", "fp", "tn", "fn"}}, "mechanism": str, "epsilon": float,
        "delta": float, "rho": float | None, "sigma": float | None, "scale": float | None}`` --
        the noisy counts and the privacy charged (``scale`` for Laplace, ``sigma`` and ``rho``
        for Gaussian).

    Raises:
        ValueError: malformed counts, epsilon not > 0, an unknown mechanism, a delta missing or
            outside (0, 1) for Gaussian or given for Laplace, or a counted group not in ``groups``.
    """
    checked = _checked_counts(counts, "counts")
    if not _is_number(epsilon) or epsilon <= 0:
        raise ValueError(f"epsilon must be a finite number > 0; got {epsilon!r}")
    if mechanism not in MECHANISMS:
        raise ValueError(f"mechanism {mechanism!r} is not supported; allowed: laplace, gaussian")
    if mechanism == "gaussian":
        if delta is None or not _is_number(delta) or not 0.0 < delta < 1.0:
            raise ValueError(f"the gaussian mechanism needs delta in (0, 1); got {delta!r}")
    elif delta is not None:
        raise ValueError("delta applies to the gaussian mechanism only; laplace is pure epsilon-DP")
    released = sorted(checked)
    if groups is not None:
        declared = [str(group) for group in groups]
        unknown = sorted(set(checked) - set(declared))
        if unknown:
            raise ValueError(
                f"counts hold group(s) {', '.join(map(repr, unknown))} not in groups "
                f"({', '.join(map(repr, declared)) or 'none'})"
            )
        released = sorted(set(declared))
    rng = source if source is not None else random.SystemRandom()
    result: dict[str, Any] = {"mechanism": mechanism, "epsilon": float(epsilon)}
    if mechanism == "laplace":
        scale = 1 / Fraction(epsilon)
        result.update(delta=0.0, rho=None, sigma=None, scale=float(scale))

        def noise() -> int:
            return _discrete_laplace(scale, rng)

    else:
        assert delta is not None
        rho = _gaussian_rho(float(epsilon), float(delta))
        sigma2 = Fraction(_SIGMA_SAFETY / (2.0 * rho))
        result.update(
            delta=float(delta), rho=1.0 / (2.0 * float(sigma2)), sigma=math.sqrt(sigma2), scale=None
        )

        def noise() -> int:
            return _discrete_gaussian(sigma2, rng)

    zero = dict.fromkeys(CELLS, 0)
    result["counts"] = {
        group: {cell: max(0, checked.get(group, zero)[cell] + noise()) for cell in CELLS}
        for group in released
    }
    return result


# Public group lists: which labels a site may release as keys of its counts.


def reported_attributes(
    schema: DatasetSchema, declared: Mapping[str, Sequence[str]] | None = None
) -> list[str]:
    """The sensitive attributes whose counts have a public group list, in schema order.

    A categorical or boolean feature column has one (its fitted categories, or true/false); a
    sensitive column that is not a feature has one only when the plan's ``fairness.groups``
    declares its labels. The others cannot be reported without revealing their group names.

    Args:
        schema: the plan's dataset schema.
        declared: the plan's ``fairness.groups`` (attribute -> labels), if any.
    """
    features = {column.name: column.type for column in schema.columns}
    declared = declared or {}
    return [
        name
        for name in schema.sensitive
        if features.get(name) in ("categorical", "boolean") or name in declared
    ]


def public_groups(
    schema: DatasetSchema,
    fitted: Mapping[str, Any] | None,
    declared: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[str]]:
    """The group labels each reported sensitive attribute may release, sorted.

    Only labels every site already knows: for a categorical feature column the categories of the
    fitted preprocessing (the union the federated statistics published), for a boolean one
    ``"false"``/``"true"``, for a sensitive column that is not a feature the labels the plan
    declares (``fairness.groups``); plus ``"__missing__"`` always and ``"__other__"`` (a value
    outside the list) except for booleans. Releasing every listed group, zero counts included,
    makes the set of keys independent of the data.

    Args:
        schema: the plan's dataset schema.
        fitted: the run's fitted preprocessing (``merge_statistics``); None or without
            categories: no category is public yet.
        declared: the plan's ``fairness.groups``.

    Returns:
        ``{attribute: [labels]}`` for ``reported_attributes(schema, declared)``.
    """
    features = {column.name: column.type for column in schema.columns}
    categories = (fitted or {}).get("categories") or {}
    declared = declared or {}
    groups: dict[str, list[str]] = {}
    for name in reported_attributes(schema, declared):
        if features.get(name) == "boolean":
            labels = {"false", "true", MISSING_CATEGORY}
        elif features.get(name) == "categorical":
            labels = {str(value) for value in categories.get(name) or ()}
            labels |= {MISSING_CATEGORY, OTHER_GROUP}
        else:
            labels = {str(value) for value in declared[name]} | {MISSING_CATEGORY, OTHER_GROUP}
        groups[name] = sorted(labels)
    return groups
