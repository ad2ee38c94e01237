"""An analysis run's released result: a chart, its table, and the table as CSV."""

from __future__ import annotations

import csv
import io

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpRequest, HttpResponse

from dashboard import charts
from dashboard.views.assets import PLOTLY_VERSION
from dashboard.views.common import page
from fedcore.analytics.tables import analysis_table
from federation import permissions, reports


@login_required
def run_analysis(request: HttpRequest, run_id: int) -> HttpResponse:
    """The result of an analysis run (whoever may read the run's reports)."""
    run = permissions.access_run(user=request.user, id=run_id)
    data = reports.run_analysis(run)
    if data["kind"] is None:
        raise Http404("a training run has no analysis")
    chart = charts.analysis_chart(data["result"]) if data["result"] else None
    return page(
        request,
        "dashboard/run_analysis.html",
        consortium=run.plan.consortium,
        section="runs",
        run=run,
        analysis=data,
        chart=chart,
        figures={chart.key: chart.figure} if chart else {},
        plotly_version=PLOTLY_VERSION,
    )


@login_required
def run_analysis_csv(request: HttpRequest, run_id: int) -> HttpResponse:
    """The released result's table as CSV (a suppressed cell is empty)."""
    run = permissions.access_run(user=request.user, id=run_id)
    data = reports.run_analysis(run)
    if data["result"] is None:
        raise Http404("this run has released no analysis result")
    header, rows = analysis_table(data["result"])
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(header)
    writer.writerows([["" if v is None else v for v in row] for row in rows])
    response = HttpResponse(out.getvalue(), content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="run-{run.pk}-analysis.csv"'
    return response
