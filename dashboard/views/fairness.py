"""A run's fairness report (every member) and a consortium's privacy budget report."""

from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse

from dashboard import charts
from dashboard.views.assets import PLOTLY_VERSION
from dashboard.views.common import page
from federation import permissions, reports, selectors


@login_required
def run_fairness(request: HttpRequest, run_id: int) -> HttpResponse:
    """Group fairness of the global model per round: by-group rates, disparities against the
    plan's limits, performance spread and representation per silo, and the trend."""
    run = permissions.access_run(user=request.user, id=run_id)
    data = reports.run_fairness(run)
    chart = charts.fairness_trend_chart(data["reports"]) if data["reports"] else None
    return page(
        request,
        "dashboard/run_fairness.html",
        consortium=run.plan.consortium,
        section="runs",
        run=run,
        chart=chart,
        figures={chart.key: chart.figure} if chart else {},
        plotly_version=PLOTLY_VERSION,
        **data,
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
