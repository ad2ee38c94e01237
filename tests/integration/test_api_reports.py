"""Reports over the REST API with API tokens: the same content and permissions as the pages.

Fairness (per round and latest), privacy (a run's spend, the consortium's budget report), model
versions (ids, detail, safetensors download with its checksum, ONNX, card JSON), compliance JSON
and the /api/v1/ index.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from fedcore import tensors
from federation import ledger
from federation.models import FairnessReport, ModelVersion, Round, Run
from federation.services.api_tokens import api_token_create
from tests.api_factories import fast_password_hashing  # noqa: F401
from tests.dashboard_factories import World, build_world
from tests.integration.test_dashboard_fairness import COUNTS, fairness_run

pytestmark = pytest.mark.django_db

MEMBERS = ["admin", "org_admin", "steward", "scientist", "auditor"]


@pytest.fixture
def world() -> World:
    return build_world()


def api(user: Any) -> APIClient:
    """A client sending a fresh API token of the user (no session: as the CLI would)."""
    client = APIClient()
    created = api_token_create(actor=user, user=user, name="reports")
    client.credentials(HTTP_AUTHORIZATION=f"Token {created.token}")
    return client


def final_model(run: Run) -> ModelVersion:
    return ModelVersion.objects.filter(run=run).order_by("-number").first()


def test_run_models_list_gives_ids_that_the_model_endpoints_take(world: World) -> None:
    client = api(world.user("scientist"))
    body = client.get(f"/api/v1/runs/{world.run.pk}/models/").json()
    ids = [row["id"] for row in body["results"]]
    assert sorted(ids) == sorted(
        ModelVersion.objects.filter(run=world.run).values_list("pk", flat=True)
    )
    detail = client.get(f"/api/v1/models/{ids[-1]}/").json()
    assert detail["run"] == world.run.pk
    assert detail["links"]["download"] == f"/api/v1/models/{ids[-1]}/download/"
    assert detail["links"]["onnx"] == f"/api/v1/models/{ids[-1]}/onnx/"
    assert detail["links"]["card"] == f"/api/v1/models/{ids[-1]}/card/"


@pytest.mark.parametrize("role", MEMBERS)
def test_download_matches_its_checksum_header_and_the_registry(world: World, role: str) -> None:
    model = final_model(world.run)
    response = api(world.user(role)).get(f"/api/v1/models/{model.pk}/download/")
    assert response.status_code == 200
    data = b"".join(response.streaming_content)
    assert hashlib.sha256(data).hexdigest() == response["X-Checksum-SHA256"] == model.checksum
    assert response["Content-Disposition"].endswith(
        f'-run{world.run.pk}-v{model.number}.safetensors"'
    )
    assert sorted(tensors.decode_state_dict(data)) == sorted(model.signature)


def test_a_tampered_model_file_is_not_sent(world: World) -> None:
    from federation.storage import blob_store

    model = final_model(world.run)
    blob_store().put(model.blob_key, b"not the model")
    response = api(world.user("steward")).get(f"/api/v1/models/{model.pk}/download/")
    assert response.status_code == 500
    assert "does not match its recorded SHA-256" in response.json()["detail"]


def test_other_consortia_get_404_for_every_report(world: World) -> None:
    model = final_model(world.run)
    client = api(world.user("outsider"))
    for url in (
        f"/api/v1/runs/{world.run.pk}/fairness/",
        f"/api/v1/runs/{world.run.pk}/privacy/",
        f"/api/v1/runs/{world.run.pk}/compliance/",
        f"/api/v1/consortia/{world.gov.consortium.pk}/privacy/",
        f"/api/v1/models/{model.pk}/",
        f"/api/v1/models/{model.pk}/download/",
        f"/api/v1/models/{model.pk}/onnx/",
        f"/api/v1/models/{model.pk}/card/",
    ):
        response = client.get(url)
        assert response.status_code == 404, url
        assert response.json() == {"detail": "Not found."}


def test_fairness_report_has_every_round_and_the_pages_tables(world: World) -> None:
    run = fairness_run(world)
    for role in MEMBERS:
        response = api(world.user(role)).get(f"/api/v1/runs/{run.pk}/fairness/")
        assert response.status_code == 200, role
    body = response.json()
    assert [r["round"] for r in body["reports"]] == sorted(COUNTS)
    assert body["latest"]["round"] == max(COUNTS)
    assert body["settings"]["sensitive_attribute"] == "sex"
    (attribute,) = body["attributes"]
    assert attribute["name"] == "sex" and attribute["primary"]
    assert {row["group"] for row in attribute["rows"]} == {"F", "M"}
    assert {d["label"] for d in attribute["differences"]} == {
        "Demographic parity difference",
        "Equalized odds difference",
    }
    # Round 1's disparity above the plan's limit is flagged, with the model it was about.
    assert any(f["round"] == 1 and f["model_version"] == 0 for f in body["flags"])
    page = api(world.user("auditor")).get(f"/runs/{run.pk}/fairness/")
    assert page.status_code == 302  # an API token is no dashboard session


def test_a_run_without_fairness_section_says_so(world: World) -> None:
    body = api(world.user("scientist")).get(f"/api/v1/runs/{world.run.pk}/fairness/").json()
    assert body["reports"] == [] and body["latest"] is None
    assert "not applicable" in body["note"]


def test_privacy_reports_of_the_run_and_the_consortium(world: World) -> None:
    run = fairness_run(world)
    silo = world.gov.silos[0]
    client = api(world.user("steward"))
    spend = client.get(f"/api/v1/runs/{run.pk}/privacy/").json()
    assert spend["epsilon_spent"][silo.name] == pytest.approx(1.0)
    report = client.get(f"/api/v1/consortia/{world.gov.consortium.pk}/privacy/").json()
    row = next(r for r in report["silos"] if r["silo"] == silo.pk)
    assert row["budget"] == 4.0
    assert row["spent"] == pytest.approx(1.0)
    assert row["remaining"] == pytest.approx(3.0)
    assert [e["mechanism"] for e in row["entries"]] == ["fairness"]
    assert report["runs"][0]["run"] == run.pk
    assert report["pending"][0]["name"] == world.submitted.name


def test_model_card_json_is_the_pages_card(world: World) -> None:
    run = fairness_run(world)
    v1 = ModelVersion.objects.get(run=run, number=1)
    card = api(world.user("scientist")).get(f"/api/v1/models/{v1.pk}/card/").json()
    assert card["model"]["id"] == v1.pk
    assert card["model"]["checksum_sha256"] == v1.checksum
    assert card["model"]["final"] is False
    assert card["plan"]["plan_hash"] == run.plan_hash
    assert card["approvals"] and card["silos"]
    assert card["deployment"]["feature_names"] == ["x1", "x2", "x3"]
    assert card["fairness"]["report"]["model_version"] == 1
    assert card["metrics"]["evaluation"]
    final = final_model(run)
    assert (
        api(world.user("auditor")).get(f"/api/v1/models/{final.pk}/card/").json()["model"]["final"]
    )


def test_onnx_export_loads_and_gives_the_models_logits(world: World) -> None:
    import onnxruntime
    import torch

    from fedcore.models import build_model
    from federation.storage import blob_store

    run = fairness_run(world)
    version = final_model(run)
    response = api(world.user("org_admin")).get(f"/api/v1/models/{version.pk}/onnx/")
    assert response.status_code == 200
    assert response["X-Source-Checksum-SHA256"] == version.checksum
    model = build_model(run.version.spec["model"], 3, seed=0)
    model.load_state_dict(tensors.decode_state_dict(blob_store().get(version.blob_key)))
    model.eval()
    features = np.random.default_rng(2).normal(size=(4, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(features)).numpy()
    (got,) = onnxruntime.InferenceSession(response.content).run(None, {"features": features})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_onnx_of_a_run_without_preprocessing_is_a_409_saying_why(world: World) -> None:
    Run.objects.filter(pk=world.run.pk).update(preprocessing=None)
    model = final_model(world.run)
    response = api(world.user("steward")).get(f"/api/v1/models/{model.pk}/onnx/")
    assert response.status_code == 409
    assert "no fitted preprocessing" in response.json()["detail"]


def test_compliance_report_for_auditors_and_admins_only(world: World) -> None:
    url = f"/api/v1/runs/{world.run.pk}/compliance/"
    for role in ("org_admin", "steward", "scientist"):
        assert api(world.user(role)).get(url).status_code == 403, role
    body = api(world.user("auditor")).get(url).json()
    assert api(world.user("admin")).get(url).status_code == 200
    assert body["run"]["id"] == world.run.pk
    assert body["run"]["plan_hash"] == world.run.plan_hash
    assert body["approval_state"]["satisfied"] is True
    assert {d["decision"] for d in body["decisions"]} == {"approve"}
    assert {row["silo"] for row in body["data_used"]} == {s.name for s in world.gov.silos}
    assert any(e["action"] == "run.finished" for e in body["audit_events"])
    assert body["audit_verification"]["ok"] is True
    assert body["printable"] == f"/runs/{world.run.pk}/compliance/"


def test_index_lists_every_endpoint_with_its_methods() -> None:
    body = APIClient().get("/api/v1/").json()
    endpoints = {e["url"]: e for e in body["endpoints"]}
    assert endpoints["/api/v1/runs/{id}/fairness/"]["methods"] == ["GET"]
    assert endpoints["/api/v1/runs/"]["methods"] == ["GET", "POST"]
    assert endpoints["/api/v1/models/{id}/download/"]["name"] == "model-download"
    assert "/api/v1/" not in endpoints
    assert body["schema"] == "/api/schema/"


def _count(client: APIClient, url: str) -> int:
    with CaptureQueriesContext(connection) as queries:
        assert client.get(url).status_code == 200
    return len(queries)


def test_fairness_and_privacy_reports_cost_constant_queries(
    world: World, django_assert_num_queries
) -> None:
    run = fairness_run(world)
    client = api(world.user("steward"))
    fairness = f"/api/v1/runs/{run.pk}/fairness/"
    privacy = f"/api/v1/consortia/{world.gov.consortium.pk}/privacy/"
    client.get("/api/v1/me/")  # the token's first use writes its last_used_at: not counted
    few = (_count(client, fairness), _count(client, privacy))
    report = FairnessReport.objects.filter(round__run=run).last()
    silo = world.gov.silos[0]
    for number in range(3, 13):
        round_ = Round.objects.create(run=run, number=number, deadline=report.round.deadline)
        FairnessReport.objects.create(round=round_, report={**report.report, "round": number})
        ledger.ledger_append(
            silo=silo,
            run=run,
            round_number=number,
            mechanism="fairness",
            noise_multiplier=1.0,
            sample_rate=1.0,
            steps=1,
            delta=1e-5,
            epsilon_pure=0.1,
        )
    with django_assert_num_queries(few[0]):
        assert len(client.get(fairness).json()["reports"]) == 12
    with django_assert_num_queries(few[1]):
        client.get(privacy)
