"""Uploaded models through the API and the services: who may upload, see and reference one; a
refused upload stores nothing; an evaluation plan naming one is checked at proposal like a run's
version, and its run evaluates the uploaded weights with the uploaded preprocessing (each site's
answer built by the agent's own code)."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from django.conf import settings
from django.test import Client
from sklearn.metrics import roc_auc_score

from fedcore import tensors
from federation import orchestrator
from federation.models import AuditEvent, ModelVersion, Run, UploadedModel
from federation.services.evaluation import evaluation_receive
from federation.services.runs import run_start
from federation.storage import blob_store
from tests.api_factories import client_for
from tests.factories import SCHEMA
from tests.governance_factories import Governed, governed_consortium
from tests.integration.test_evaluation_plans import approved
from tests.integration.test_final_evaluation import evaluate_at, online, site_frame
from tests.uploaded_models import LR, fit_logistic_regression, scores

pytestmark = pytest.mark.django_db


def upload(user: Any, g: Governed, weights: bytes, **fields: Any) -> Any:
    fitted, _ = fit_logistic_regression([site_frame(0)], SCHEMA)
    body = {
        "name": "External sepsis model",
        "description": "trained at a partner hospital",
        "model": json.dumps(LR),
        "schema": json.dumps(SCHEMA),
        "preprocessing": json.dumps(fitted),
        "weights": io.BytesIO(weights),
        **fields,
    }
    return client_for(user).post(
        f"/api/v1/consortia/{g.consortium.pk}/models/", body, format="multipart"
    )


def uploads_on_disk() -> list[Path]:
    return list((Path(settings.QUORUM_BLOB_DIR) / "uploads").rglob("*.safetensors"))


def test_a_data_scientist_uploads_a_model_that_is_stored_hashed_and_audited() -> None:
    g = governed_consortium(2)
    fitted, weights = fit_logistic_regression([site_frame(0), site_frame(1)], SCHEMA)

    response = upload(g.scientists[0], g, weights, preprocessing=json.dumps(fitted))

    assert response.status_code == 201, response.json()
    body = response.json()
    sha = tensors.sha256_hex(weights)
    assert body["checksum"] == sha and body["size_bytes"] == len(weights)
    assert body["uploaded_by"] == g.scientists[0].username and body["model"] == LR
    assert body["signature"] == {
        "linear.bias": ["float32", [1]],
        "linear.weight": ["float32", [1, 3]],
    }
    uploaded = UploadedModel.objects.get(pk=body["id"])
    assert blob_store().get(uploaded.blob_key) == weights
    event = AuditEvent.objects.get(action="model.uploaded", object_id=uploaded.pk)
    assert event.data["sha256"] == sha and event.actor == f"user:{g.scientists[0].username}"
    download = client_for(g.auditors[1]).get(body["download"])
    assert download.status_code == 200 and download["X-Checksum-SHA256"] == sha
    assert b"".join(download.streaming_content) == weights
    listed = client_for(g.stewards[1]).get(f"/api/v1/consortia/{g.consortium.pk}/models/")
    assert [m["id"] for m in listed.json()["results"]] == [uploaded.pk]
    assert upload(g.admin, g, weights).status_code == 201  # the consortium admin may too


@pytest.mark.parametrize(
    ("weights", "field", "words"),
    [
        (lambda s: {**s, "linear.weight": torch.zeros(1, 4)}, "weights", "shape (1, 4)"),
        (lambda s: {**s, "linear.bias": torch.full((1,), float("nan"))}, "weights", "NaN"),
        (
            lambda s: {"linear.w": s["linear.weight"], "linear.bias": s["linear.bias"]},
            "weights",
            "'linear.weight': missing",
        ),
        (lambda s: {k: v.double() for k, v in s.items()}, "weights", "dtype float64"),
        ("pickle", "weights", "never unpickles"),
        ("garbage", "weights", "not a valid safetensors"),
    ],
)
def test_a_refused_upload_names_the_problem_and_stores_nothing(
    weights: Any, field: str, words: str
) -> None:
    g = governed_consortium(1)
    state = tensors.decode_state_dict(fit_logistic_regression([site_frame(0)], SCHEMA)[1])
    if weights == "pickle":
        buffer = io.BytesIO()
        torch.save(state, buffer)
        data = buffer.getvalue()
    elif weights == "garbage":
        data = b"\x00" * 64
    else:
        data = tensors.encode_state_dict(weights(state))
    before = uploads_on_disk()

    response = upload(g.scientists[0], g, data)

    assert response.status_code == 400
    assert words in " ".join(response.json()[field]), response.json()
    assert not UploadedModel.objects.exists() and uploads_on_disk() == before
    assert not AuditEvent.objects.filter(action="model.uploaded").exists()


def test_a_bad_spec_and_a_file_above_the_limit_are_refused_by_field(settings: Any) -> None:
    g = governed_consortium(1)
    _, weights = fit_logistic_regression([site_frame(0)], SCHEMA)

    spec = upload(g.scientists[0], g, weights, model=json.dumps({"kind": "forest"})).json()
    settings.QUORUM_MAX_UPLOADED_MODEL_BYTES = len(weights) - 1
    large = upload(g.scientists[0], g, weights).json()

    assert "unknown model kind 'forest'" in " ".join(spec["model.kind"])
    assert f"the file is {len(weights):,} bytes, above" in " ".join(large["weights"])
    # a body larger than the limit and the other fields' 1 MiB: refused before it is read
    huge = upload(g.scientists[0], g, weights + b"\0" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1))
    assert huge.status_code == 413 and "Request body too large" in huge.json()["detail"]
    assert not UploadedModel.objects.exists() and uploads_on_disk() == []


def test_only_members_with_the_role_upload_and_other_consortia_see_nothing() -> None:
    g, other = governed_consortium(2), governed_consortium(1)
    _, weights = fit_logistic_regression([site_frame(0)], SCHEMA)
    uploaded = upload(g.scientists[0], g, weights).json()

    assert upload(g.stewards[0], g, weights).status_code == 403
    assert upload(g.auditors[0], g, weights).status_code == 403
    assert upload(other.scientists[0], g, weights).status_code == 404
    outsider = client_for(other.scientists[0])
    assert outsider.get(f"/api/v1/uploaded-models/{uploaded['id']}/").status_code == 404
    assert outsider.get(uploaded["download"]).status_code == 404
    assert outsider.get(f"/api/v1/consortia/{g.consortium.pk}/models/").status_code == 404
    assert UploadedModel.objects.count() == 1

    # the other consortium cannot evaluate it either: it reads as missing
    body = {
        "consortium": other.consortium.pk,
        "name": "Borrowed model",
        "spec": evaluation_spec(uploaded),
        "silos": [s.pk for s in other.silos],
    }
    refused = outsider.post("/api/v1/plans/", body, format="json")
    assert refused.status_code == 400
    assert "no model with id" in " ".join(refused.json()["spec.model_version.uploaded"])


def evaluation_spec(uploaded: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    spec = {
        "kind": "evaluation",
        "schema": SCHEMA,
        "model": LR,
        "model_version": {"uploaded": uploaded["id"], "sha256": uploaded["checksum"]},
        "rows": "all",
    }
    return {**spec, **overrides}


def test_an_evaluation_plan_of_an_uploaded_model_is_checked_at_proposal() -> None:
    g = governed_consortium(2)
    _, weights = fit_logistic_regression([site_frame(0)], SCHEMA)
    uploaded = upload(g.scientists[0], g, weights).json()
    api = client_for(g.scientists[1])
    first = {**SCHEMA["columns"][0], "missing": "drop"}
    dropping = {**SCHEMA, "columns": [first, *SCHEMA["columns"][1:]]}

    def refusal(**overrides: Any) -> dict[str, Any]:
        body = {
            "consortium": g.consortium.pk,
            "name": "Evaluate",
            "spec": evaluation_spec(uploaded, **overrides),
            "silos": [s.pk for s in g.silos],
        }
        response = api.post("/api/v1/plans/", body, format="json")
        assert response.status_code == 400
        return response.json()

    wrong_sha = {"uploaded": uploaded["id"], "sha256": "0" * 64}
    assert "exact weights" in " ".join(
        refusal(model_version=wrong_sha)["spec.model_version.sha256"]
    )
    mlp = {"kind": "mlp", "hidden": [4], "activation": "relu"}
    assert "copy the uploaded model's spec" in " ".join(refusal(model=mlp)["spec.model"])
    column = " ".join(refusal(schema=dropping)["spec.schema.columns.0.missing"])
    assert "column 'x1' has missing 'drop'" in column and "uploaded model" in column
    both = {**wrong_sha, "run": 1, "number": 0}
    assert "not both" in " ".join(refusal(model_version=both)["spec.model_version"])


def test_an_evaluation_run_evaluates_the_uploaded_weights_with_its_preprocessing(
    tmp_path: Path,
) -> None:
    g = governed_consortium(3)
    frames = [site_frame(i) for i in range(3)]
    fitted, weights = fit_logistic_regression(frames, SCHEMA)
    uploaded = upload(g.scientists[0], g, weights, preprocessing=json.dumps(fitted)).json()
    files = {}
    for silo, frame in zip(g.silos, frames, strict=True):
        files[silo.pk] = tmp_path / f"{silo.name}.csv"
        frame.to_csv(files[silo.pk], index=False)
    plan = approved(g, evaluation_spec(uploaded))
    run = run_start(actor=g.scientists[0], plan=plan)
    online(g.silos)

    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.EVALUATING and run.preprocessing == fitted
    version = ModelVersion.objects.get(run=run, number=0)
    assert version.checksum == uploaded["checksum"]
    assert blob_store().get(version.blob_key) == weights
    for silo in g.silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()

    assert run.status == Run.Status.COMPLETED, run.error
    y, p = scores(frames, SCHEMA, fitted, weights)
    metrics = run.evaluation["metrics"]
    assert metrics["n"] == len(y) == 240
    assert abs(metrics["auc"] - roc_auc_score(y, p)) <= metrics["auc_error_bound"] + 1e-12
    assert run.evaluation["source"] == {
        "run": None,
        "model_version": None,
        "uploaded": uploaded["id"],
        "name": "External sepsis model",
        "uploaded_by": g.scientists[0].username,
        "sha256": uploaded["checksum"],
    }
    started = AuditEvent.objects.get(action="run.evaluation_plan_started", object_id=run.pk)
    assert started.data["uploaded_model"] == uploaded["id"]
    api = client_for(g.auditors[2]).get(f"/api/v1/runs/{run.pk}/").json()
    assert api["final_evaluation"]["source"]["name"] == "External sepsis model"
    compliance = client_for(g.auditors[2]).get(f"/api/v1/runs/{run.pk}/compliance/").json()
    assert compliance["evaluated"]["source"]["uploaded_by"] == g.scientists[0].username
    pdf = client_for(g.auditors[2]).get(f"/api/v1/runs/{run.pk}/compliance.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    browser = Client()
    browser.force_login(g.auditors[2])
    for page in (f"/runs/{run.pk}/", f"/runs/{run.pk}/compliance/"):
        html = browser.get(page).content.decode()
        assert "“External sepsis model”, uploaded by " + g.scientists[0].username in html, page
        assert uploaded["checksum"][:10] in html
    card = browser.get(f"/models/{version.pk}/card/").content.decode()
    assert "“External sepsis model”, uploaded by " + g.scientists[0].username in card
    card_json = client_for(g.auditors[2]).get(f"/api/v1/models/{version.pk}/card/").json()
    assert card_json["model"]["source"]["uploaded"] == uploaded["id"]


def test_the_dashboard_uploads_a_model_and_starts_its_evaluation_plan() -> None:
    g, other = governed_consortium(2), governed_consortium(1)
    fitted, weights = fit_logistic_regression([site_frame(0), site_frame(1)], SCHEMA)
    scientist, steward, outsider = Client(), Client(), Client()
    scientist.force_login(g.scientists[0])
    steward.force_login(g.stewards[0])
    outsider.force_login(other.scientists[0])
    url = f"/consortia/{g.consortium.pk}/models/upload/"
    form = {
        "name": "Dashboard model",
        "description": "",
        "model": json.dumps(LR),
        "schema": json.dumps(SCHEMA),
        "preprocessing": json.dumps(fitted),
    }

    assert (
        'id="upload-model-link"'
        in scientist.get(f"/consortia/{g.consortium.pk}/models/").content.decode()
    )
    assert (
        'id="upload-model-link"'
        not in steward.get(f"/consortia/{g.consortium.pk}/models/").content.decode()
    )
    assert steward.get(url).status_code == 403 and outsider.get(url).status_code == 404
    bad = tensors.encode_state_dict(
        {"linear.weight": torch.zeros(1, 5), "linear.bias": torch.zeros(1)}
    )
    refused = scientist.post(url, {**form, "weights": io.BytesIO(bad)})
    assert refused.status_code == 400
    assert "shape (1, 5), expected (1, 3)" in " ".join(refused.context["form"].errors["weights"])
    assert not UploadedModel.objects.exists()
    kind = scientist.post(
        url, {**form, "model": '{"kind": "forest"}', "weights": io.BytesIO(weights)}
    )
    assert "unknown model kind" in " ".join(kind.context["form"].errors["model"])

    done = scientist.post(url, {**form, "weights": io.BytesIO(weights)})

    assert done.status_code == 302
    uploaded = UploadedModel.objects.get()
    assert uploaded.checksum == tensors.sha256_hex(weights) and uploaded.name == "Dashboard model"
    listing = steward.get(f"/consortia/{g.consortium.pk}/models/").content.decode()
    assert "Dashboard model" in listing and uploaded.checksum in listing
    assert outsider.get(f"/uploaded-models/{uploaded.pk}/download/").status_code == 404
    file = steward.get(f"/uploaded-models/{uploaded.pk}/download/")
    assert b"".join(file.streaming_content) == weights
    start = scientist.get(
        f"/consortia/{g.consortium.pk}/plans/new/?evaluate_uploaded={uploaded.pk}"
    )
    template = start.context["form"].initial["spec"]
    assert template["model_version"] == {"uploaded": uploaded.pk, "sha256": uploaded.checksum}
    proposed = scientist.post(
        f"/consortia/{g.consortium.pk}/plans/new/",
        {
            "name": start.context["form"].initial["name"],
            "spec": json.dumps(template),
            "silos": [s.pk for s in g.silos],
            "submit": "on",
        },
    )
    assert proposed.status_code == 302, proposed.content.decode()[-2000:]
