"""Bias mitigation from federated counts: reweighing, FairFed, reductions, group thresholds.

Every function here reads **counts** the sites release (no row leaves a site) and returns what
the server sends back or applies. They are pure: no Django, no transport, no randomness.

* :func:`reweighing_weights` -- Kamiran and Calders (2012), "Data preprocessing techniques for
  classification without discrimination": weights w(g, y) = P(g) P(y) / P(g, y) from the summed
  per-site (group, label) counts of the training rows.
* :func:`fairfed_step` -- FairFed (Ezzeldin et al., AAAI 2023): the server's aggregation weights
  move away from the sites whose local fairness differs most from the global fairness.
* :func:`reduction_index`, :func:`multipliers`, :func:`reduction_gamma`,
  :func:`reduction_step`, :func:`reduction_weights` -- the reductions approach of Agarwal et al.
  (2018, "A Reductions Approach to Fair Classification"), as fairlearn's
  ``ExponentiatedGradient`` computes it, made federated: the server keeps the Lagrange
  multipliers, the sites train on the cost-sensitive (relabeled, reweighted) loss they imply.
* :func:`threshold_rules` -- group-specific thresholds with fairlearn's ``ThresholdOptimizer``
  semantics (Hardt, Price and Srebro 2016), from per-group histograms of positive and negative
  labels over a fixed score grid.

What cannot be computed (a group with no rows at any site, a label absent everywhere, a
constraint no threshold can meet) raises :class:`MitigationError` with the reason.

Groups: the public placeholders ``"__missing__"`` and ``"__other__"`` (fedcore.fairness) are
released with zero counts by every site; when they hold no row anywhere they are left out. Any
other group listed in the counts must have rows somewhere: a group declared but never seen
cannot be weighed or given a threshold.
"""

from __future__ import annotations

import math
import numbers
import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from fedcore.fairness import (
    CELLS,
    OTHER_GROUP,
    _checked_counts,
    _discrete_laplace,
    _group_labels,
)
from fedcore.tabular import MISSING_CATEGORY

__all__ = [
    "CONSTRAINTS",
    "LABEL_CELLS",
    "MULTIPLIER_SCHEDULES",
    "OBJECTIVES",
    "ExampleWeights",
    "FairFedStep",
    "GroupRule",
    "MitigationError",
    "ThresholdRules",
    "fairfed_step",
    "label_counts",
    "merge_label_counts",
    "multipliers",
    "noisy_label_counts",
    "noisy_score_histogram",
    "reduction_gains",
    "reduction_gamma",
    "reduction_index",
    "reduction_step",
    "reduction_weights",
    "reweighing_weights",
    "score_histogram",
    "threshold_rules",
    "thresholded_accuracy",
    "thresholded_disparities",
]

CONSTRAINTS: tuple[str, ...] = ("demographic_parity", "equalized_odds")
OBJECTIVES: tuple[str, ...] = ("accuracy_score", "balanced_accuracy_score")
# How a federated constraint's rounds use the multipliers (fairness.mitigation.multipliers):
# the running mean of every round's (averaged), the last with eta / sqrt(t) (decaying), or the
# last with a constant step (last: fairlearn's step, without its averaging over iterates).
MULTIPLIER_SCHEDULES: tuple[str, ...] = ("averaged", "decaying", "last")
# (group, label) counts of rows: label 0 -> "negatives", label 1 -> "positives".
LABEL_CELLS: tuple[str, ...] = ("negatives", "positives")
PLACEHOLDER_GROUPS: frozenset[str] = frozenset({MISSING_CATEGORY, OTHER_GROUP})

LabelCounts = dict[str, dict[str, int]]
Key = tuple[str, str, str]  # (sign "+"/"-", event "all"/"label=0"/"label=1", group)


class MitigationError(ValueError):
    """A mitigation that cannot be computed from the counts it was given.

    ``reason`` is the sentence for the run's fairness report: what is wrong and what to do.
    """

    def __init__(self, reason: str):
        """Args:
        reason: what cannot be computed, why, and what to change.
        """
        self.reason = reason
        super().__init__(reason)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_number(value: object, name: str, *, low: float, high: float | None = None) -> float:
    if not _is_number(value) or value < low or (high is not None and value > high):  # type: ignore[operator]
        span = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number {span}; got {value!r}")
    return float(value)  # type: ignore[arg-type]


# --- (group, label) counts -------------------------------------------------------------------


def label_counts(
    y: ArrayLike, sensitive: ArrayLike, *, groups: Sequence[str] | None = None
) -> LabelCounts:
    """Count a site's rows per (group, label): what reweighing and the reductions need.

    Args:
        y: binary labels 0/1, n values.
        sensitive: the sensitive attribute, n values (labelled as ``fedcore.fairness``).
        groups: optional public group list; every listed group is in the result (zeros where
            absent), and a label outside it is an error.

    Returns:
        ``{group: {"negatives": int, "positives": int}}``, groups sorted.
    """
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    names = _group_labels(sensitive).astype(str)
    if labels.size != names.size:
        raise ValueError(f"y has {labels.size} values but sensitive has {names.size}")
    if not np.isin(labels, (0.0, 1.0)).all():
        raise ValueError("y must hold binary labels 0/1")
    counts: LabelCounts = {}
    for group in np.unique(names):
        mine = labels[names == group]
        counts[str(group)] = {
            "negatives": int((mine == 0).sum()),
            "positives": int((mine == 1).sum()),
        }
    if groups is not None:
        unknown = sorted(set(counts) - {str(g) for g in groups})
        if unknown:
            raise ValueError(f"sensitive holds group(s) {unknown} not in groups {list(groups)}")
        for group in groups:
            counts.setdefault(str(group), {"negatives": 0, "positives": 0})
    return {group: counts[group] for group in sorted(counts)}


def _checked_label_counts(counts: object, where: str) -> LabelCounts:
    if not isinstance(counts, Mapping):
        raise ValueError(
            f"{where}: label counts must be a mapping group -> {{negatives, positives}}"
        )
    checked: LabelCounts = {}
    for group, cells in counts.items():
        if not isinstance(group, str) or not isinstance(cells, Mapping):
            raise ValueError(f"{where}: group {group!r} must map to {{negatives, positives}}")
        if set(cells) != set(LABEL_CELLS):
            raise ValueError(
                f"{where}, group {group!r}: keys must be exactly negatives, positives; "
                f"got {sorted(map(str, cells))}"
            )
        for cell in LABEL_CELLS:
            value = cells[cell]
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(
                    f"{where}, group {group!r}: {cell} = {value!r} is not a non-negative integer"
                )
        checked[group] = {cell: int(cells[cell]) for cell in LABEL_CELLS}
    return checked


