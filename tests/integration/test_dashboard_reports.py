"""Model registry downloads, model cards, the audit log viewer and compliance reports."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
from django.test import Client

from fedcore import tensors
from federation.models import AuditEvent, ModelVersion
from federation.services.audit import audit_head
from federation.storage import blob_store
from tests.dashboard_factories import World, build_world

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return build_world()


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def final_model(world: World) -> ModelVersion:
    return ModelVersion.objects.filter(run=world.run).order_by("-number").first()


def test_registry_lists_every_version_with_its_checksum(world: World) -> None:
    html = (
        client_for(world.user("steward"))
        .get(f"/consortia/{world.gov.consortium.pk}/models/")
        .content.decode()
    )
    for version in ModelVersion.objects.filter(run=world.run):
        assert version.checksum in html
        assert f'href="/models/{version.pk}/download/"' in html
    assert "final" in html


def test_download_streams_the_safetensors_file_it_describes(world: World) -> None:
    model = final_model(world)
    response = client_for(world.user("org_admin")).get(f"/models/{model.pk}/download/")
    assert response.status_code == 200
    assert response["Content-Disposition"].startswith("attachment; filename=")
    assert response["Content-Disposition"].endswith(
        f'-run{world.run.pk}-v{model.number}.safetensors"'
    )
    data = b"".join(response.streaming_content)
    assert hashlib.sha256(data).hexdigest() == model.checksum == response["X-Checksum-SHA256"]
    state = tensors.decode_state_dict(data)
    assert sorted(state) == sorted(model.signature)


def test_a_model_file_that_no_longer_matches_its_checksum_is_not_sent(world: World) -> None:
    model = final_model(world)
    blob_store().put(model.blob_key, b"tampered")
    response = client_for(world.user("auditor")).get(f"/models/{model.pk}/download/")
    assert response.status_code == 500
    assert "does not match its recorded SHA-256" in response.content.decode()


def test_model_card_json_holds_provenance_metrics_and_unrecorded_sections(world: World) -> None:
    first = ModelVersion.objects.get(run=world.run, number=1)
    card = client_for(world.user("scientist")).get(f"/models/{first.pk}/card.json").json()
    assert card["model"]["checksum_sha256"] == first.checksum
    assert card["model"]["final"] is False
    assert card["plan"]["plan_hash"] == world.run.plan_hash
    assert {a["organization"] for a in card["approvals"]} == {o.name for o in world.gov.orgs}
    assert {a["decision"] for a in card["approvals"]} == {"approve"}
    assert [c["name"] for c in card["data_schema"]["columns"]] == ["x1", "x2", "x3"]
    # v1 is evaluated by round 2 (global scope); round 1 holds the local models that made it.
    assert card["metrics"]["evaluation"]["auc"] == pytest.approx(0.7)
    assert card["metrics"]["training_round"]["local"]["auc"] == pytest.approx(0.75)
    assert card["privacy"]["mode"] == "none"
    assert set(card["privacy"]["epsilon_spent"].values()) == {0.0}
    assert card["fairness"]["status"].startswith("not applicable: the plan declares no fairness")
    assert card["fairness"]["report"] is None


def test_model_card_page_reads_well(world: World) -> None:
    model = final_model(world)
    html = client_for(world.user("steward")).get(f"/models/{model.pk}/card/").content.decode()
    assert world.run.plan_hash in html and model.checksum in html
    assert "Not evaluated: no later round evaluated this version." in html
    assert 'id="privacy"' in html and "0 (not applicable)" in html
    assert 'id="fairness"' in html and "declares no fairness section" in html
    assert f'href="/models/{model.pk}/download/"' in html


def test_audit_log_shows_the_consortiums_events_and_an_intact_chain(world: World) -> None:
    html = (
        client_for(world.user("auditor"))
        .get(f"/consortia/{world.gov.consortium.pk}/audit/")
        .content.decode()
    )
    assert "Chain intact." in html
    assert audit_head()["hash"] in html
    assert "plan.fully_approved" in html and "run.started" in html
    # Events of the other consortium are not listed.
    theirs = AuditEvent.objects.filter(consortium_id=world.other.consortium.pk)
    for event in theirs:
        assert f'<td class="num">{event.index}</td>' not in html


def test_audit_log_filters_by_action_and_object(world: World) -> None:
    client = client_for(world.user("admin"))
    url = f"/consortia/{world.gov.consortium.pk}/audit/"
    html = client.get(url, {"action": "round.completed"}).content.decode()
    assert html.count("<code>round.completed</code>") == 2
    assert "<code>plan.proposed</code>" not in html
    html = client.get(url, {"object_type": "run", "object_id": str(world.run.pk)}).content.decode()
    assert "<code>run.started</code>" in html and "<code>plan.proposed</code>" not in html


def test_a_rewritten_event_shows_as_a_broken_chain(world: World) -> None:
    event = AuditEvent.objects.filter(action="plan.approved").first()
    AuditEvent.objects.filter(pk=event.pk).update(data={**event.data, "role": "org_admin"})
    html = (
        client_for(world.user("auditor"))
        .get(f"/consortia/{world.gov.consortium.pk}/audit/")
        .content.decode()
    )
    assert f"Chain broken at event #{event.index}." in html
    assert "hash does not match its content" in html


def test_compliance_report_has_plan_approvals_data_privacy_and_audit_trail(world: World) -> None:
    run = world.run
    response = client_for(world.user("auditor")).get(f"/runs/{run.pk}/compliance/")
    html = response.content.decode()
    assert run.plan_hash in html and f"version {run.version.number}" in html
    for steward in world.gov.stewards:
        assert steward.username in html
    for silo in world.gov.silos:
        assert silo.name in html
    assert '<td class="num">100</td>' in html  # rows registered by each silo
    assert "0 (not applicable)" in html
    assert "The audit chain verifies" in html and audit_head()["hash"] in html
    for action in ("plan.proposed", "plan.fully_approved", "run.started", "run.finished"):
        assert f"<code>{action}</code>" in html
    # Only this run's and its plan's events: not the other plan of the consortium.
    assert "Sepsis early warning" not in html
    assert "data-print" in html


def test_privacy_spent_is_the_runs_ledger_composed_per_silo(world: World) -> None:
    from federation import ledger
    from federation.models import Silo

    silo = world.gov.silos[0]
    Silo.objects.filter(pk=silo.pk).update(epsilon_budget=8.0)
    silo.refresh_from_db()
    for round_number in (1, 2):
        ledger.ledger_append(
            silo=silo,
            run=world.run,
            round_number=round_number,
            mechanism="sample",
            noise_multiplier=1.1,
            sample_rate=0.1,
            steps=20,
            delta=1e-5,
        )
    spent = ledger.composed_epsilon([(1.1, 0.1, 20)] * 2, 1e-5)
    assert 0 < spent < 8.0

    card = (
        client_for(world.user("steward")).get(f"/models/{final_model(world).pk}/card.json").json()
    )
    assert card["privacy"]["epsilon_spent"][silo.name] == pytest.approx(spent)
    assert card["privacy"]["epsilon_spent"][world.gov.silos[1].name] == 0.0

    html = client_for(world.user("steward")).get(f"/silos/{silo.pk}/").content.decode()
    assert "No budget set" not in html
    assert f"Spent so far</dt><dd>ε = {spent:.4f}" in html
    assert f"Remaining</dt><dd>ε = {8.0 - spent:.4f}" in html
    assert "Sample-level DP" in html  # the ledger's entries
