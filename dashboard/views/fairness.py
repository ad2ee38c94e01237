"""A run's fairness report (every member) and a consortium's privacy budget report."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse

from dashboard import charts
from dashboard.views.assets import PLOTLY_VERSION
from dashboard.views.common import page
from federation import permissions, selectors

RATES = ("selection_rate", "tpr", "fpr", "accuracy")


def _group_row(group: str | None, rates: dict[str, Any], undefined: set[tuple[Any, str]]) -> dict:
    return {
        "group": group,
        "count": rates["count"],
        "rates": [
            {"value": rates[rate], "undefined": (group, rate) in undefined} for rate in RATES
        ],
    }


def _attribute_view(name: str, entry: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """One sensitive attribute of a stored report, shaped for the page's tables."""
    metrics = entry.get("report")
    primary = name == report.get("sensitive_attribute")
    thresholds = (report.get("thresholds") or {}) if primary else {}
    flagged = {flag["metric"] for flag in entry.get("flags") or []}
    view: dict[str, Any] = {
        "name": name,
        "primary": primary,
        "error": entry.get("error"),
        "rows": [],
        "overall": None,
        "differences": [],
        "undefined": [],
    }
    if metrics:
        undefined = {(u["group"], u["metric"]) for u in metrics["undefined_rates"]}
        view["rows"] = [
            _group_row(group, rates, undefined) for group, rates in metrics["by_group"].items()
        ]
        view["overall"] = _group_row(None, metrics["overall"], undefined)
        view["undefined"] = metrics["undefined_rates"]
        view["differences"] = [
            {
                "label": label,
                "value": metrics[metric],
                "limit": thresholds.get(limit_key),
                "flagged": metric in flagged,
            }
            for metric, label, limit_key in charts.FAIRNESS_METRICS
        ]
    representation = entry.get("representation") or {}
    groups = representation.get("groups") or []

    def shares(part: dict[str, Any]) -> dict[str, Any]:
        return {"count": part["count"], "shares": [part["shares"].get(g) for g in groups]}

    view["representation"] = {
        "groups": groups,
        "rows": [
            {"silo": silo, **shares(part)}
            for silo, part in (representation.get("by_silo") or {}).items()
        ],
        "overall": shares(representation["overall"]) if representation.get("overall") else None,
    }
    return view


@login_required
def run_fairness(request: HttpRequest, run_id: int) -> HttpResponse:
    """Group fairness of the global model per round: by-group rates, disparities against the
    plan's limits, performance spread and representation per silo, and the trend."""
    run = permissions.access_run(user=request.user, id=run_id)
    settings = run.version.spec.get("fairness")
    reports = [stored.report for stored in selectors.run_fairness_reports(run)]
    latest = reports[-1] if reports else None
    chart = charts.fairness_trend_chart(reports) if reports else None
    spread = []
    if latest:
        for metric in ("accuracy", "auc"):
            spread.append({"metric": metric, "spread": latest["performance_spread"].get(metric)})
    return page(
        request,
        "dashboard/run_fairness.html",
        consortium=run.plan.consortium,
        section="runs",
        run=run,
        settings=settings,
        plan_limits=[
            {"label": label, "value": (settings or {}).get(limit_key)}
            for _, label, limit_key in charts.FAIRNESS_METRICS
        ],
        latest=latest,
        attributes=[
            _attribute_view(name, entry, latest) for name, entry in latest["attributes"].items()
        ]
        if latest
        else [],
        spread=spread,
        chart=chart,
        figures={chart.key: chart.figure} if chart else {},
        plotly_version=PLOTLY_VERSION,
        flags=[
            {**flag, "round": r["round"], "model_version": r["model_version"]}
            for r in reports
            for flag in r.get("flags") or []
        ],
    )


@login_required
def consortium_privacy(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """Epsilon spent against each silo's budget over time, every ledger entry by run with its
    mechanism and parameters, and the projected cost of plans waiting to run."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    data = selectors.consortium_privacy(consortium)
    chart = charts.privacy_spend_chart(data["silos"])
    return page(
        request,
        "dashboard/privacy_report.html",
        consortium=consortium,
        section="privacy",
        chart=chart,
        figures={chart.key: chart.figure},
        plotly_version=PLOTLY_VERSION,
        **data,
    )
