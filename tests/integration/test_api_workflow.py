"""The governance workflow through the REST API, as its users would drive it."""

from __future__ import annotations

import json

import pytest

from federation.models import AuditEvent, Silo, TrainingPlan
from federation.services.silos import hash_token, silo_authenticate
from tests.api_factories import World, build_world, fast_password_hashing  # noqa: F401
from tests.factories import SCHEMA, PlanFactory, plan_spec

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return build_world()


def test_propose_approve_edit_reapprove_run_and_stop(world: World) -> None:
    scientist, steward = world.client("scientist"), world.client("steward")
    silo = world.gov.silos[0].pk

    proposed = scientist.post(
        "/api/v1/plans/",
        {
            "consortium": world.gov.consortium.pk,
            "name": "thyroid v1",
            "spec": plan_spec(),
            "silos": [silo],
        },
        format="json",
    )
    assert proposed.status_code == 201, proposed.json()
    plan = proposed.json()
    assert plan["status"] == "submitted" and plan["version"] == 1
    assert plan["current_version"]["silos"] == [silo]
    assert plan["approval_state"]["satisfied"] is False
    assert plan["approval_state"]["stewards_missing"] == [world.gov.silos[0].name]
    url = f"/api/v1/plans/{plan['id']}/"

    approved = steward.post(f"{url}approve/", {"plan_hash": plan["plan_hash"]}, format="json")
    assert approved.status_code == 201
    assert approved.json()["role"] == "data_steward"
    assert scientist.get(url).json()["status"] == "approved"

    edited = scientist.put(
        url,
        {"spec": plan_spec(training={**plan_spec()["training"], "lr": 0.01}), "silos": [silo]},
        format="json",
    )
    assert edited.status_code == 200, edited.json()
    v2 = edited.json()
    assert v2["version"] == 2 and v2["status"] == "submitted"
    assert v2["plan_hash"] != plan["plan_hash"]
    assert v2["approval_state"]["satisfied"] is False  # the approval was for version 1's hash
    diff = scientist.get(f"{url}diff/?from=1&to=2").json()
    assert diff["changes"] == [
        {"path": "training.lr", "old": 0.05, "new": 0.01, "added": None, "removed": None}
    ]
    versions = scientist.get(f"{url}versions/").json()["results"]
    assert [v["number"] for v in versions] == [1, 2]
    # The version's spec carries the plan's name and description: its hash covers them.
    assert scientist.get(f"{url}versions/1/").json()["spec"] == {
        **plan_spec(),
        "name": "thyroid v1",
        "description": None,
    }

    stale = steward.post(f"{url}approve/", {"plan_hash": plan["plan_hash"]}, format="json")
    assert stale.status_code == 409
    assert (
        steward.post(f"{url}approve/", {"plan_hash": v2["plan_hash"]}, format="json").status_code
        == 201
    )
    decisions = scientist.get(f"{url}approvals/").json()["results"]
    assert [(d["version"], d["decision"]) for d in decisions] == [(1, "approve"), (2, "approve")]

    started = scientist.post("/api/v1/runs/", {"plan": plan["id"]}, format="json")
    assert started.status_code == 201, started.json()
    run = started.json()
    assert run["plan_hash"] == v2["plan_hash"] and run["version"] == 2
    assert run["status"] == "pending" and run["round_summary"] == []
    again = scientist.post("/api/v1/runs/", {"plan": plan["id"]}, format="json")
    assert again.status_code == 409  # the plan is running

    stopped = scientist.post(f"/api/v1/runs/{run['id']}/stop/")
    assert stopped.status_code == 200 and stopped.json()["status"] == "stopped"
    assert scientist.post(f"/api/v1/runs/{run['id']}/stop/").status_code == 409

    events = world.client("auditor").get(f"/api/v1/audit/events/?since={_index_before(plan['id'])}")
    actions = [e["action"] for e in events.json()["results"]]
    assert actions == [
        "plan.proposed",
        "plan.submitted",
        "plan.approved",
        "plan.fully_approved",
        "plan.edited",
        "plan.approved",
        "plan.fully_approved",
        "run.started",
        "run.stopped",
    ]
    head = scientist.get("/api/v1/audit/head/").json()
    assert head == {
        "index": AuditEvent.objects.last().index,
        "hash": AuditEvent.objects.last().hash,
    }


def _index_before(plan_id: int) -> int:
    first = AuditEvent.objects.filter(object_type="plan", object_id=str(plan_id)).first()
    return first.index - 1


