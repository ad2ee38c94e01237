"""API tokens hashed at rest, with an expiry, shown once (issue 13 part 7)."""

from __future__ import annotations

import io
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db import connection
from django.utils import timezone
from rest_framework.test import APIClient

from federation.models import ApiToken, AuditEvent

pytestmark = pytest.mark.django_db


@pytest.fixture
def alice() -> object:
    return get_user_model().objects.create_user("alice", password="pw-alice-123")


def database_text() -> str:
    """Every text value of every table, as the database holds it."""
    chunks = []
    with connection.cursor() as cursor:
        for table in connection.introspection.table_names():
            cursor.execute(f'SELECT * FROM "{table}"')
            chunks.extend(str(value) for row in cursor.fetchall() for value in row)
    return "\n".join(chunks)


def test_a_token_created_through_the_api_is_shown_once_and_never_stored(alice) -> None:
    session = APIClient()
    session.force_login(alice)
    created = session.post("/api/v1/me/tokens/", {"name": "ci", "days": 30}, format="json")
    assert created.status_code == 201, created.json()
    token = created.json()["token"]

    assert token not in database_text()  # neither the token nor any clear copy of it
    listing = session.get("/api/v1/me/tokens/").json()
    assert [row["name"] for row in listing] == ["ci"] and "token" not in listing[0]
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/me/").json()["username"] == "alice"
    assert ApiToken.objects.get().last_used_at is not None
    assert AuditEvent.objects.filter(action="api_token.created").count() == 1


def test_an_expired_token_is_refused_with_a_clear_401(alice) -> None:
    out = io.StringIO()
    call_command("api_token", "create", "alice", "--days", "1", stdout=out, stderr=io.StringIO())
    token = out.getvalue().strip()
    assert token not in database_text()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/me/").status_code == 200

    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    response = client.get("/api/v1/me/")
    assert response.status_code == 401
    assert (
        "expired on" in response.json()["detail"]
        and "create a new one" in (response.json()["detail"])
    )
    assert response.headers["WWW-Authenticate"] == "Token"


def test_a_revoked_or_made_up_token_is_refused(alice) -> None:
    session = APIClient()
    session.force_login(alice)
    body = session.post("/api/v1/me/tokens/", {}, format="json").json()
    assert session.delete(f"/api/v1/me/tokens/{body['id']}/").status_code == 204
    client = APIClient()
    for token in (body["token"], "made-up"):
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
        response = client.get("/api/v1/me/")
        assert response.status_code == 401 and "unknown or was revoked" in response.json()["detail"]


def test_a_token_lifetime_beyond_the_maximum_is_refused_and_nothing_is_created(alice) -> None:
    session = APIClient()
    session.force_login(alice)
    response = session.post("/api/v1/me/tokens/", {"days": 10_000}, format="json")
    assert response.status_code == 400 and "between 1 and 365" in str(response.json())
    assert not ApiToken.objects.exists()


def test_the_migration_hashes_clear_authtoken_rows_and_deletes_them(alice) -> None:
    from importlib import import_module

    from django.apps import apps

    migration = import_module("federation.migrations.0006_api_tokens")
    with connection.cursor() as cursor:
        cursor.execute('CREATE TABLE "authtoken_token" (key varchar(40), user_id integer)')
        cursor.execute("INSERT INTO authtoken_token VALUES ('9944b09199c62bcf', %s)", [alice.pk])
    migration.hash_clear_tokens(apps, SimpleNamespace(connection=connection))
    assert "9944b09199c62bcf" not in database_text()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token 9944b09199c62bcf")
    assert client.get("/api/v1/me/").json()["username"] == "alice"


def test_the_dashboard_shows_a_new_token_once_and_revokes_it(alice) -> None:
    from django.test import Client

    browser = Client()
    browser.force_login(alice)
    created = browser.post("/account/tokens/", {"name": "notebook", "days": "7"})
    assert created.status_code == 201 and created["Cache-Control"] == "no-store"
    token = created.context["created"].token
    assert token in created.content.decode() and token not in database_text()

    listing = browser.get("/account/tokens/").content.decode()
    assert token not in listing and ApiToken.objects.get().prefix in listing
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    assert client.get("/api/v1/me/").status_code == 200

    revoked = browser.post(f"/account/tokens/{ApiToken.objects.get().pk}/revoke/", follow=True)
    assert "revoked" in revoked.content.decode()
    assert client.get("/api/v1/me/").status_code == 401
    bad = browser.post("/account/tokens/", {"days": "100000"})
    assert bad.status_code == 400 and "between 1 and 365" in bad.content.decode()
    assert not ApiToken.objects.exists()
