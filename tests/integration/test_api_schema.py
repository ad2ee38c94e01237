"""The OpenAPI schema is valid, the docs page works offline, and the API honours the schema.

Schemathesis drives every operation in-process (Django's WSGI app) with generated valid and
invalid inputs, as a consortium admin and as a data scientist: no response may be a 5xx, and
every response must match the schema (error bodies included: docs/api.md, "Errors").
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from django.contrib.staticfiles.views import serve as serve_static
from django.core import signals
from django.core.management import call_command
from django.db import close_old_connections, transaction
from django.test import override_settings
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from config.wsgi import application
from tests.api_factories import World, build_world, client_for

pytestmark = pytest.mark.django_db

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


def test_schema_generates_without_warnings(tmp_path: Any) -> None:
    call_command(
        "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yaml")
    )


def test_the_plan_spec_field_publishes_the_plan_languages_schema(client: Any) -> None:
    response = client.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    components = json.loads(response.content)["components"]["schemas"]

    for request in ("PlanProposeRequest", "PlanEditRequest"):
        spec = components[request]["properties"]["spec"]
        assert spec["additionalProperties"] is False  # no longer "any object"
        assert spec["required"] == ["model", "schema", "training"]
        training = spec["properties"]["training"]
        assert training["additionalProperties"] is False
        assert training["properties"]["momentum"] == {
            **training["properties"]["momentum"],
            "maximum": 1,
            "exclusiveMaximum": True,
        }
        assert "cannot express" in spec["description"]


def test_swagger_ui_is_served_without_a_cdn(client: Any, rf: Any) -> None:
    response = client.get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "cdn." not in html and "unpkg" not in html and "jsdelivr" not in html
    assets = re.findall(r'(?:src|href)="/static/([^"]+)"', html)
    assert "drf_spectacular_sidecar/swagger-ui-dist/swagger-ui-bundle.js" in assets
    for asset in assets:  # each one ships with the server (collectstatic, or served with DEBUG)
        with override_settings(DEBUG=True):
            served = serve_static(rf.get(f"/static/{asset}"), asset)
        assert served.status_code == 200, asset


@pytest.fixture(scope="module", params=["admin", "scientist"])
def api_world(
    request: pytest.FixtureRequest, django_db_setup: Any, django_db_blocker: Any
) -> Iterator[tuple[World, str, str]]:
    """One world per role for the whole module, rolled back at its end (each test runs in a
    savepoint inside it), and the role whose token the generated requests carry.

    The WSGI handler closes the database connection at the end of each request (Django's test
    client avoids that the same way): here the connection holds the tests' transaction.
    """
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    hashers = override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"])
    try:
        with django_db_blocker.unblock(), hashers, transaction.atomic():
            world = build_world()
            token = client_for(world.user(request.param))._credentials["HTTP_AUTHORIZATION"]
            yield world, request.param, token
            transaction.set_rollback(True)
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


def _real_ids(world: World, path: str) -> dict[str, int]:
    """Existing objects for the path's parameters, so requests reach the views' logic."""
    kind = path.removeprefix("/api/v1/").split("/", 1)[0]
    ids = {
        "consortia": world.gov.consortium.pk,
        "silos": world.pending_silo.pk if "/admit/" in path or "/reject/" in path else None,
        "plans": world.draft.pk if "/submit/" in path else world.submitted.pk,
        "runs": world.run.pk,
    }
    silo = ids["silos"] or world.gov.silos[0].pk
    return {"id": silo if kind == "silos" else ids.get(kind, 1), "number": 1}


@schema.parametrize()
@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_api_honours_its_schema(case: Any, api_world: tuple[World, str, str]) -> None:
    world, role, token = api_world
    if case.meta.phase.name == "coverage" and role != "admin":
        return  # the coverage phase's boundary values once (as the admin) is enough
    if case.path_parameters and not case.meta.generation.mode.is_negative:
        real = _real_ids(world, case.path)
        case.path_parameters = {key: real[key] for key in case.path_parameters}
    case.call_and_validate(
        headers={"Authorization": token},
        checks=[not_a_server_error, response_schema_conformance],
    )
