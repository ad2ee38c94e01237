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

from fedcore import fairness, fairness_mitigation
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


IN_SAMPLE_NOTE = (
    "in sample: the thresholds were chosen on these rows; expect a larger disparity on new rows"
)
OUT_OF_SAMPLE_NOTE = (
    "out of sample: the thresholds were chosen on the sites' training rows, these are their "
    "held-out rows"
)
INFO_CODE = "fairness_limit_met_by_thresholds"


def thresholded_report(
    thresholds: Mapping[str, Any],
    held_out: Mapping[str, Mapping[str, Any]],
    limits: Mapping[str, Any],
    *,
    model_version: int,
    in_sample: bool,
    noised: float | None = None,
) -> dict[str, Any]:
    """The final model's thresholded decisions (a ``postprocess`` run's group thresholds,
    ``Run.evaluation["thresholds"]``) on the pooled held-out rows (their summed score
    histograms): demographic parity and equalized odds differences, accuracy (expected over the
    rules' randomisation), and the plan's limits they exceed (``limits``: its fairness section).

    Raises:
        ValueError: a held-out group with rows has no threshold rule.
    """
    rules, grid = thresholds["rules"], thresholds["grid"]
    disparities = fairness_mitigation.thresholded_disparities(rules, held_out, grid)
    attribute = thresholds.get("attribute")
    note = IN_SAMPLE_NOTE if in_sample else OUT_OF_SAMPLE_NOTE
    if noised is not None:
        note += f"; from histograms noised with fairness.dp_epsilon = {noised:g}"
    return {
        "model_version": model_version,
        "attribute": attribute,
        "decisions": "the final model's group thresholds (postprocess)",
        "rows": "pooled held-out rows of every silo",
        "n": int(sum(sum(sum(column) for column in cells.values()) for cells in held_out.values())),
        "in_sample": in_sample,
        "note": note,
        **disparities,
        "accuracy": fairness_mitigation.thresholded_accuracy(rules, held_out, grid),
        "limits": {key: limits.get(key) for key in LIMIT_KEYS.values()},
        "flags": [
            {**flag, "attribute": attribute}
            for flag in fairness.threshold_flags(disparities, limits)
        ],
    }


