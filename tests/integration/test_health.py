"""GET /healthz: database, channel layer and broker reachability, as JSON, without login."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


def test_embedded_profile_is_healthy_without_a_broker() -> None:
    response = Client().get("/healthz")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert "no-cache" in response["Cache-Control"]
    body = response.json()
    assert body["status"] == "ok" and body["profile"] == "embedded"
    checks = body["checks"]
    assert checks["database"]["ok"] is True and checks["database"]["vendor"] == "sqlite"
    assert checks["channel_layer"] == {
        "ok": True,
        "backend": "InMemoryChannelLayer",
        "ms": checks["channel_layer"]["ms"],
    }
    assert checks["broker"]["ok"] is True and checks["broker"]["used"] is False


def test_only_get() -> None:
    assert Client().post("/healthz").status_code == 405


def test_an_unreachable_broker_is_503_naming_the_failed_check(settings: Any) -> None:
    from config.celery import app

    settings.QUORUM_PROFILE = "production"
    previous = app.conf.broker_url
    app.conf.broker_url = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    try:
        response = Client().get("/healthz")
    finally:
        app.conf.broker_url = previous
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "fail"
    assert body["checks"]["database"]["ok"] is True
    broker = body["checks"]["broker"]
    assert broker["ok"] is False and "Error" in broker["error"]
    assert "redis://" not in broker["error"]  # no URL (and no password) in a public answer


def test_a_probe_over_plain_http_is_not_redirected_to_https(settings: Any) -> None:
    settings.SECURE_SSL_REDIRECT = True
    assert Client().get("/healthz").status_code == 200
    assert Client().get("/login/").status_code == 301


def test_a_database_outage_is_503_with_retry_after_not_a_500(monkeypatch: Any) -> None:
    from django.db import OperationalError

    from federation import selectors
    from federation.services.api_tokens import api_token_create
    from tests.governance_factories import governed_consortium

    gov = governed_consortium(1)
    scientist = gov.scientists[0]
    token = api_token_create(actor=scientist, user=scientist, name="test").token

    def unreachable(*_: Any, **__: Any) -> Any:
        raise OperationalError("connection to server at 127.0.0.1, port 5432 failed")

    monkeypatch.setattr(selectors, "run_list", unreachable)
    client = Client(raise_request_exception=False)
    response = client.get("/api/v1/runs/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 503
    assert response["Retry-After"] == "10"
    body = response.json()
    assert body["code"] == "database_unavailable" and "database is unreachable" in body["detail"]
    assert "5432" not in body["detail"]  # nothing of the connection string in a public answer


def test_other_server_errors_stay_500(monkeypatch: Any) -> None:
    from federation import selectors
    from federation.services.api_tokens import api_token_create
    from tests.governance_factories import governed_consortium

    gov = governed_consortium(1)
    scientist = gov.scientists[0]
    token = api_token_create(actor=scientist, user=scientist, name="test").token

    def broken(*_: Any, **__: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(selectors, "run_list", broken)
    client = Client(raise_request_exception=False)
    response = client.get("/api/v1/runs/", HTTP_AUTHORIZATION=f"Token {token}")
    assert response.status_code == 500 and "Retry-After" not in response
