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

from fedcore import fairness, fairness_mitigation, tabular
from fedcore.plan import parse_plan
from federation.models import Run, SiloStatistics

REWEIGHING = "reweighing"


def plan_kind(spec: Mapping[str, Any]) -> str:
    """The plan's ``fairness.mitigation`` kind (``none`` without one)."""
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