def noisy_label_counts(
    counts: Mapping[str, Mapping[str, int]],
    *,
    epsilon: float,
    source: random.Random | None = None,
) -> LabelCounts:
    """A site's (group, label) counts released with pure epsilon-DP (``fairness.dp_epsilon``).

    Every training row falls in exactly one cell (its group x label), so adding or removing a
    row changes one cell by 1 (L1 sensitivity 1, add/remove adjacency): discrete Laplace noise,
    P(z) proportional to exp(-epsilon |z|), added to every cell of every listed group (absent
    groups included, as noisy zeros), then clamped at 0 (post-processing, no extra cost), as
    ``fedcore.fairness.noisy_counts`` releases the confusion counts. One call is one release,
    charged epsilon by the server's ledger.

    Args:
        counts: :func:`label_counts` of the site's training rows, every public group listed.
        epsilon: privacy parameter, > 0.
        source: random source; default ``random.SystemRandom()`` (os.urandom). Tests inject a
            seeded ``random.Random``; never pass a seeded source in production.
    """
    checked = merge_label_counts([counts])
    epsilon = _check_number(epsilon, "epsilon", low=1e-12)
    rng = source if source is not None else random.SystemRandom()
    scale = 1 / Fraction(epsilon)
    return {
        group: {
            cell: max(0, int(cells[cell]) + _discrete_laplace(scale, rng)) for cell in LABEL_CELLS
        }
        for group, cells in checked.items()
    }


def noisy_score_histogram(
    histograms: Mapping[str, Mapping[str, Sequence[int]]],
    *,
    epsilon: float,
    source: random.Random | None = None,
) -> dict[str, dict[str, list[int]]]:
    """A site's per-group score histograms released with pure epsilon-DP (``postprocess`` with
    ``fairness.dp_epsilon``): each held-out row is in exactly one cell (group x label x grid
    point), so a row added or removed changes one cell by 1; discrete Laplace noise at epsilon on
    every cell, clamped at 0, as :func:`noisy_label_counts`. One release, charged epsilon.
    """
    epsilon = _check_number(epsilon, "epsilon", low=1e-12)
    rng = source if source is not None else random.SystemRandom()
    scale = 1 / Fraction(epsilon)
    return {
        str(group): {
            cell: [max(0, int(v) + _discrete_laplace(scale, rng)) for v in cells[cell]]
            for cell in LABEL_CELLS
        }
        for group, cells in histograms.items()
    }


def merge_label_counts(list_of_counts: Sequence[Mapping[str, Mapping[str, int]]]) -> LabelCounts:
    """Sum per-site (group, label) counts exactly; a group absent at a site counts 0 there."""
    merged: LabelCounts = {}
    for index, counts in enumerate(list_of_counts):
        for group, cells in _checked_label_counts(counts, f"site {index}").items():
            total = merged.setdefault(group, {"negatives": 0, "positives": 0})
            for cell in LABEL_CELLS:
                total[cell] += cells[cell]
    return {group: merged[group] for group in sorted(merged)}


def _present(counts: Mapping[str, Mapping[str, int]], what: str) -> dict[str, dict[str, int]]:
    """The groups with rows; placeholders without rows dropped; any other empty group refused."""
    present: dict[str, dict[str, int]] = {}
    for group, cells in sorted(counts.items()):
        if sum(cells.values()) > 0:
            present[group] = dict(cells)
        elif group not in PLACEHOLDER_GROUPS:
            raise MitigationError(
                f"group {group!r} has no rows at any site, so its {what} is undefined; remove it "
                "from the plan's fairness.groups or check the sites' data"
            )
    if not present:
        raise MitigationError(f"the counts hold no row at all: no {what} can be computed")
    return present


# --- the weights a site trains with ------------------------------------------------------------


