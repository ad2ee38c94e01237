"""The run monitor's live data carries everything its finished state shows, and charts without
data have sensible axes (not Plotly's guess for an empty plot)."""

from __future__ import annotations

import pytest
from django.test import Client

from dashboard import charts
from federation.models import Run
from federation.services.runs import run_start
from tests.dashboard_factories import World, approve_all, build_world, propose

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return build_world()


def test_live_data_of_a_finished_run_has_its_models_button_and_no_waiting_note(
    world: World,
) -> None:
    client = Client()
    client.force_login(world.user("auditor"))
    data = client.get(f"/runs/{world.run.pk}/live.json").json()
    assert data["active"] is False and data["status"] == "completed"
    models = world.run.model_versions.count()
    assert models > 0 and f"Models ({models})" in data["toolbar"]
    assert "Compliance report" in data["toolbar"]  # an auditor's link
    assert "status-completed" in data["summary"] and "Waiting" not in data["summary"]


def test_a_new_run_has_no_models_button_and_empty_charts_have_fixed_axes(world: World) -> None:
    plan = approve_all(world.gov, propose(world.gov, name="Fresh plan"))
    run = run_start(actor=world.gov.scientists[0], plan=plan)
    client = Client()
    client.force_login(world.user("scientist"))
    data = client.get(f"/runs/{run.pk}/live.json").json()
    assert Run.objects.get(pk=run.pk).active and data["rounds_completed"] == 0
    assert 'id="run-models"' not in data["toolbar"]
    for key, figure in data["figures"].items():
        layout = figure["layout"]
        assert layout["yaxis"]["range"] == [0, 1], key
        assert layout["xaxis"]["range"] == [0.5, 5.5], key
        assert layout["annotations"][0]["text"] == charts.EMPTY_NOTE, key


def test_charts_with_data_keep_their_own_axes() -> None:
    rows = [
        {
            "round_number": 1,
            "attempt": 1,
            "silo_name": None,
            "metric_scope": "global",
            "metric_name": "accuracy",
            "metric_value": 0.8,
        }
    ]
    (chart,) = [c for c in charts.run_charts([], rows) if c.key == "accuracy"]
    assert chart.points == 1
    assert "range" not in chart.figure["layout"]["yaxis"]
    assert not chart.figure["layout"].get("annotations")
