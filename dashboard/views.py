"""Dashboard pages."""

from __future__ import annotations

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from federation import selectors


def run_list(request: HttpRequest) -> HttpResponse:
    """Runs with their per-round metrics."""
    runs = []
    for run in selectors.run_list()[:50]:
        rounds = []
        for r in run.round_set.all():
            metrics = {f"{m.scope}_{m.name}": m.value for m in r.summary_metrics}
            rounds.append({"round": r, "metrics": metrics})
        runs.append({"run": run, "rounds": rounds})
    return render(request, "dashboard/run_list.html", {"runs": runs})
