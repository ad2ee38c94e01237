"""The run list at / shows runs with their per-round metrics."""

from __future__ import annotations

import pytest
from django.test import Client
from django.utils import timezone

from federation.models import Round, RoundMetric
from tests.factories import ConsortiumFactory, SiloFactory, running_round

pytestmark = pytest.mark.django_db


def test_run_list_shows_rounds_and_metrics(client: Client) -> None:
    consortium = ConsortiumFactory(name="Thyroid clinics")
    silos = SiloFactory.create_batch(2, organization__consortium=consortium)
    round_ = running_round(silos)
    Round.objects.filter(pk=round_.pk).update(
        status=Round.Status.COMPLETED, finished_at=timezone.now()
    )
    RoundMetric.objects.create(round=round_, silo=None, scope="local", name="auc", value=0.91234)
    RoundMetric.objects.create(round=round_, silo=None, scope="global", name="auc", value=0.8)
    RoundMetric.objects.create(
        round=round_, silo=None, scope="train", name="train_loss", value=0.25
    )

    response = client.get("/")

    assert response.status_code == 200
    html = response.content.decode()
    assert "Thyroid clinics" in html and f"Run {round_.run_id}" in html
    assert "0.9123" in html and "0.8000" in html and "0.2500" in html
    assert round_.run.plan_hash[:16] in html


def test_run_list_without_runs_says_how_to_start_one(client: Client) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert "make demo" in response.content.decode()
