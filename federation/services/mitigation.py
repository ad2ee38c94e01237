"""The server's side of a run's bias mitigation (docs/fairness.md, "Mitigation").

``reweighing``: each site sends, with its statistics, the rows of its training split per
(group of the plan's sensitive attribute, label) (:func:`checked_label_counts`); when the
preprocessing is fitted, :func:`compute` sums them, maps every group outside the attribute's
public list to ``__other__``, and computes Kamiran and Calders' weights
(``fedcore.fairness_mitigation.reweighing_weights``). They are stored on the run and sent with
every task, covered by its signed grant (``example_weights_sha256``); sites weight their loss.
A mitigation that cannot be computed (a group with no row at any site, a label missing) fails
the run before round 1 with the reason, never trains as if unmitigated.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore import fairness, fairness_mitigation, tabular
from fedcore.plan import is_evaluation_plan, parse_plan
from federation.models import Run, SiloStatistics

REWEIGHING = "reweighing"
POSTPROCESS = "postprocess"


def plan_kind(spec: Mapping[str, Any]) -> str:
    """The plan's ``fairness.mitigation`` kind (``none`` without one)."""
    if is_evaluation_plan(spec):  # it trains nothing: the plan language refuses a mitigation
        return "none"
    settings = parse_plan(spec).fairness
    return settings.mitigation.kind if settings is not None else "none"


def _releasable(spec: Mapping[str, Any], stats: Mapping[str, Any]) -> set[str]:
    """The group labels a site may send for the plan's attribute: those it already released."""
    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    column = next((c for c in plan.schema.columns if c.name == attribute), None)
    labels = {tabular.MISSING_CATEGORY, fairness.OTHER_GROUP}
    if column is not None and column.type == "boolean":
        return labels | {"false", "true"}
    if column is not None and column.type == "categorical":
        return labels | {str(v) for v in (stats.get("categories") or {}).get(attribute) or ()}
    return labels | {str(v) for v in plan.fairness.groups.get(attribute) or ()}


def checked_label_counts(
    run: Run, raw: Any, stats: Mapping[str, Any], where: str
) -> dict[str, dict[str, int]] | None:
    """A site's label counts as stored, or ValueError naming what is wrong: counts from a plan
    that does not reweigh, none from one that does, a malformed table, a group the site did not
    release in its statistics, or more rows than the site reported."""
    kind = plan_kind(run.version.spec)
    if kind != REWEIGHING:
        if raw is not None:
            raise ValueError(
                f"{where}: label_counts sent, but the plan's fairness.mitigation kind is {kind!r}"
            )
        return None
    if raw is None:
        raise ValueError(
            f"{where}: the plan reweighs (fairness.mitigation kind 'reweighing') but no "
            "label_counts came with the statistics; update the agent"
        )
    counts = fairness_mitigation.merge_label_counts([raw])
    unknown = sorted(set(counts) - _releasable(run.version.spec, stats))
    if unknown:
        raise ValueError(
            f"{where}: label_counts name group(s) {unknown[:5]} that the site's statistics did "
            "not release; only released categories, __missing__ and __other__ may be sent"
        )
    total = sum(sum(cells.values()) for cells in counts.values())
    rows = stats.get("n_rows")
    if isinstance(rows, int) and total > rows:
        raise ValueError(f"{where}: label_counts hold {total} rows, the statistics {rows}")
    return counts