@dataclass(frozen=True)
class ExampleWeights:
    """Per (group, true label): the label a site trains on and its loss weight.

    Reweighing keeps every label and changes weights; the reductions may also flip a label
    (a negative signed cost). ``cells[group][y] = (label, weight)``.
    """

    cells: dict[str, dict[int, tuple[int, float]]]

    def to_json(self) -> dict[str, dict[str, list[float]]]:
        """``{group: {"0": [label, weight], "1": [label, weight]}}`` (JSON-able)."""
        return {
            group: {str(y): [label, weight] for y, (label, weight) in sorted(cells.items())}
            for group, cells in sorted(self.cells.items())
        }

    @classmethod
    def from_json(cls, raw: Any) -> ExampleWeights:
        """Parse :meth:`to_json`'s form; ValueError naming the bad entry."""
        if not isinstance(raw, Mapping) or not raw:
            raise ValueError("example weights must be a non-empty mapping group -> {0, 1}")
        cells: dict[str, dict[int, tuple[int, float]]] = {}
        for group, entry in raw.items():
            if not isinstance(group, str) or not isinstance(entry, Mapping) or not entry:
                raise ValueError(f"example weights: group {group!r} must map '0'/'1' to pairs")
            cells[group] = {}
            for y, pair in entry.items():
                if y not in ("0", "1"):
                    raise ValueError(
                        f"example weights, group {group!r}: label {y!r} is not '0'/'1'"
                    )
                if (
                    not isinstance(pair, Sequence)
                    or len(pair) != 2
                    or pair[0] not in (0, 1)
                    or isinstance(pair[0], bool)
                    or not _is_number(pair[1])
                    or pair[1] < 0
                ):
                    raise ValueError(
                        f"example weights, group {group!r}, label {y}: expected [label 0/1, "
                        f"weight >= 0]; got {pair!r}"
                    )
                cells[group][int(y)] = (int(pair[0]), float(pair[1]))
        return cls(cells)

    def apply(self, y: ArrayLike, sensitive: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
        """The training labels and per-row weights of a site's rows.

        Args:
            y: the rows' true labels 0/1.
            sensitive: the rows' group labels (as ``fedcore.fairness`` labels them; a value
                outside the table's groups is looked up as ``"__other__"``).

        Returns:
            ``(labels, weights)``, float64 arrays of n values.

        Raises:
            ValueError: a row's (group, label) has no cell in the table.
        """
        truth = np.asarray(y, dtype=np.float64).reshape(-1)
        names = _group_labels(sensitive).astype(str)
        if truth.size != names.size:
            raise ValueError(f"y has {truth.size} values but sensitive has {names.size}")
        names = np.where(np.isin(names, list(self.cells)), names, OTHER_GROUP)
        labels = np.empty(truth.size, dtype=np.float64)
        weights = np.empty(truth.size, dtype=np.float64)
        for group in np.unique(names):
            for label in (0, 1):
                rows = (names == group) & (truth == label)
                if not rows.any():
                    continue
                cell = self.cells.get(str(group), {}).get(label)
                if cell is None:
                    raise ValueError(
                        f"the example weights have no cell for group {str(group)!r}, label "
                        f"{label}, but this site has {int(rows.sum())} such row(s)"
                    )
                labels[rows], weights[rows] = cell
        return labels, weights


def reweighing_weights(counts: Mapping[str, Mapping[str, int]]) -> ExampleWeights:
    """Kamiran and Calders' reweighing from the summed (group, label) counts of the sites.

    w(g, y) = P(g) P(y) / P(g, y) = n_g n_y / (n n_{g,y}): under these weights the label is
    independent of the group (each group's weighted positive rate is the overall one), and the
    total weight is n. Labels are kept.

    Args:
        counts: ``merge_label_counts`` of the sites' training rows.

    The placeholders ``__missing__`` and ``__other__`` (rows whose group a site did not release
    or does not know) are weighed the same way when they hold both labels; holding one label
    only, they keep weight 1 (a small site that withholds a rare category counts its rows under
    ``__other__``, which may then hold positives only).

    Raises:
        MitigationError: a listed group has no row anywhere, a label has no row at all, or a
            group other than the placeholders has no row of one label (its weight would be
            infinite: reweighing cannot give such a group the overall positive rate).
    """
    present = _present(_checked_label_counts(counts, "counts"), "reweighing weight")
    n = sum(sum(cells.values()) for cells in present.values())
    by_label = {cell: sum(cells[cell] for cells in present.values()) for cell in LABEL_CELLS}
    for cell, total in by_label.items():
        if total == 0:
            raise MitigationError(
                f"no training row at any site has a {cell[:-1]} label: reweighing needs both"
            )
    cells: dict[str, dict[int, tuple[int, float]]] = {}
    for group, group_cells in present.items():
        n_group = sum(group_cells.values())
        cells[group] = {}
        one_label = min(group_cells[c] for c in LABEL_CELLS) == 0
        for label, cell in enumerate(LABEL_CELLS):
            if group_cells[cell] == 0 and group in PLACEHOLDER_GROUPS:
                continue  # no row of that label: no cell to weigh
            if one_label and group in PLACEHOLDER_GROUPS:
                # Rows whose group a site did not release (or does not know) and that hold one
                # label only: they cannot be given the overall positive rate, and are not a
                # group the plan can balance; they keep the plain loss.
                cells[group][label] = (label, 1.0)
                continue
            if group_cells[cell] == 0:
                raise MitigationError(
                    f"group {group!r} has no {cell} at any site: reweighing cannot give it the "
                    "overall positive rate (its weight would be infinite); use postprocess or "
                    "check the sites' data"
                )
            weight = (n_group * by_label[cell]) / (n * group_cells[cell])
            cells[group][label] = (label, weight)
    return ExampleWeights(cells)


# --- FairFed -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FairFedStep:
    """One round of FairFed: the new aggregation weights and what they came from."""

    weights: dict[str, float]  # omega_k^t, normalised: the aggregation weights of this round
    raw: dict[str, float]  # omega-bar_k^t before normalisation (the state carried to t+1)
    deltas: dict[str, float]  # Delta_k^t
    global_value: float  # F_g^t
    local_values: dict[str, float | None]  # F_k^t (None: undefined at that site)
    fallback: list[str] = field(default_factory=list)  # sites whose Delta is the accuracy gap


def _rates(cells: Mapping[str, int]) -> tuple[float, float | None, float | None]:
    tp, fp, tn, fn = (cells[c] for c in CELLS)
    n = tp + fp + tn + fn
    return (
        (tp + fp) / n,
        tp / (tp + fn) if tp + fn else None,
        fp / (fp + tn) if fp + tn else None,
    )


def _fairness_value(counts: Mapping[str, Mapping[str, int]], metric: str) -> float | None:
    """F of one table of confusion counts; None when it is undefined there.

    Two groups (the paper's binary attribute): the signed gap of the first group (sorted
    labels) minus the second -- selection rates for demographic parity, true positive rates
    (the paper's equal opportunity difference) for equalized odds. More groups: fairlearn's
    between-groups difference (max - min; for equalized odds the larger of the TPR and FPR
    spreads), which the paper does not define. Undefined when the table lacks a group the
    global counts have, or (equalized odds) a group lacks positives or negatives.
    """
    present = {g: c for g, c in counts.items() if sum(c.values())}
    rates = {g: _rates(c) for g, c in present.items()}
    if metric == "demographic_parity":
        values = [r[0] for r in rates.values()]
        if len(values) == 2:
            return values[0] - values[1]
        return max(values) - min(values)
    tprs = [r[1] for r in rates.values()]
    fprs = [r[2] for r in rates.values()]
    if any(v is None for v in (*tprs, *fprs)):
        return None
    if len(tprs) == 2:
        return float(tprs[0]) - float(tprs[1])  # type: ignore[arg-type]
    return max(max(tprs) - min(tprs), max(fprs) - min(fprs))  # type: ignore[type-var,operator]


def _accuracy(counts: Mapping[str, Mapping[str, int]]) -> float:
    n = sum(sum(c.values()) for c in counts.values())
    return sum(c["tp"] + c["tn"] for c in counts.values()) / n


def fairfed_step(
    counts_by_silo: Mapping[str, Mapping[str, Mapping[str, int]]],
    previous: Mapping[str, float],
    *,
    beta: float,
    metric: str = "demographic_parity",
) -> FairFedStep:
    """FairFed's aggregation weights of round t (Ezzeldin et al., AAAI 2023, Algorithm 1).

    In the paper's notation, with K sites, F_k^t the local fairness metric of the global model
    on site k's data, F_g^t the global one and Acc the accuracy::

        Delta_k^t = |Acc_k^t - Acc_g^t|   if F_k^t is undefined at site k
                    |F_g^t  - F_k^t|      otherwise
        omega-bar_k^t = omega-bar_k^(t-1) - beta (Delta_k^t - (1/K) sum_i Delta_i^t)
        omega_k^t = omega-bar_k^t / sum_i omega-bar_i^t

    with omega-bar_k^0 = n_k / n (FedAvg's weights: pass them as ``previous`` in round 1). The
    global model is then sum_k omega_k^t theta_k^t. F_g^t comes from the sum of the sites'
    counts, so it equals the metric on the pooled rows. beta = 0 is FedAvg.

    One safeguard the paper does not state: a weight the update drives below 0 is set to 0
    (a negative weight would extrapolate away from that site's model); if every weight is 0 the
    step is refused.

    Args:
        counts_by_silo: each participating site's ``{group: {tp, fp, tn, fn}}`` of the current
            global model (this round's participants, K of them).
        previous: omega-bar_k^(t-1) for every participating site (n_k / n in round 1).
        beta: the fairness budget, >= 0.
        metric: ``"demographic_parity"`` or ``"equalized_odds"`` (see :func:`_fairness_value`).

    Raises:
        MitigationError: no counts at all, a site without a previous weight, a site with no
            rows, the global metric undefined, or every weight driven to 0.
        ValueError: malformed counts or arguments.
    """
    beta = _check_number(beta, "beta", low=0.0)
    if metric not in CONSTRAINTS:
        raise ValueError(f"metric must be one of {', '.join(CONSTRAINTS)}; got {metric!r}")
    checked = {
        silo: _checked_counts(counts, f"silo {silo!r}") for silo, counts in counts_by_silo.items()
    }
    if not checked:
        raise MitigationError("FairFed needs the counts of at least one site; none arrived")
    missing = sorted(set(checked) - set(previous))
    if missing:
        raise MitigationError(f"FairFed has no previous weight for site(s) {missing}")
    totals: dict[str, dict[str, int]] = {}
    for counts in checked.values():
        for group, cells in counts.items():
            total = totals.setdefault(group, dict.fromkeys(CELLS, 0))
            for cell in CELLS:
                total[cell] += cells[cell]
    pooled = _present(totals, "fairness metric")
    global_value = _fairness_value(pooled, metric)
    if global_value is None:
        raise MitigationError(
            "the global equalized odds of the pooled counts is undefined: a group has no "
            "positive or no negative label at any site"
        )
    global_accuracy = _accuracy(pooled)
    deltas: dict[str, float] = {}
    local_values: dict[str, float | None] = {}
    fallback: list[str] = []
    for silo, counts in checked.items():
        if not any(sum(c.values()) for c in counts.values()):
            raise MitigationError(f"site {silo!r} sent counts with no row: FairFed needs its F_k")
        local = {g: counts.get(g, dict.fromkeys(CELLS, 0)) for g in pooled}
        value = None
        if all(sum(c.values()) for c in local.values()):
            value = _fairness_value(local, metric)
        local_values[silo] = value
        if value is None:
            fallback.append(silo)
            deltas[silo] = abs(_accuracy(local) - global_accuracy)
        else:
            deltas[silo] = abs(global_value - value)
    mean_delta = sum(deltas.values()) / len(deltas)
    raw = {
        silo: max(0.0, float(previous[silo]) - beta * (deltas[silo] - mean_delta))
        for silo in checked
    }
    total = sum(raw.values())
    if total <= 0.0:
        raise MitigationError(
            f"FairFed drove every aggregation weight to 0 (beta = {beta}); lower beta"
        )
    return FairFedStep(
        weights={silo: value / total for silo, value in raw.items()},
        raw=raw,
        deltas=deltas,
        global_value=global_value,
        local_values=local_values,
        fallback=sorted(fallback),
    )


# --- federated reductions (Agarwal et al. 2018) -------------------------------------------------


def _event(constraint: str, label: int) -> str:
    return "all" if constraint == "demographic_parity" else f"label={label}"


def _check_constraint(constraint: str) -> None:
    if constraint not in CONSTRAINTS:
        raise ValueError(f"constraint must be one of {', '.join(CONSTRAINTS)}; got {constraint!r}")


def _event_probabilities(
    counts: Mapping[str, Mapping[str, int]], constraint: str
) -> tuple[int, dict[str, float], dict[tuple[str, str], float], dict[str, dict[str, int]]]:
    """n, P(event), P(event, group) over the pairs with rows (fairlearn's ``prob_*``)."""
    present = _present(_checked_label_counts(counts, "counts"), "constraint")
    n = sum(sum(cells.values()) for cells in present.values())
    event_rows: dict[str, int] = {}
    pair_rows: dict[tuple[str, str], int] = {}
    for group, cells in present.items():
        for label, cell in enumerate(LABEL_CELLS):
            if cells[cell] == 0:
                continue
            event = _event(constraint, label)
            event_rows[event] = event_rows.get(event, 0) + cells[cell]
            pair_rows[(event, group)] = pair_rows.get((event, group), 0) + cells[cell]
    return (
        n,
        {event: rows / n for event, rows in event_rows.items()},
        {pair: rows / n for pair, rows in pair_rows.items()},
        present,
    )


def reduction_index(counts: Mapping[str, Mapping[str, int]], constraint: str) -> list[Key]:
    """The constraints (sign, event, group) of a moment, in fairlearn's index order.

    One pair of multipliers ("+", "-") per (event, group) with rows: event ``"all"`` for
    demographic parity, ``"label=0"``/``"label=1"`` for equalized odds.

    Args:
        counts: ``merge_label_counts`` of the sites' training rows.
        constraint: ``"demographic_parity"`` or ``"equalized_odds"``.
    """
    _check_constraint(constraint)
    _, _, pairs, _ = _event_probabilities(counts, constraint)
    ordered = sorted(pairs)
    return [(sign, event, group) for sign in ("+", "-") for event, group in ordered]


def multipliers(theta: Mapping[Key, float], bound: float) -> dict[Key, float]:
    """The Lagrange multipliers lambda = B exp(theta) / (1 + sum exp(theta)), B = 1 / bound.

    As fairlearn's ExponentiatedGradient: lambda >= 0 and ||lambda||_1 <= B.
    """
    bound = _check_number(bound, "bound", low=1e-12, high=1.0)
    big_b = 1.0 / bound
    exps = {key: math.exp(value) for key, value in theta.items()}
    denominator = 1.0 + sum(exps.values())
    return {key: big_b * value / denominator for key, value in exps.items()}


def reduction_gamma(counts: Mapping[str, Mapping[str, int]], constraint: str) -> dict[Key, float]:
    """The constraint violations gamma(h) from per-group confusion counts of h's predictions.

    gamma(+, e, g) = P(h = 1 | event e, group g) - P(h = 1 | event e) and gamma(-, e, g) its
    negation (fairlearn's ``UtilityParity.gamma``), over the (event, group) pairs with rows.
    Computed on the training rows of the sites, summed, so it equals fairlearn on the pooled
    training rows.

    Args:
        counts: merged ``{group: {tp, fp, tn, fn}}`` of the global model's hard predictions.
        constraint: ``"demographic_parity"`` or ``"equalized_odds"``.
    """
    _check_constraint(constraint)
    checked = _present(_checked_counts(counts, "counts"), "constraint")
    selected: dict[tuple[str, str], list[int]] = {}  # (event, group) -> [predicted 1, rows]
    for group, cells in checked.items():
        for label, positive, rows in (
            (0, cells["fp"], cells["fp"] + cells["tn"]),
            (1, cells["tp"], cells["tp"] + cells["fn"]),
        ):
            if rows == 0:
                continue
            entry = selected.setdefault((_event(constraint, label), group), [0, 0])
            entry[0] += positive
            entry[1] += rows
    by_event: dict[str, list[int]] = {}
    for (event, _), (positive, rows) in selected.items():
        entry = by_event.setdefault(event, [0, 0])
        entry[0] += positive
        entry[1] += rows
    gamma: dict[Key, float] = {}
    for sign in ("+", "-"):
        for (event, group), (positive, rows) in sorted(selected.items()):
            gap = positive / rows - by_event[event][0] / by_event[event][1]
            gamma[(sign, event, group)] = gap if sign == "+" else -gap
    return gamma


def reduction_step(
    theta: Mapping[Key, float],
    gamma: Mapping[Key, float],
    *,
    bound: float,
    eta: float,
    gains: Mapping[Key, float] | None = None,
) -> dict[Key, float]:
    """The server's multiplier update: theta + gain (eta / B) (gamma - bound), B = 1 / bound.

    fairlearn's ExponentiatedGradient step (``theta += eta * (gamma - eps)`` with
    ``eta = eta0 / B``), once per round, with the gamma of the round's global model. A key of
    gamma missing from theta starts at 0.

    Args:
        theta: the multipliers' logits so far ({} in round 1).
        gamma: :func:`reduction_gamma` of the current global model.
        bound: the constraint's bound epsilon, in (0, 1].
        eta: fairlearn's eta0 (default there 2.0), > 0.
        gains: a factor per key (:func:`reduction_gains`; None: 1 for every key, fairlearn's).
    """
    bound = _check_number(bound, "bound", low=1e-12, high=1.0)
    eta = _check_number(eta, "eta", low=1e-12)
    step = eta * bound
    return {
        key: float(theta.get(key, 0.0))
        + step * (1.0 if gains is None else float(gains.get(key, 1.0))) * (value - bound)
        for key, value in gamma.items()
    }


def reduction_gains(counts: Mapping[str, Mapping[str, int]], constraint: str) -> dict[Key, float]:
    """Per-key step factors of the federated update: n(e, g) / max over g' of n(e, g').

    A multiplier of (event e, group g) moves a row's cost by lambda (1 / P(e) - 1 / P(e, g)):
    the smaller the group, the larger the move for the same change of lambda (a group of 3 %
    of the rows: about 30 times the largest group's). fairlearn's ExponentiatedGradient absorbs
    those swings by returning the average of every iteration's classifier; a federated run
    keeps one model, warm-started each round, which follows the latest costs, so a small group
    would flip its whole cell's label from one round to the next. Scaling each key's step by
    its group's size (the largest group of the event keeps fairlearn's step) makes a change of
    gamma move every group's cost by about as much. The fixed point is unchanged (the steps
    stop when gamma is within the bound).

    Args:
        counts: ``merge_label_counts`` of the sites' training rows.
        constraint: ``"demographic_parity"`` or ``"equalized_odds"``.
    """
    _check_constraint(constraint)
    _, _, pairs, _ = _event_probabilities(counts, constraint)
    largest: dict[str, float] = {}
    for (event, _), share in pairs.items():
        largest[event] = max(largest.get(event, 0.0), share)
    return {
        (sign, event, group): share / largest[event]
        for sign in ("+", "-")
        for (event, group), share in sorted(pairs.items())
    }


def reduction_weights(
    lambdas: Mapping[Key, float],
    counts: Mapping[str, Mapping[str, int]],
    constraint: str,
) -> ExampleWeights:
    """The cost-sensitive problem of the multipliers: each (group, label)'s label and weight.

    As fairlearn's ``_Lagrangian._call_oracle`` with the error rate as objective: the signed
    weight of a row is (2y - 1) + sum_k lambda_k U_k, where for a row of event e and group a::

        U(+, e, g) = [e_row = e] / P(e) - [e_row = e, a = g] / P(e, g),   U(-, .) = -U(+, .)

    It depends only on the row's (group, label), so the server computes one per cell from the
    summed (group, label) counts and sends the table. The site trains on label 1 where the
    signed weight is > 0 (else 0) with weight |signed weight|, scaled so that the weights sum
    to n (fairlearn's ``redY``, ``redW``).

    Args:
        lambdas: :func:`multipliers` of the current theta ({} or zeros: plain error rate).
        counts: ``merge_label_counts`` of the sites' training rows.
        constraint: ``"demographic_parity"`` or ``"equalized_odds"``.

    Raises:
        MitigationError: a listed group has no row anywhere, or every signed weight is 0.
    """
    _check_constraint(constraint)
    n, p_event, p_pair, present = _event_probabilities(counts, constraint)
    signed: dict[tuple[str, int], float] = {}
    for group, cells in present.items():
        for label, cell in enumerate(LABEL_CELLS):
            if cells[cell] == 0:
                continue
            event = _event(constraint, label)
            dot = 0.0
            for (sign, key_event, key_group), value in lambdas.items():
                if key_event != event:
                    continue
                u = 1.0 / p_event[event] - (
                    1.0 / p_pair[(event, group)] if key_group == group else 0.0
                )
                dot += value * (u if sign == "+" else -u)
            signed[(group, label)] = (2 * label - 1) + dot
    total = sum(
        abs(value) * present[group][LABEL_CELLS[label]] for (group, label), value in signed.items()
    )
    if total == 0.0:
        raise MitigationError("every signed weight is 0: the multipliers cancel the error rate")
    cells: dict[str, dict[int, tuple[int, float]]] = {}
    for (group, label), value in signed.items():
        cells.setdefault(group, {})[label] = (int(value > 0), n * abs(value) / total)
    return ExampleWeights(cells)


# --- group thresholds (ThresholdOptimizer) ----------------------------------------------------


def score_histogram(
    scores: ArrayLike,
    y: ArrayLike,
    sensitive: ArrayLike,
    grid: ArrayLike,
    *,
    groups: Sequence[str] | None = None,
) -> dict[str, dict[str, list[int]]]:
    """A site's counts of negative and positive labels per score bin per group.

    Each score is put on the grid point nearest to it (ties go up); the thresholds of
    :func:`threshold_rules` then apply to the binned score (:meth:`ThresholdRules.positive_probability`
    bins the same way), so what the server optimises is exactly what the model decides.

    Returns:
        ``{group: {"negatives": [count per grid point], "positives": [...]}}``, groups sorted.
    """
    points = _checked_grid(grid)
    index = _bin_index(scores, points)
    labels = np.asarray(y, dtype=np.float64).reshape(-1)
    names = _group_labels(sensitive).astype(str)
    if not index.size == labels.size == names.size:
        raise ValueError("scores, y and sensitive must have one value per row")
    listed = sorted(set(names) | set(map(str, groups or ())))
    if groups is not None and set(names) - set(map(str, groups)):
        raise ValueError(f"sensitive holds groups not in {list(groups)}")
    out: dict[str, dict[str, list[int]]] = {}
    for group in listed:
        mine = names == group
        out[group] = {
            cell: np.bincount(index[mine & (labels == label)], minlength=points.size).tolist()
            for label, cell in enumerate(LABEL_CELLS)
        }
    return out


def _checked_grid(grid: ArrayLike) -> np.ndarray:
    points = np.asarray(grid, dtype=np.float64).reshape(-1)
    if points.size < 2 or not np.isfinite(points).all() or not (np.diff(points) > 0).all():
        raise ValueError("the score grid must hold >= 2 finite, strictly increasing values")
    return points


def _bin_index(scores: ArrayLike, points: np.ndarray) -> np.ndarray:
    values = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not np.isfinite(values).all():
        raise ValueError("scores must be finite")
    upper = np.clip(np.searchsorted(points, values, side="left"), 1, points.size - 1)
    lower = upper - 1
    nearer_upper = (points[upper] - values) <= (values - points[lower])
    return np.where(nearer_upper, upper, lower).astype(np.int64)


@dataclass(frozen=True)
class GroupRule:
    """One group's randomised threshold rule, as fairlearn's interpolated thresholder.

    P(positive | binned score s) = p0 [s > threshold0] + p1 [s > threshold1], then mixed with a
    constant for equalized odds: p_ignore * constant + (1 - p_ignore) * that. Thresholds are
    midpoints between grid points (or +/-inf: never / always positive).
    """

    threshold0: float
    p0: float
    threshold1: float
    p1: float
    p_ignore: float = 0.0
    constant: float = 0.0

    def positive_probability(self, binned: np.ndarray) -> np.ndarray:
        """P(prediction 1) of binned scores."""
        base = self.p0 * (binned > self.threshold0) + self.p1 * (binned > self.threshold1)
        if self.p_ignore:
            return self.p_ignore * self.constant + (1 - self.p_ignore) * base
        return np.asarray(base, dtype=np.float64)

    def to_json(self) -> dict[str, Any]:
        """JSON-able, infinite thresholds as "inf"/"-inf"."""

        def number(value: float) -> float | str:
            return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")

        return {
            "threshold0": number(self.threshold0),
            "p0": self.p0,
            "threshold1": number(self.threshold1),
            "p1": self.p1,
            "p_ignore": self.p_ignore,
            "constant": self.constant,
        }


@dataclass(frozen=True)
class ThresholdRules:
    """Group-specific thresholds chosen from per-group ROC counts (fairlearn semantics)."""

    constraint: str
    objective: str
    grid: tuple[float, ...]
    rules: dict[str, GroupRule]
    best_x: float  # the common selection rate (demographic parity) or FPR (equalized odds)
    best_objective: float

    def positive_probability(self, scores: ArrayLike, sensitive: ArrayLike) -> np.ndarray:
        """P(prediction 1) per row: scores binned to the grid, the row's group's rule.

        A group without a rule (no held-out row anywhere when the thresholds were chosen) gets
        probability 0, as fairlearn's thresholder does for an unseen group.
        """
        points = np.asarray(self.grid, dtype=np.float64)
        binned = points[_bin_index(scores, points)]
        names = _group_labels(sensitive).astype(str)
        out = np.zeros(binned.size, dtype=np.float64)
        for group, rule in self.rules.items():
            rows = names == group
            out[rows] = rule.positive_probability(binned[rows])
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> ThresholdRules:
        """Parse :meth:`to_json`'s form (a model version's ``thresholds``); ValueError naming
        the bad entry."""
        try:
            rules = {
                str(group): GroupRule(**{k: float(v) for k, v in rule.items()})
                for group, rule in raw["rules"].items()
            }
            return cls(
                constraint=str(raw["constraint"]),
                objective=str(raw["objective"]),
                grid=tuple(float(v) for v in _checked_grid(raw["grid"])),
                rules=rules,
                best_x=float(raw["best_x"]),
                best_objective=float(raw["best_objective"]),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"threshold rules: missing or malformed entry ({exc})") from None

    def to_json(self) -> dict[str, Any]:
        """What becomes part of the model version (JSON-able)."""
        return {
            "constraint": self.constraint,
            "objective": self.objective,
            "grid": list(self.grid),
            "best_x": self.best_x,
            "best_objective": self.best_objective,
            "rules": {group: rule.to_json() for group, rule in sorted(self.rules.items())},
        }


_X_METRIC = {
    "selection_rate": lambda tp, fp, tn, fn: (tp + fp) / (tp + fp + tn + fn),
    "false_positive_rate": lambda tp, fp, tn, fn: fp / (tn + fp),
}
_Y_METRIC = {
    "accuracy_score": lambda tp, fp, tn, fn: (tp + tn) / (tp + tn + fp + fn),
    "balanced_accuracy_score": lambda tp, fp, tn, fn: 0.5 * tp / (tp + fn) + 0.5 * tn / (tn + fp),
    "true_positive_rate": lambda tp, fp, tn, fn: tp / (tp + fn),
}


def _hull(
    points: np.ndarray,
    negatives: Sequence[int],
    positives: Sequence[int],
    group: str,
    x_metric: str,
    y_metric: str,
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """The upper convex hull of a group's (x, y) trade-off over every threshold '>'.

    fairlearn's ``_calculate_tradeoff_points`` (flip=False) walked over the group's distinct
    scores in decreasing order -- here the grid points where the group has rows -- then
    ``_filter_points_to_get_convex_hull`` (Andrew's monotone chain, upper part).
    """
    n_negative, n_positive = int(sum(negatives)), int(sum(positives))
    if n_positive == 0 or n_negative == 0:
        which = "positive" if n_positive == 0 else "negative"
        raise MitigationError(
            f"group {group!r} has no {which} label in the held-out rows of any site: its ROC "
            "curve (and so its threshold) is undefined; ThresholdOptimizer needs both labels "
            "in every group"
        )
    occupied = [i for i in range(points.size - 1, -1, -1) if negatives[i] + positives[i]]
    scores = [float(points[i]) for i in occupied] + [-math.inf]
    fx, fy = _X_METRIC[x_metric], _Y_METRIC[y_metric]
    xs: list[float] = []
    ys: list[float] = []
    thresholds: list[float] = []
    false_pos = true_pos = 0
    for k in range(len(occupied) + 1):
        if k == 0:
            threshold = math.inf
        else:
            i = occupied[k - 1]
            false_pos += int(negatives[i])
            true_pos += int(positives[i])
            threshold = (scores[k - 1] + scores[k]) / 2
        tp, fp = true_pos, false_pos
        tn, fn = n_negative - false_pos, n_positive - true_pos
        xs.append(fx(tp, fp, tn, fn))
        ys.append(fy(tp, fp, tn, fn))
        thresholds.append(threshold)
    order = sorted(range(len(xs)), key=lambda j: (xs[j], ys[j]))  # fairlearn sorts by (x, y)
    kept: list[int] = []
    for j in order:
        while len(kept) >= 2:
            a, b = kept[-2], kept[-1]
            if (ys[b] - ys[a]) * (xs[j] - xs[a]) <= (ys[j] - ys[a]) * (xs[b] - xs[a]):
                kept.pop()
            else:
                break
        kept.append(j)
    return (
        np.array([xs[j] for j in kept]),
        np.array([ys[j] for j in kept]),
        [thresholds[j] for j in kept],
    )


def _interpolate(
    x_values: np.ndarray, y_values: np.ndarray, x_grid: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """fairlearn's ``_interpolate_curve``: y, p0, p1 and the left hull index at every grid x."""
    indices = np.searchsorted(x_values, x_grid, side="right") - 1
    indices[1:] = np.where(x_grid[1:] == x_values[indices[1:]], indices[1:] - 1, indices[1:])
    if (indices < 0).any() or (indices + 1 >= x_values.size).any():
        raise MitigationError(
            "a group's ROC hull does not span the constraint's range; this cannot happen with "
            "both labels present -- check the histogram counts"
        )
    after = x_values[indices + 1] - x_grid
    between = x_values[indices + 1] - x_values[indices]
    p0 = after / between
    p1 = 1 - p0
    y = p0 * y_values[indices] + p1 * y_values[indices + 1]
    return y, p0, p1, indices


def threshold_rules(
    histograms: Mapping[str, Mapping[str, Sequence[int]]],
    grid: ArrayLike,
    *,
    constraint: str = "demographic_parity",
    objective: str = "accuracy_score",
    grid_size: int = 1000,
) -> ThresholdRules:
    """Group thresholds as fairlearn's ThresholdOptimizer (flip=False, tol=None) chooses them.

    From the summed per-group histograms of negative and positive labels over the score grid
    (the held-out rows of every site), the same trade-off curves, hulls, interpolation on
    ``linspace(0, 1, grid_size + 1)`` and arg-max as fairlearn's ThresholdOptimizer fitted on
    the pooled rows whose scores lie on the grid; so the rules and the probabilities of a
    positive decision equal fairlearn's. As in fairlearn a group's rule may randomise between
    two thresholds (p0, p1), and for equalized odds mix with a constant (p_ignore).

    Args:
        histograms: merged ``{group: {"negatives": [...], "positives": [...]}}``, one count per
            grid point (:func:`score_histogram`, summed over the sites).
        grid: the score grid, strictly increasing.
        constraint: ``"demographic_parity"`` (equal selection rates) or ``"equalized_odds"``.
        objective: ``"accuracy_score"`` or ``"balanced_accuracy_score"``.
        grid_size: fairlearn's ``grid_size`` (points of the constraint's grid, minus one).

    Raises:
        MitigationError: a listed group has no row anywhere, or has no positive or no negative
            label (no ROC curve: no threshold can meet the constraint for it).
        ValueError: malformed histograms or arguments.
    """
    _check_constraint(constraint)
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}; got {objective!r}")
    if isinstance(grid_size, bool) or not isinstance(grid_size, int) or grid_size < 1:
        raise ValueError(f"grid_size must be an integer >= 1; got {grid_size!r}")
    points = _checked_grid(grid)
    totals: dict[str, dict[str, int]] = {}
    for group, cells in histograms.items():
        if not isinstance(cells, Mapping) or set(cells) != set(LABEL_CELLS):
            raise ValueError(f"group {group!r}: expected {{negatives, positives}} per grid point")
        for cell in LABEL_CELLS:
            column = cells[cell]
            if len(column) != points.size or any(
                isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0 for v in column
            ):
                raise ValueError(
                    f"group {group!r}: {cell} must hold {points.size} non-negative integer counts"
                )
        totals[str(group)] = {cell: int(sum(cells[cell])) for cell in LABEL_CELLS}
    present = _present(totals, "threshold")
    x_grid = np.linspace(0, 1, grid_size + 1)
    n = sum(sum(c.values()) for c in present.values())
    curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[float]]] = {}
    x_metric = "selection_rate" if constraint == "demographic_parity" else "false_positive_rate"
    y_metric = objective if constraint == "demographic_parity" else "true_positive_rate"
    for group in present:
        cells = histograms[group]
        xs, ys, thresholds = _hull(
            points, cells["negatives"], cells["positives"], group, x_metric, y_metric
        )
        y, p0, p1, indices = _interpolate(xs, ys, x_grid)
        curves[group] = (y, p0, p1, indices, thresholds)

    rules: dict[str, GroupRule] = {}
    if constraint == "demographic_parity":
        # fairlearn weighs each group's curve by its share and sums with pandas.
        overall = pd.concat(
            [(sum(present[g].values()) / n) * pd.Series(curves[g][0], name="y") for g in present],
            axis=1,
        ).sum(axis=1)
        best = int(overall.idxmax())
        best_objective = float(overall[best])
        for group, (_, p0, p1, indices, thresholds) in curves.items():
            i = indices[best]
            rules[group] = GroupRule(
                thresholds[i], float(p0[best]), thresholds[i + 1], float(p1[best])
            )
    else:
        n_positive = sum(c["positives"] for c in present.values())
        n_negative = n - n_positive
        y_values = pd.DataFrame({g: curves[g][0] for g in present})
        y_min = np.amin(y_values, axis=1)
        tp = n_positive * y_min
        fp = n_negative * x_grid
        tn = n_negative * (1.0 - x_grid)
        fn = n_positive * (1.0 - y_min)
        values = np.around(np.asarray(_Y_METRIC[objective](tp, fp, tn, fn)), 15)
        best = int(pd.Series(values).idxmax())
        best_objective = float(values[best])
        y_best = float(y_min[best])
        for group, (y, p0, p1, indices, thresholds) in curves.items():
            i = indices[best]
            x_here, y_here = float(x_grid[best]), float(y[best])
            p_ignore = 0.0 if y_here == x_here else (y_here - y_best) / (y_here - x_here)
            rules[group] = GroupRule(
                thresholds[i],
                float(p0[best]),
                thresholds[i + 1],
                float(p1[best]),
                p_ignore=float(p_ignore),
                constant=float(x_grid[best]),
            )
    return ThresholdRules(
        constraint=constraint,
        objective=objective,
        grid=tuple(float(p) for p in points),
        rules=rules,
        best_x=float(x_grid[best]),
        best_objective=best_objective,
    )