def test_silo_admission_shows_the_token_once_and_never_its_hash(world: World) -> None:
    steward, admin = world.client("steward"), world.client("admin")
    registered = steward.post(
        "/api/v1/silos/",
        {"organization": world.gov.orgs[0].pk, "name": "ward-7", "schema": SCHEMA, "row_count": 5},
        format="json",
    )
    assert registered.status_code == 201
    silo = registered.json()
    assert silo["admission"] == "pending" and silo["has_token"] is False

    admitted = admin.post(f"/api/v1/silos/{silo['id']}/admit/")
    assert admitted.status_code == 200
    token = admitted.json()["token"]
    assert silo_authenticate(token=token).pk == silo["id"]
    assert admin.post(f"/api/v1/silos/{silo['id']}/admit/").status_code == 409

    rotated = steward.post(f"/api/v1/silos/{silo['id']}/rotate-token/").json()["token"]
    assert rotated != token and silo_authenticate(token=token) is None

    stored = Silo.objects.get(pk=silo["id"]).token_hash
    assert stored == hash_token(rotated)
    for client in (admin, steward, world.client("auditor")):
        for url in (f"/api/v1/silos/{silo['id']}/", "/api/v1/silos/"):
            text = client.get(url).content.decode()
            assert stored not in text and rotated not in text and "token_hash" not in text

    revoked = admin.post(f"/api/v1/silos/{silo['id']}/revoke-token/")
    assert revoked.status_code == 200 and revoked.json()["has_token"] is False
    assert Silo.objects.get(pk=silo["id"]).token_hash is None


def test_adding_a_member(world: World) -> None:
    url = f"/api/v1/consortia/{world.gov.consortium.pk}/members/"
    # org 1's auditor (usernames carry the consortium's pk, which depends on what ran before)
    auditor = world.gov.auditors[1].username
    body = {"user": auditor, "organization": world.gov.orgs[0].pk, "role": "data_steward"}
    added = world.client("org_admin").post(url, body, format="json")
    assert added.status_code == 201
    assert added.json()["user"]["username"] == auditor
    assert added.json()["role"] == "data_steward"
    assert world.client("org_admin").post(url, body, format="json").status_code == 409
    # Approving roles are the organisation admin's to grant, never the consortium admin's.
    refused = world.client("admin").post(url, body, format="json")
    assert (
        refused.status_code == 403 and "only an organisation admin of" in refused.json()["detail"]
    )


def test_unknown_usernames_are_only_revealed_to_member_managers(world: World) -> None:
    url = f"/api/v1/consortia/{world.gov.consortium.pk}/members/"
    body = {"user": "nobody-here", "organization": world.gov.orgs[0].pk, "role": "auditor"}
    unknown = world.client("admin").post(url, body, format="json")
    assert unknown.status_code == 400 and list(unknown.json()) == ["user"]
    assert world.client("scientist").post(url, body, format="json").status_code == 403


def test_filters(world: World) -> None:
    client = world.client("admin")
    pending = client.get("/api/v1/silos/?admission=pending").json()["results"]
    assert [s["name"] for s in pending] == ["pending-silo"]
    drafts = client.get("/api/v1/plans/?status=draft").json()["results"]
    assert [p["id"] for p in drafts] == [world.draft.pk]
    runs = client.get(f"/api/v1/runs/?plan={world.run.plan_id}&status=running").json()
    assert [r["id"] for r in runs["results"]] == [world.run.pk]
    assert client.get(f"/api/v1/runs/?plan={world.draft.pk}").json()["count"] == 0
    approvals = client.get("/api/v1/audit/events/?action=plan.approved").json()["results"]
    assert approvals and {e["action"] for e in approvals} == {"plan.approved"}
    last = approvals[-1]["index"]
    later = client.get(f"/api/v1/audit/events/?since={last}").json()["results"]
    assert all(e["index"] > last for e in later)
    bad = client.get("/api/v1/plans/?status=bogus")
    assert bad.status_code == 400 and list(bad.json()) == ["status"]
    foreign = client.get(f"/api/v1/silos/?consortium={world.other.consortium.pk}").json()
    assert foreign["count"] == 0


def test_pages_of_fifty(world: World) -> None:
    for _ in range(48):
        PlanFactory(consortium=world.gov.consortium, status=TrainingPlan.Status.DRAFT)
    client = world.client("auditor")
    first = client.get("/api/v1/plans/").json()
    assert first["count"] == 52 and len(first["results"]) == 50 and first["next"]
    second = client.get("/api/v1/plans/?page=2").json()
    assert len(second["results"]) == 2 and second["next"] is None
    assert client.get("/api/v1/plans/?page=3").status_code == 404


def test_unknown_paths_under_the_api_are_json_404(world: World) -> None:
    for path in ("/api/v1/nothing/", "/api/v1/plans/abc/", "/api/v1/plans/1/bogus/"):
        response = world.client("admin").post(path)
        assert response.status_code == 404
        assert json.loads(response.content) == {"detail": "Not found."}
