"""What a run's fairness came to: the final model against the plan's limits, the accuracy/AUC
beside the disparity round by round, and the plan's mitigation as this server applies it.

Read by the reports (``federation.reports``: fairness report, model card, compliance report),
the API's run detail and the run monitor, so that a run whose final model exceeds a fairness
limit never reads as a plain "Completed" anywhere (docs/fairness.md, "Final model over a
limit").
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedcore.plan import PlanError, is_evaluation_plan, parse_evaluation_plan, parse_plan
from fedcore.plan.spec import MITIGATION_PARAMS

WARNING_CODE = "fairness_limit_exceeded"
LABELS = {
    "demographic_parity_difference": "demographic parity difference",
    "equalized_odds_difference": "equalized odds difference",
}
LIMIT_KEYS = {
    "demographic_parity_difference": "max_demographic_parity_difference",
    "equalized_odds_difference": "max_equalized_odds_difference",
}
# The mitigation kinds this server version applies in a run. The plan language knows every kind
# of fedcore.plan.MITIGATION_KINDS; a plan asking for one not listed here is refused at proposal
# (federation.services.plans: proposal and edit) and at run start, rather than run unmitigated.
MITIGATION_WIRED: frozenset[str] = frozenset(
    {"reweighing", "postprocess", "fair_aggregation", "constraint"}
)


def final_fairness_warning(evaluation: Any) -> dict[str, Any] | None:
    """The warning a run ends with when its final model exceeds a limit of the plan, from its
    final evaluation (``Run.evaluation``); None when there is none to give.

    ``{"code", "model_version", "attribute", "flags": [{"metric", "label", "value", "limit"}],
    "message"}``. Flags of the per-round reports are about earlier models and do not count.
    """
    if not isinstance(evaluation, Mapping):
        return None
    report = evaluation.get("fairness")
    if not isinstance(report, Mapping) or not report.get("flags"):
        return None
    version = evaluation.get("model_version")
    attribute = report.get("sensitive_attribute")
    flags = [
        {
            "metric": flag["metric"],
            "label": LABELS.get(flag["metric"], flag["metric"]),
            "value": flag["value"],
            "limit": flag["limit"],
        }
        for flag in report["flags"]
    ]
    parts = "; ".join(f"{f['label']} {f['value']:.4f} > limit {f['limit']:g}" for f in flags)
    return {
        "code": WARNING_CODE,
        "model_version": version,
        "attribute": attribute,
        "flags": flags,
        "message": (
            f"the final model v{version} exceeds the plan's fairness limit for "
            f"'{attribute}': {parts}"
        ),
    }


def trade_off(
    reports: list[Mapping[str, Any]],
    round_metrics: Mapping[int, Mapping[str, float]],
    evaluation: Mapping[str, Any] | None,
) -> list[dict[str, Any]]:
    """One row per fairness report, oldest first: the model's accuracy and AUC beside its
    disparities for the plan's attribute and the plan's limits.

    Args:
        reports: the run's stored fairness reports (round k's is about model v(k-1)); the final
            evaluation's last, marked ``final``.
        round_metrics: round number -> the round's ``global`` means over the silos (the model
            they received, on their held-out splits, weighted by held-out rows).
        evaluation: the run's final evaluation (pooled figures of the final model), or None.
    """
    rows = []
    for report in reports:
        final = bool(report.get("final"))
        if final:
            pooled = (evaluation or {}).get("metrics") or {}
            figures = {"accuracy": pooled.get("accuracy"), "auc": pooled.get("auc")}
            source = "pooled held-out rows of every silo (final evaluation)"
        else:
            means = round_metrics.get(report.get("round"), {})
            figures = {"accuracy": means.get("accuracy"), "auc": means.get("auc")}
            source = "mean over the silos' held-out splits, weighted by their rows"
        attribute = report.get("sensitive_attribute")
        entry = (report.get("attributes") or {}).get(attribute) or {}
        metrics = entry.get("report") or {}
        thresholds = report.get("thresholds") or {}
        flagged = {flag["metric"] for flag in report.get("flags") or []}
        rows.append(
            {
                "round": report.get("round"),
                "model_version": report.get("model_version"),
                "final": final,
                **figures,
                "performance_source": source,
                "disparities": [
                    {
                        "metric": metric,
                        "label": label,
                        "value": metrics.get(metric),
                        "limit": thresholds.get(LIMIT_KEYS[metric]),
                        "flagged": metric in flagged,
                    }
                    for metric, label in LABELS.items()
                ],
                "error": entry.get("error"),
            }
        )
    return rows


def mitigation_view(
    spec: Mapping[str, Any], computed: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """The plan's ``fairness.mitigation`` for a model card or report: its kind, the parameters
    that apply to that kind (defaults filled in), whether this server applied it and what it
    computed for the run (``Run.mitigation``: the summed counts and the weights sent; None
    before the statistics pass). None for a plan without a fairness section."""
    if not isinstance(spec.get("fairness"), Mapping):
        return None
    try:
        parse = parse_evaluation_plan if is_evaluation_plan(spec) else parse_plan
        fairness = parse(spec).fairness  # an evaluation plan's: never a mitigation
    except PlanError:  # stored specs were valid when approved; an older one may no longer be
        return {"kind": "unknown", "parameters": {}, "applied": False, "note": "not readable"}
    mitigation = fairness.mitigation if fairness is not None else None
    if mitigation is None or not mitigation.active:
        return {
            "kind": "none",
            "parameters": {},
            "applied": False,
            "note": "none: the plan reports fairness but does not mitigate bias",
        }
    kind = mitigation.kind
    parameters = {
        name: getattr(mitigation, name)
        for name, kinds in MITIGATION_PARAMS.items()
        if kind in kinds
    }
    applied = kind in MITIGATION_WIRED
    note = (
        f"{kind} for '{fairness.sensitive_attribute}' (docs/fairness.md, 'Mitigation')"
        if applied
        else f"{kind} is not available in this server version: the model was trained without it"
    )
    if applied and kind == "constraint" and computed:
        note += f"; {constraint_status(computed)}"
    return {
        "kind": kind,
        "parameters": parameters,
        "applied": applied,
        "computed": dict(computed) if applied and computed else None,
        "note": note,
    }


def constraint_status(computed: Mapping[str, Any]) -> str:
    """Where a ``constraint`` run's multipliers stand: met or not by the last measured model."""
    rounds = computed.get("rounds") or 0
    violation = computed.get("max_violation")
    bound = computed.get("bound")
    if not rounds or violation is None:
        return "no round has measured the constraint yet (the multipliers start at 0)"
    label = str(computed.get("constraint", "")).replace("_", " ")
    if computed.get("met"):
        return (
            f"{label} met by the last measured model (largest gap {violation:.4f} <= bound "
            f"{bound:g}) after {rounds} multiplier update(s)"
        )
    return (
        f"{label} NOT met by the last measured model: its largest gap between a group's rate "
        f"and the overall rate is {violation:.4f} > bound {bound:g} after {rounds} multiplier "
        "update(s); more rounds, a larger eta or a looser bound may reach it"
    )


def unavailable_mitigation_error(spec: Any) -> str | None:
    """Why this server refuses the plan's mitigation kind (None: it applies it, or none)."""
    if not isinstance(spec, Mapping):
        return None
    fairness = spec.get("fairness")
    mitigation = fairness.get("mitigation") if isinstance(fairness, Mapping) else None
    kind = mitigation.get("kind", "none") if isinstance(mitigation, Mapping) else "none"
    if not isinstance(kind, str) or kind == "none":
        return None
    if kind in MITIGATION_WIRED:
        # What each kind needs from secure aggregation and noise is the plan language's
        # (fedcore.plan.spec, _mitigation_errors): refused there, with the reason, or applied.
        return None
    available = ", ".join(sorted(MITIGATION_WIRED)) or "none yet"
    return (
        f"{kind!r} is not available yet in this server version (its maths is in place, the "
        f"round path does not apply it); mitigations this server applies: {available}. Set "
        "fairness.mitigation.kind to 'none' (the fairness report still flags the limits) or "
        "wait for a server version that applies it"
    )
