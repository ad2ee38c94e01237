"""Runs: the list, the live monitor and its figures endpoint, stopping a run."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from dashboard import charts
from dashboard.views.assets import PLOTLY_VERSION
from dashboard.views.common import nav_for, page
from federation import fairness_outcome, permissions, reports, selectors
from federation.models import Role, Run
from federation.services import runs as run_services
from federation.services.errors import Conflict


@login_required
def run_list(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """A consortium's runs, active first."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    return page(
        request,
        "dashboard/run_list.html",
        consortium=consortium,
        section="runs",
        active_runs=selectors.consortium_runs(consortium, active=True),
        finished_runs=selectors.consortium_runs(consortium, active=False),
    )


def _monitor_data(request: HttpRequest, run: Run) -> dict[str, Any]:
    """What the monitor shows and the live endpoint re-sends: rounds, charts, silos."""
    rounds = list(selectors.run_rounds(run))
    metric_rows = selectors.run_metric_rows(run)
    evaluated = selectors.evaluation_plan_of(run)
    silos = [
        {"silo": silo, "online": selectors.silo_is_online(silo)}
        for silo in selectors.run_silos(run)
    ]
    return {
        "run": run,
        "rounds": rounds,
        "rounds_completed": sum(1 for r in rounds if r.status == "completed"),
        "charts": charts.run_charts(
            rounds,
            metric_rows,
            selectors.run_task(run),
            run.evaluation,
            trains=evaluated is None,
        ),
        # an evaluation plan's run: the model version it evaluates, and on which rows
        "evaluated": evaluated,
        "silos": silos,
        "waiting_note": selectors.run_waiting_note(run, rounds),
        "refusals": list(selectors.run_refusals(run)),
        # Not a plain "Completed": the final model exceeds a fairness limit of the plan.
        "fairness_warning": fairness_outcome.final_fairness_warning(run.evaluation),
        "fairness_info": fairness_outcome.final_fairness_info(run.evaluation),
        # A multi-class or regression run's final figures per silo and pooled (else None).
        "task_table": reports.final_task_table(run),
        "may_stop": _may_stop(
            request, run, frozenset(permissions.roles_in(request.user, run.plan.consortium_id))
        ),
    }


def _may_stop(request: HttpRequest, run: Run, roles: frozenset[str]) -> bool:
    if not run.active or not roles & permissions.CAN_START_RUNS:
        return False
    return Role.CONSORTIUM_ADMIN in roles or run.plan.proposed_by_id == request.user.pk


@login_required
def run_monitor(request: HttpRequest, run_id: int) -> HttpResponse:
    """Per-round metrics, participation and durations, updated live over /ws/live/."""
    run = permissions.access_run(user=request.user, id=run_id)
    nav = nav_for(request, run.plan.consortium)
    data = _monitor_data(request, run)
    return page(
        request,
        "dashboard/run_monitor.html",
        nav=nav,
        section="runs",
        figures={c.key: c.figure for c in data["charts"]},
        model_count=selectors.run_model_versions(run).count(),
        plotly_version=PLOTLY_VERSION,
        **data,
    )


@login_required
def run_live(request: HttpRequest, run_id: int) -> JsonResponse:
    """The monitor's figures and tables as JSON: the page re-fetches it on a live event."""
    run = permissions.access_run(user=request.user, id=run_id)
    data = _monitor_data(request, run)
    toolbar = {
        "run": run,
        "nav": nav_for(request, run.plan.consortium),
        "model_count": selectors.run_model_versions(run).count(),
    }
    response = JsonResponse(
        {
            "run": run.pk,
            "status": run.status,
            "active": run.active,
            "rounds_completed": data["rounds_completed"],
            "figures": {c.key: c.figure for c in data["charts"]},
            "points": {c.key: c.points for c in data["charts"]},
            "tables": {
                c.key: render_to_string("dashboard/_chart_table.html", {"chart": c})
                for c in data["charts"]
            },
            "summary": render_to_string("dashboard/_run_summary.html", data, request=request),
            # The links above the charts: "Models (n)" appears with the first model version.
            "toolbar": render_to_string("dashboard/_run_toolbar.html", toolbar, request=request),
        }
    )
    response["Cache-Control"] = "no-store"
    return response


@login_required
@require_POST
def run_stop(request: HttpRequest, run_id: int) -> HttpResponse:
    """Stop an active run (its proposer or a consortium admin)."""
    run = permissions.access_run(user=request.user, id=run_id)
    try:
        run_services.run_stop(actor=request.user, run=run)
    except Conflict as exc:
        messages.error(request, exc.message)
    else:
        messages.success(request, f"Run {run.pk} stopped.")
    return redirect("dashboard:run_monitor", run_id=run.pk)