def compute(run: Run, fitted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's mitigation from its silos' statistics (in the orchestrator's transaction),
    None for a plan without one this server computes before round 1.

    Raises:
        fairness_mitigation.MitigationError: the weights cannot be computed (its reason).
    """
    spec = run.version.spec
    if plan_kind(spec) != REWEIGHING:
        return None
    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    public = set(
        fairness.public_groups(plan.schema, fitted, plan.fairness.groups).get(attribute) or ()
    )
    rows = SiloStatistics.objects.filter(run=run).order_by("silo_id")
    merged = fairness_mitigation.merge_label_counts([r.label_counts or {} for r in rows])
    keyed: dict[str, dict[str, int]] = {}
    for group, cells in merged.items():  # a category the merge did not keep counts as other
        target = group if group in public else fairness.OTHER_GROUP
        total = keyed.setdefault(target, {"negatives": 0, "positives": 0})
        for cell, value in cells.items():
            total[cell] += value
    for group in public:  # every public group listed: an empty one is the maths' to judge
        keyed.setdefault(group, {"negatives": 0, "positives": 0})
    counts = {group: keyed[group] for group in sorted(keyed)}
    weights = fairness_mitigation.reweighing_weights(counts)
    return {
        "kind": REWEIGHING,
        "attribute": attribute,
        "counts": counts,
        "example_weights": weights.to_json(),
    }


def example_weights(run: Run) -> dict[str, Any] | None:
    """What a task of this run carries as ``example_weights`` (None: nothing)."""
    mitigation = run.mitigation if isinstance(run.mitigation, Mapping) else None
    return mitigation.get("example_weights") if mitigation else None


def checked_score_histograms(
    run: Run, raw: Any, n: int, where: str
) -> dict[str, dict[str, list[int]]] | None:
    """A site's per-group score histograms of the final model as stored (``postprocess``), or
    ValueError naming what is wrong: histograms from a plan that does not postprocess, none from
    one that does, a group outside the attribute's public list, a column of the wrong length or
    with a count that is not a non-negative integer, or a total other than the site's held-out
    rows (``n``)."""
    spec = run.version.spec
    kind = plan_kind(spec)
    if kind != POSTPROCESS:
        if raw is not None:
            raise ValueError(
                f"{where}: score_histograms sent, but the plan's fairness.mitigation kind is "
                f"{kind!r}"
            )
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(
            f"{where}: the plan postprocesses (fairness.mitigation kind 'postprocess') but no "
            "score_histograms came with the evaluation; update the agent"
        )
    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    public = fairness.public_groups(plan.schema, run.preprocessing, plan.fairness.groups)[attribute]
    size = plan.fairness.mitigation.score_bins + 1
    unknown = sorted(str(g) for g in raw if g not in public)
    if unknown:
        raise ValueError(f"{where}: score_histograms name group(s) {unknown[:5]} not in {public}")
    checked: dict[str, dict[str, list[int]]] = {}
    total = 0
    for group, cells in raw.items():
        if not isinstance(cells, Mapping) or set(cells) != set(fairness_mitigation.LABEL_CELLS):
            raise ValueError(f"{where}: group {group!r} must map negatives and positives")
        checked[group] = {}
        for cell in fairness_mitigation.LABEL_CELLS:
            column = cells[cell]
            if (
                not isinstance(column, list)
                or len(column) != size
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in column)
            ):
                raise ValueError(
                    f"{where}: group {group!r}: {cell} must hold {size} non-negative integer "
                    "counts (one per point of the score grid, fairness.mitigation.score_bins + 1)"
                )
            checked[group][cell] = list(column)
            total += sum(column)
    if total != n:
        raise ValueError(f"{where}: score_histograms hold {total} rows, the evaluation {n}")
    return checked


def thresholds(
    run: Run, histograms: list[Mapping[str, Mapping[str, list[int]]]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The final model's group thresholds from the sites' summed histograms, or None and the
    reason they cannot be chosen (for the run's evaluation and model card)."""
    plan = parse_plan(run.version.spec)
    assert plan.fairness is not None
    settings = plan.fairness.mitigation
    if not histograms:
        return None, "no silo sent score histograms of the final model"
    summed: dict[str, dict[str, list[int]]] = {}
    for site in histograms:
        for group, cells in site.items():
            into = summed.setdefault(
                group, {cell: [0] * len(cells[cell]) for cell in fairness_mitigation.LABEL_CELLS}
            )
            for cell in fairness_mitigation.LABEL_CELLS:
                into[cell] = [a + b for a, b in zip(into[cell], cells[cell], strict=True)]
    grid = np.linspace(0.0, 1.0, settings.score_bins + 1)  # the agent's (postprocess_grid)
    try:
        rules = fairness_mitigation.threshold_rules(
            summed, grid, constraint=settings.constraint, objective=settings.objective
        )
    except fairness_mitigation.MitigationError as exc:
        return None, f"no thresholds for the final model: {exc}"
    return {
        **rules.to_json(),
        "attribute": plan.fairness.sensitive_attribute,
        "histograms": summed,
        "note": (
            "fairlearn ThresholdOptimizer semantics (flip=False): bin the model's probability "
            "to the nearest grid point, then P(positive) = p0 [s > threshold0] + p1 "
            "[s > threshold1], mixed as p_ignore * constant + (1 - p_ignore) * that"
        ),
    }, None


FAIR_AGGREGATION = "fair_aggregation"


def fairfed_weights(
    round_: Any, spec: Mapping[str, Any], updates: list[Mapping[str, Any]]
) -> tuple[dict[Any, float], dict[str, Any]]:
    """A ``fair_aggregation`` round's aggregation weights (FairFed, Ezzeldin et al. 2023) from
    the contributors' group counts of the global model they received, and the state carried to
    the next round (kept in the round's ``aggregation_stats["fairfed"]``).

    omega-bar of round k-1 comes from the last completed round before this one; a silo that did
    not take part there starts from its share of this round's examples (the paper's n_k / n).

    Raises:
        fairness_mitigation.MitigationError / ValueError: a contributor without group counts,
            or weights FairFed cannot compute (the reason, for the round's failure).
    """
    from federation.models import Round, Update

    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    settings = plan.fairness.mitigation
    sent = {
        u.silo_id: u.fairness
        for u in Update.objects.filter(round=round_, silo_id__in=[x["silo_id"] for x in updates])
    }
    counts: dict[str, Any] = {}
    for u in updates:
        table = (sent.get(u["silo_id"]) or {}).get(attribute)
        if not table:
            raise fairness_mitigation.MitigationError(
                f"FairFed needs every contributor's group counts of {attribute!r}; silo "
                f"{u['silo_id']} sent none"
            )
        counts[str(u["silo_id"])] = table
    before = (
        Round.objects.filter(
            run_id=round_.run_id, number__lt=round_.number, status=Round.Status.COMPLETED
        )
        .order_by("-number", "-attempt")
        .first()
    )
    carried = ((before.aggregation_stats or {}).get("fairfed") or {}) if before else {}
    carried_raw = carried.get("omega_bar") or {}
    total = sum(float(u["num_examples"]) for u in updates) or 1.0
    previous = {
        str(u["silo_id"]): float(carried_raw.get(str(u["silo_id"]), u["num_examples"] / total))
        for u in updates
    }
    step = fairness_mitigation.fairfed_step(
        counts, previous, beta=settings.beta, metric=settings.constraint
    )
    weights = {u["silo_id"]: step.weights[str(u["silo_id"])] for u in updates}
    state = {
        "omega_bar": step.raw,
        "weights": step.weights,
        "deltas": step.deltas,
        "global_value": step.global_value,
        "local_values": step.local_values,
        "fallback": step.fallback,
        "beta": settings.beta,
        "metric": settings.constraint,
    }
    return weights, state
