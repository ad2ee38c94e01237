"""GET /metrics: Prometheus text format from the database, behind a bearer token."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import models
from federation.metrics import quantile
from federation.services.audit import audit_append
from tests.factories import SiloFactory, running_round

pytestmark = pytest.mark.django_db

TOKEN = "scrape-token-0123456789"
SAMPLE = re.compile(r"^([a-z_]+)(\{[^}]*\})? (\S+)$")


@pytest.fixture
def token(settings: Any) -> str:
    settings.QUORUM_METRICS_TOKEN = TOKEN
    return TOKEN


def scrape(token: str | None = TOKEN) -> Any:
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"} if token else {}
    return Client().get("/metrics", **headers)


def samples(text: str) -> dict[str, float]:
    """'name{labels}' -> value, checking every line is HELP, TYPE or a well-formed sample."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a Prometheus sample line: {line!r}"
        found[match.group(1) + (match.group(2) or "")] = float(match.group(3))
    return found


def test_off_without_a_configured_token(settings: Any) -> None:
    settings.QUORUM_METRICS_TOKEN = ""
    response = scrape()
    assert response.status_code == 404
    assert b"QUORUM_METRICS_TOKEN" in response.content


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic " + TOKEN, TOKEN])
def test_refused_without_the_right_bearer_token(token: str, header: str | None) -> None:
    extra = {"HTTP_AUTHORIZATION": header} if header else {}
    response = Client().get("/metrics", **extra)
    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert b"quorum_" not in response.content


def test_only_get(token: str) -> None:
    assert Client().post("/metrics", HTTP_AUTHORIZATION=f"Bearer {token}").status_code == 405


def test_figures_follow_the_database(token: str) -> None:
    silos = SiloFactory.create_batch(3)
    SiloFactory(admission=models.Silo.Admission.PENDING, organization=silos[0].organization)
    now = timezone.now()
    models.Silo.objects.filter(pk=silos[0].pk).update(connection_id="c0", last_heartbeat=now)
    models.Silo.objects.filter(pk=silos[1].pk).update(
        connection_id="c1", last_heartbeat=now - timedelta(hours=1)
    )
    round_ = running_round(silos)
    round_.status = models.Round.Status.COMPLETED
    round_.started_at = now - timedelta(seconds=4)
    round_.finished_at = now
    round_.save()
    models.Update.objects.create(
        round=round_,
        silo=silos[0],
        num_examples=10,
        nonce="n0",
        sha256="0" * 64,
        size_bytes=1234,
        blob_key="k",
    )
    audit_append(actor="system", action="update.refused", data={"why": "norm"})

    response = scrape()
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "no-cache" in response["Cache-Control"]
    got = samples(response.content.decode())
    assert got['quorum_silos{admission="admitted"}'] == 3
    assert got['quorum_silos{admission="pending"}'] == 1
    assert got['quorum_silos{admission="rejected"}'] == 0
    assert got["quorum_silos_connected"] == 2
    assert got["quorum_silos_stale"] == 1
    assert got['quorum_runs{status="running"}'] == 1
    assert got['quorum_rounds{status="completed"}'] == 1
    assert got["quorum_round_duration_seconds_count"] == 1
    assert got["quorum_round_duration_seconds_sum"] == pytest.approx(4.0)
    assert got['quorum_round_duration_seconds{quantile="0.5"}'] == pytest.approx(4.0)
    assert got["quorum_updates_accepted_total"] == 1
    assert got["quorum_update_bytes_total"] == 1234
    assert got['quorum_audit_events_total{action="update.refused"}'] == 1
    assert got["quorum_audit_events_total"] == models.AuditEvent.objects.count()
    assert got["quorum_model_versions_total"] == 1
    assert got['quorum_build_info{version="0.1.0",profile="embedded"}'] == 1


def test_a_scrape_costs_the_same_queries_at_any_size(token: str) -> None:
    def queries() -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert scrape().status_code == 200
        return len(ctx.captured_queries)

    running_round(SiloFactory.create_batch(2))
    few = queries()
    running_round(SiloFactory.create_batch(20))
    assert queries() == few


def test_nearest_rank_quantiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert quantile(values, 0.5) == 50.0
    assert quantile(values, 0.99) == 99.0
    assert quantile(values, 1.0) == 100.0
    assert quantile([3.0], 0.9) == 3.0
    assert quantile([], 0.5) != quantile([], 0.5)  # NaN