def _decided_cells(
    rules: Mapping[str, Mapping[str, Any]],
    histograms: Mapping[str, Mapping[str, Sequence[int]]],
    grid: ArrayLike,
) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Per group with rows: P(decision = 1) at each grid point under its rule, and its
    positive and negative counts per grid point (float64).

    Raises:
        ValueError: a group with rows has no rule.
    """
    points = _checked_grid(grid)
    for group, cells in histograms.items():
        negatives = np.asarray(cells["negatives"], dtype=np.float64)
        positives = np.asarray(cells["positives"], dtype=np.float64)
        if negatives.sum() + positives.sum() == 0:
            continue
        raw = rules.get(group)
        if raw is None:
            raise ValueError(f"group {group!r} has rows but no threshold rule")
        rule = GroupRule(**{k: float(v) for k, v in raw.items()})
        yield group, rule.positive_probability(points), positives, negatives


def thresholded_disparities(
    rules: Mapping[str, Mapping[str, Any]],
    histograms: Mapping[str, Mapping[str, Sequence[int]]],
    grid: ArrayLike,
) -> dict[str, float]:
    """The disparities of the decisions of group thresholds on the rows of the histograms.

    Each row decides positive with its group's rule's probability at its bin (expected over the
    rules' randomisation), so the rates are exact expectations: the selection rate, true and
    false positive rate per group, then fairlearn's differences (largest minus smallest over the
    groups with rows; equalized odds: the larger of the TPR and FPR differences).

    Args:
        rules: ``ThresholdRules.to_json()["rules"]`` (group -> rule; "inf"/"-inf" allowed).
        histograms: summed :func:`score_histogram` counts on ``grid``.
        grid: the score grid of the rules and histograms (``ThresholdRules.to_json()["grid"]``).

    Raises:
        ValueError: a group with rows has no rule.
    """
    rates: dict[str, tuple[float, float | None, float | None]] = {}
    for group, p, positives, negatives in _decided_cells(rules, histograms, grid):
        n = negatives.sum() + positives.sum()
        chosen_pos, chosen_neg = float(p @ positives), float(p @ negatives)
        rates[group] = (
            (chosen_pos + chosen_neg) / n,
            chosen_pos / positives.sum() if positives.sum() else None,
            chosen_neg / negatives.sum() if negatives.sum() else None,
        )

    def spread(values: list[float | None]) -> float:
        known = [v for v in values if v is not None]
        return max(known) - min(known) if known else 0.0

    selection = spread([r[0] for r in rates.values()])
    tpr = spread([r[1] for r in rates.values()])
    fpr = spread([r[2] for r in rates.values()])
    return {"demographic_parity_difference": selection, "equalized_odds_difference": max(tpr, fpr)}


def thresholded_accuracy(
    rules: Mapping[str, Mapping[str, Any]],
    histograms: Mapping[str, Mapping[str, Sequence[int]]],
    grid: ArrayLike,
) -> float | None:
    """The accuracy of the decisions of group thresholds on the rows of the histograms (expected
    over the rules' randomisation, as :func:`thresholded_disparities`); None without rows.

    Raises:
        ValueError: a group with rows has no rule.
    """
    correct = total = 0.0
    for _, p, positives, negatives in _decided_cells(rules, histograms, grid):
        correct += float(p @ positives) + float((1.0 - p) @ negatives)
        total += float(negatives.sum() + positives.sum())
    return correct / total if total else None
