"""Bad input is a 4xx with a message naming the problem, and nothing is saved."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from django.apps import apps
from django.core.exceptions import RequestDataTooBig
from rest_framework.test import APIClient

from federation.api.exceptions import api_exception_handler
from federation.models import Silo, TrainingPlan
from tests.api_factories import World, build_world, fast_password_hashing  # noqa: F401
from tests.factories import SCHEMA, plan_spec

pytestmark = pytest.mark.django_db


def row_counts() -> dict[str, int]:
    """Rows of every federation model (audit events and API tokens included)."""
    counts = {m.__name__: m.objects.count() for m in apps.get_app_config("federation").get_models()}
    return counts


@pytest.fixture
def world() -> World:
    return build_world()


@pytest.fixture
def unchanged(world: World) -> Iterator[None]:
    """Fails the test if any row was added, removed or (for silos and plans) changed."""
    for role in ("admin", "org_admin", "steward", "scientist", "auditor", "other"):
        world.client(role)  # tokens first
    before = row_counts()
    silos = list(Silo.objects.values().order_by("pk"))
    plans = list(TrainingPlan.objects.values().order_by("pk"))
    yield
    assert row_counts() == before
    assert list(Silo.objects.values().order_by("pk")) == silos
    assert list(TrainingPlan.objects.values().order_by("pk")) == plans


def post_raw(client: APIClient, url: str, body: bytes | str, content_type: str) -> Any:
    return client.generic("POST", url, body, content_type=content_type)


def silo_body(world: World, **overrides: Any) -> dict[str, Any]:
    body = {
        "organization": world.gov.orgs[0].pk,
        "name": "new-silo",
        "schema": SCHEMA,
        "row_count": 10,
        "location": "s3://bucket/data",
    }
    return {**body, **overrides}


def plan_body(world: World, **overrides: Any) -> dict[str, Any]:
    body = {
        "consortium": world.gov.consortium.pk,
        "name": "new plan",
        "spec": plan_spec(seed=21),
        "silos": [world.gov.silos[0].pk],
    }
    return {**body, **overrides}


@pytest.mark.parametrize(
    "body", ["{", '{"name": }', "[1, 2", '{"row_count": NaN}', b"\xff\xfe{}", "nul\x00"]
)
def test_malformed_json_is_400(world: World, unchanged: None, body: str | bytes) -> None:
    response = post_raw(world.client("steward"), "/api/v1/silos/", body, "application/json")
    assert response.status_code == 400
    assert response.json()["detail"].startswith("JSON parse error")


def test_a_body_that_is_not_an_object_is_400(world: World, unchanged: None) -> None:
    response = world.client("steward").post("/api/v1/silos/", [silo_body(world)], format="json")
    assert response.status_code == 400
    assert "Expected a dictionary" in response.json()["non_field_errors"][0]


def test_wrong_types_are_400_per_field(world: World, unchanged: None) -> None:
    response = world.client("steward").post(
        "/api/v1/silos/",
        {
            "organization": "first",
            "name": 5,
            "schema": ["not", "an", "object"],
            "row_count": "10",
            "location": None,
            "description": True,
        },
        format="json",
    )
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {"organization", "name", "schema", "row_count", "location", "description"}
    assert errors["organization"] == ["Incorrect type. Expected pk value, received str."]
    assert errors["name"] == ["Not a valid string."]
    assert errors["schema"] == ["Expected a JSON object."]
    assert errors["row_count"] == ["A valid integer is required."]


def test_wrong_types_in_a_plan_are_400_per_field(world: World, unchanged: None) -> None:
    response = world.client("scientist").post(
        "/api/v1/plans/",
        {"consortium": True, "name": ["x"], "spec": "{}", "silos": "1", "submit": "yes"},
        format="json",
    )
    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {"consortium", "name", "spec", "silos", "submit"}
    assert errors["silos"] == ["Expected a list of ids."]
    assert errors["submit"] == ["Must be true or false."]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("row_count", 10**30, "Ensure this value is less than or equal to 2147483647."),
        ("row_count", -1, "Ensure this value is greater than or equal to 0."),
        ("row_count", 1.5, "A valid integer is required."),
        ("name", "x" * 101, "Ensure this field has no more than 100 characters."),
        ("organization", 10**30, f'Invalid pk "{10**30}" - object does not exist.'),
        ("schema", {"columns": "\x00"}, "NUL characters are not allowed."),
    ],
)
def test_out_of_range_values_are_400(
    world: World, unchanged: None, field: str, value: Any, message: str
) -> None:
    response = world.client("steward").post(
        "/api/v1/silos/", silo_body(world, **{field: value}), format="json"
    )
    assert response.status_code == 400
    assert response.json() == {field: [message]}


def test_ids_of_invisible_objects_are_refused_like_missing_ones(
    world: World, unchanged: None
) -> None:
    foreign = world.other.silos[0].pk
    response = world.client("scientist").post(
        "/api/v1/plans/", plan_body(world, silos=[foreign, 10**9]), format="json"
    )
    assert response.status_code == 400
    assert response.json() == {"silos": [f"No such objects: {foreign}, {10**9}."]}


def test_unknown_fields_are_400_naming_them(world: World, unchanged: None) -> None:
    response = world.client("scientist").post(
        "/api/v1/plans/", plan_body(world, colour="red", approve=True), format="json"
    )
    assert response.status_code == 400
    assert response.json() == {"colour": ["Unknown field."], "approve": ["Unknown field."]}


def test_unknown_fields_are_reported_with_the_other_errors(world: World, unchanged: None) -> None:
    response = world.client("steward").post(
        "/api/v1/silos/", {"name": "x", "token_hash": "0" * 64}, format="json"
    )
    assert response.status_code == 400
    errors = response.json()
    assert errors["token_hash"] == ["Unknown field."]
    assert errors["organization"] == ["This field is required."]


def test_an_action_without_input_refuses_any_field(world: World, unchanged: None) -> None:
    response = world.client("admin").post(
        f"/api/v1/silos/{world.pending_silo.pk}/admit/", {"admission": "admitted"}, format="json"
    )
    assert response.status_code == 400
    assert response.json() == {"admission": ["Unknown field."]}


def test_oversize_body_is_413_with_a_clear_message(world: World, unchanged: None) -> None:
    body = json.dumps(plan_body(world, description="x" * (1 << 20)))
    response = post_raw(world.client("scientist"), "/api/v1/plans/", body, "application/json")
    assert response.status_code == 413
    assert response.json() == {"detail": "Request body too large: the limit is 1048576 bytes."}


def test_a_body_just_under_the_limit_is_parsed(world: World, unchanged: None) -> None:
    body = json.dumps(silo_body(world, description="x" * ((1 << 20) - 1000), row_count="x"))
    assert len(body) < 1 << 20
    response = post_raw(world.client("steward"), "/api/v1/silos/", body, "application/json")
    assert response.status_code == 400
    assert response.json() == {"row_count": ["A valid integer is required."]}


def test_oversize_form_body_of_a_session_user_is_415_not_500(world: World, unchanged: None) -> None:
    # The CSRF check of session authentication reads the form through DRF's parsers (JSON only),
    # so an oversize form body is refused as an unsupported media type before it is read.
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(world.user("steward"))
    client.cookies["csrftoken"] = "a" * 32  # a cookie, so the check goes on to read the form
    body = "name=" + "x" * (2 << 20)
    response = post_raw(client, "/api/v1/silos/", body, "application/x-www-form-urlencoded")
    assert response.status_code == 415


def test_djangos_own_body_limit_error_is_413_too() -> None:
    # Raised by HttpRequest.body / .POST past DATA_UPLOAD_MAX_MEMORY_SIZE, should any code read
    # the body Django's way.
    response = api_exception_handler(RequestDataTooBig("too big"), {})
    assert response is not None and response.status_code == 413
    assert response.data == {"detail": "Request body too large: the limit is 1048576 bytes."}


def test_bodies_other_than_json_are_415(world: World, unchanged: None) -> None:
    response = post_raw(
        world.client("steward"), "/api/v1/silos/", "name=x", "application/x-www-form-urlencoded"
    )
    assert response.status_code == 415
    assert "Unsupported media type" in response.json()["detail"]


def test_service_validation_errors_are_400_per_field(world: World, unchanged: None) -> None:
    spec = plan_spec(seed=21)
    spec["training"]["lr"] = 50
    response = world.client("scientist").post(
        "/api/v1/plans/", plan_body(world, spec=spec), format="json"
    )
    assert response.status_code == 400
    assert list(response.json()) == ["spec.training.lr"]


def test_a_stale_hash_is_409_naming_both_hashes(world: World, unchanged: None) -> None:
    current = world.submitted.current_version.spec_hash
    response = world.client("steward").post(
        f"/api/v1/plans/{world.submitted.pk}/approve/", {"plan_hash": "f" * 64}, format="json"
    )
    assert response.status_code == 409
    detail = response.json()["detail"]
    assert "f" * 64 in detail and current in detail


def test_a_refused_role_is_403_with_the_reason(world: World, unchanged: None) -> None:
    response = world.client("auditor").post("/api/v1/plans/", plan_body(world), format="json")
    assert response.status_code == 403
    assert "data_scientist" in response.json()["detail"]


def test_session_clients_need_the_csrf_token(world: World) -> None:
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(world.user("steward"))
    assert client.get("/api/v1/me/").status_code == 200
    refused = client.post("/api/v1/silos/", silo_body(world), format="json")
    assert refused.status_code == 403
    assert "CSRF" in refused.json()["detail"]


def test_a_good_request_after_the_bad_ones_saves_once(world: World) -> None:
    client = world.client("steward")
    assert (
        client.post("/api/v1/silos/", silo_body(world, extra=1), format="json").status_code == 400
    )
    response = client.post("/api/v1/silos/", silo_body(world), format="json")
    assert response.status_code == 201
    assert "token_hash" not in response.json() and response.json()["has_token"] is False
    assert Silo.objects.filter(name="new-silo").count() == 1


def test_a_silo_shows_the_model_kinds_its_agent_announced(world: World) -> None:
    kind = {"name": "resmlp", "version": "0.1.0", "sha256": "ab" * 32}
    silo = world.gov.silos[0]
    Silo.objects.filter(pk=silo.pk).update(model_kinds=[kind])
    response = world.client("scientist").get(f"/api/v1/silos/{silo.pk}/")
    assert response.status_code == 200 and response.json()["model_kinds"] == [kind]
