"""An analysis run's result page in a real browser: the Kaplan-Meier curves with their
confidence bands and a Cox model's forest plot drawn by Plotly (from the installed package, the
network cut to localhost), the same numbers in the table under each chart, no serious axe-core
finding, no console error. The runs are real analysis runs: each step's signed request answered
by the agent's own code on three sites' files (tests/integration/test_analysis_runs.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from clientagent.data import LocalData
from fedcore.analytics import DisclosurePolicy
from federation.models import Run
from tests.browser.conftest import Session
from tests.browser.test_accessibility import axe_findings
from tests.browser.test_dashboard_browser import PASSWORD, with_password
from tests.e2e import harness
from tests.integration.test_analysis_runs import KM, answer_step, governed_run, site_csv

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


def finished(analysis: dict, tmp_path: Path) -> tuple[Any, Run]:
    g, run = governed_run(analysis)
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]
    for _ in range(20):
        assert answer_step(g, run, data, [DisclosurePolicy()] * 3) == []
        if run.status != Run.Status.RUNNING:
            break
    assert run.status == Run.Status.COMPLETED, run.error
    return g, run


def chart_key(session: Session) -> str:
    """The page's one chart (the figures the page hands charts.js, keyed by chart)."""
    return session.page.evaluate(
        "Object.keys(JSON.parse(document.getElementById('page-figures').textContent))[0]"
    )


def drawn(session: Session, key: str) -> list[dict[str, Any]]:
    """What Plotly draws in the chart now: each trace's name, kind and point count."""
    return session.page.evaluate(
        """key => (document.getElementById('chart-' + key).data || []).map(t => ({
            name: t.name || '', fill: t.fill || '', points: (t.x || []).length }))""",
        key,
    )


def test_survival_curves_and_a_forest_plot_render_with_their_tables(
    chromium: Any, live_server_proc: tuple[str, int, harness.Proc], tmp_path: Path
) -> None:
    base_url, _, _ = live_server_proc
    g, km = finished(KM, tmp_path)
    cox_analysis = {"kind": "cox", "time": "time", "event": "status", "covariates": ["age"]}
    g2, cox = finished(cox_analysis, tmp_path)  # another consortium
    scientist = with_password(g.scientists[0])
    session = Session(chromium, base_url)
    try:
        session.login(scientist.username, PASSWORD)
        session.goto(f"/runs/{km.pk}/analysis/")
        key = chart_key(session)
        session.page.wait_for_function(
            "key => (document.getElementById('chart-' + key).data || []).length > 0", arg=key
        )
        traces = drawn(session, key)
        curves = km.analysis["result"]["curves"]
        # every group's curve with its band, each with a point per event time at least
        assert len(traces) >= 2 * len(curves), traces
        assert any(t["fill"] for t in traces), "no confidence band is drawn"
        assert min(t["points"] for t in traces) >= min(len(c["time"]) for c in curves.values())
        table = session.page.locator(f"#table-{key} table")
        assert table.count() >= 1 and "Log-rank" in session.page.inner_text("main")
        assert axe_findings(session) == []
        session.screenshot("analysis-kaplan-meier", docs=True)

        assert session.watch.problems() == []
        session.close()
        session = Session(chromium, base_url)
        session.login(with_password(g2.scientists[0]).username, PASSWORD)
        session.goto(f"/runs/{cox.pk}/analysis/")
        key = chart_key(session)
        session.page.wait_for_function(
            "key => (document.getElementById('chart-' + key).data || []).length > 0", arg=key
        )
        assert sum(t["points"] for t in drawn(session, key)) >= 1  # the coefficient's point
        assert "age" in session.page.inner_text(f"#table-{key}")
        assert axe_findings(session) == []
        session.screenshot("analysis-cox")
        assert session.watch.problems() == []
    finally:
        session.close()