def _thresholded(evaluation: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The thresholded decisions' report when the run deploys thresholds (None: the raw model's
    decisions are what is deployed, or no report of them could be made)."""
    if not evaluation.get("thresholds"):
        return None
    report = evaluation.get("thresholded_fairness")
    return report if isinstance(report, Mapping) else None


def _flag_views(flags: Any) -> list[dict[str, Any]]:
    return [
        {
            "metric": flag["metric"],
            "label": LABELS.get(flag["metric"], flag["metric"]),
            "value": flag["value"],
            "limit": flag["limit"],
        }
        for flag in flags or []
    ]


def _parts(flags: list[dict[str, Any]]) -> str:
    return "; ".join(f"{f['label']} {f['value']:.4f} > limit {f['limit']:g}" for f in flags)


def final_fairness_warning(evaluation: Any) -> dict[str, Any] | None:
    """The warning a run ends with when its final model's deployed decisions exceed a limit of
    the plan, from its final evaluation (``Run.evaluation``); None when there is none to give.

    The deployed decisions: a ``postprocess`` run's thresholded ones when it has thresholds
    (``thresholded_fairness``), else the raw model's at 0.5 (``fairness``).

    ``{"code", "model_version", "attribute", "decisions": "thresholded"|"raw", "flags":
    [{"metric", "label", "value", "limit"}], "message"}``. Flags of the per-round reports are
    about earlier models and do not count.
    """
    if not isinstance(evaluation, Mapping):
        return None
    version = evaluation.get("model_version")
    thresholded = _thresholded(evaluation)
    if thresholded is not None:
        flags = _flag_views(thresholded.get("flags"))
        if not flags:
            return None
        return {
            "code": WARNING_CODE,
            "model_version": version,
            "attribute": thresholded.get("attribute"),
            "decisions": "thresholded",
            "flags": flags,
            "message": (
                f"the final model v{version}'s thresholded decisions (its postprocess group "
                f"thresholds, deployed with it) exceed the plan's fairness limit for "
                f"'{thresholded.get('attribute')}' on the pooled held-out rows: "
                f"{_parts(flags)} ({thresholded.get('note')})"
            ),
        }
    report = evaluation.get("fairness")
    if not isinstance(report, Mapping) or not report.get("flags"):
        return None
    attribute = report.get("sensitive_attribute")
    flags = _flag_views(report["flags"])
    return {
        "code": WARNING_CODE,
        "model_version": version,
        "attribute": attribute,
        "decisions": "raw",
        "flags": flags,
        "message": (
            f"the final model v{version} exceeds the plan's fairness limit for "
            f"'{attribute}': {_parts(flags)}"
        ),
    }


def final_fairness_info(evaluation: Any) -> dict[str, Any] | None:
    """When a ``postprocess`` run's raw model (decisions at 0.5) exceeds a limit of the plan
    but its thresholded decisions, which are deployed, are within every limit: the raw figures
    and the thresholded ones, for the views to say so (information, not a warning); None
    otherwise.

    ``{"code": "fairness_limit_met_by_thresholds", "model_version", "attribute", "flags"
    (the raw model's), "thresholded": [{"metric", "label", "value", "limit"}], "in_sample",
    "message"}``.
    """
    if not isinstance(evaluation, Mapping):
        return None
    thresholded = _thresholded(evaluation)
    report = evaluation.get("fairness")
    if thresholded is None or thresholded.get("flags") or not isinstance(report, Mapping):
        return None
    raw = _flag_views(report.get("flags"))
    if not raw:
        return None
    version = evaluation.get("model_version")
    attribute = report.get("sensitive_attribute")
    within = [
        {
            "metric": flag["metric"],
            "label": flag["label"],
            "value": thresholded.get(flag["metric"]),
            "limit": flag["limit"],
        }
        for flag in raw
    ]
    figures = "; ".join(f"{f['label']} {f['value']:.4f} <= limit {f['limit']:g}" for f in within)
    return {
        "code": INFO_CODE,
        "model_version": version,
        "attribute": attribute,
        "flags": raw,
        "thresholded": within,
        "in_sample": thresholded.get("in_sample"),
        "message": (
            f"the final model v{version} at 0.5 exceeds the plan's fairness limit for "
            f"'{attribute}' ({_parts(raw)}); its postprocess group thresholds, deployed with "
            f"it, bring its decisions within on the pooled held-out rows: {figures} "
            f"({thresholded.get('note')})"
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
                "thresholded": False,  # the model's decisions at 0.5
                **figures,
                "performance_source": source,
                "disparities": _disparities(metrics, thresholds, flagged),
                "error": entry.get("error"),
            }
        )
        thresholded = _thresholded(evaluation or {}) if final else None
        if thresholded is not None:
            rows.append(_thresholded_row(thresholded))
    return rows


def _disparities(
    values: Mapping[str, Any], limits: Mapping[str, Any], flagged: set[str]
) -> list[dict[str, Any]]:
    """A trade-off row's disparities: each metric's value beside the plan's limit for it."""
    return [
        {
            "metric": metric,
            "label": label,
            "value": values.get(metric),
            "limit": limits.get(LIMIT_KEYS[metric]),
            "flagged": metric in flagged,
        }
        for metric, label in LABELS.items()
    ]


def thresholded_decisions(evaluation: Any) -> dict[str, Any] | None:
    """The final model's thresholded decisions for a report or model card (the trade-off
    row's shape, with ``n`` rows), or None: no thresholds or no report of their decisions."""
    thresholded = _thresholded(evaluation) if isinstance(evaluation, Mapping) else None
    if thresholded is None:
        return None
    return {**_thresholded_row(thresholded), "n": thresholded.get("n")}


def _thresholded_row(report: Mapping[str, Any]) -> dict[str, Any]:
    """The trade-off row of the final model's thresholded decisions (what is deployed)."""
    flagged = {flag["metric"] for flag in report.get("flags") or []}
    limits = report.get("limits") or {}
    return {
        "round": None,
        "model_version": report.get("model_version"),
        "final": True,
        "thresholded": True,
        "in_sample": report.get("in_sample"),
        "note": report.get("note"),
        "accuracy": report.get("accuracy"),
        "auc": None,  # decisions, not scores: the ranking is the raw model's
        "performance_source": (
            "the thresholded decisions on the pooled held-out rows of every silo (final "
            "evaluation), expected over the thresholds' randomisation"
        ),
        "disparities": _disparities(report, limits, flagged),
        "error": None,
    }


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
