"""The compliance report as a PDF: over the API (?format=pdf and compliance.pdf, API tokens) and
from the dashboard's "Download PDF" button; the same permissions and the same facts as the JSON."""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from fedcore import approvals, signing
from federation.models import Approval
from federation.pdf import MONO
from tests.api_factories import fast_password_hashing  # noqa: F401
from tests.dashboard_factories import World, build_world
from tests.integration.test_api_reports import api
from tests.integration.test_dashboard_fairness import fairness_run
from tests.pdf_reading import column_text, page_text, pypdf_text, read_pdf

pytestmark = pytest.mark.django_db


@pytest.fixture
def world() -> World:
    return build_world()


def signed_fairness_run(world: World) -> Any:
    """A finished run with a fairness report, one of whose approvals carries the steward's
    Ed25519 signature (as `quorum-agent steward-key sign` makes it)."""
    run = fairness_run(world)
    approval = Approval.objects.filter(version=run.version).select_related("organization").first()
    approval.signature = approvals.sign_approval(
        signing.generate_private_key(),
        consortium=run.plan.consortium.name,
        organization=approval.organization.name,
        plan_hash=run.plan_hash,
    )
    approval.save(update_fields=["signature"])
    return run


def test_pdf_has_the_facts_of_the_json(world: World) -> None:
    run = signed_fairness_run(world)
    client = api(world.user("auditor"))
    report = client.get(f"/api/v1/runs/{run.pk}/compliance/").json()
    assert report["pdf"] == f"/api/v1/runs/{run.pk}/compliance.pdf"

    response = client.get(f"/api/v1/runs/{run.pk}/compliance/?format=pdf")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/pdf"
    assert f"compliance-run{run.pk}-{run.plan_hash[:12]}.pdf" in response["Content-Disposition"]
    data = response.content
    pages, runs = read_pdf(data)
    text = page_text(runs)

    assert f"Compliance report: run {run.pk} of {run.plan.name}" in text
    assert run.plan_hash in text
    # Every decision, and the signature whole (broken over lines in its column).
    signature_column = min(r.x for r in runs if r.font == MONO and r.text.startswith("kind:"))
    signatures = column_text(runs, signature_column).replace(" ", "")
    signed = [d for d in report["decisions"] if d["signature"]]
    assert len(signed) == 1
    for key in ("key", "signature", "signed_at"):
        assert f"{key}:{signed[0]['signature'][key]}".replace(" ", "") in signatures
    assert text.count("none (approved without a signature)") == len(report["decisions"]) - 1
    for decision in report["decisions"]:
        assert decision["user"] in text and decision["organization"] in text
    # Privacy spent per silo, as the JSON has it.
    for silo, eps in report["privacy"]["epsilon_spent"].items():
        assert f"{silo}\n{eps:.4f}" in text
    # The fairness summary: each difference with its limit.
    summary = report["fairness"]["report"]
    for metric in summary["metrics"]:
        assert f"{metric['label']}\n{metric['value']:.4f}" in text
    assert f"Threshold flags over the run: {summary['flags_in_run']}" in text
    # The audit trail's head and every event of the run.
    assert f"#{report['audit_head']['index']}" in text
    assert report["audit_head"]["hash"] in text
    hashes = column_text(runs, max(r.x for r in runs if r.font == MONO))
    for event in report["audit_events"]:
        assert event["hash"] in hashes
    assert f"page {pages} of {pages}" in text
    extracted = pypdf_text(data)
    if extracted is not None:
        assert run.plan_hash in extracted.replace("\n", "")


def test_pdf_keeps_the_json_permissions(world: World) -> None:
    run = world.run
    for url in (
        f"/api/v1/runs/{run.pk}/compliance/?format=pdf",
        f"/api/v1/runs/{run.pk}/compliance.pdf",
    ):
        for role in ("org_admin", "steward", "scientist"):
            response = api(world.user(role)).get(url)
            assert response.status_code == 403, (role, url)
            # A refusal is a JSON error naming the roles, not a broken PDF.
            assert "reading a compliance report needs one of the roles" in response.json()["detail"]
        outsider = api(world.other.auditors[0]).get(url)
        assert outsider.status_code == 404
        admin = api(world.user("admin")).get(url)
        assert admin.status_code == 200 and admin.content.startswith(b"%PDF-1.4")
        assert read_pdf(admin.content)[0] >= 1


def test_dashboard_compliance_page_offers_the_pdf(world: World) -> None:
    run = world.run
    auditor, steward = Client(), Client()
    auditor.force_login(world.user("auditor"))
    steward.force_login(world.user("steward"))
    page = auditor.get(f"/runs/{run.pk}/compliance/").content.decode()
    assert f'href="/runs/{run.pk}/compliance.pdf"' in page and "Download PDF" in page

    response = auditor.get(f"/runs/{run.pk}/compliance.pdf")
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    assert run.plan_hash in page_text(read_pdf(response.content)[1])
    assert steward.get(f"/runs/{run.pk}/compliance.pdf").status_code == 403
    assert Client().get(f"/runs/{run.pk}/compliance.pdf").status_code == 302  # to the login
