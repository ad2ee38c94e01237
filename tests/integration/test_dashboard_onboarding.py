"""The dashboard's onboarding pages (issue 14 part 1): members, organisations, invitations, role
changes and deactivation, and a steward's silo registration with an uploaded schema file."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from django.core import mail
from django.core.files.uploadedfile import SimpleUploadedFile
from django.test import Client

from federation.models import AuditEvent, Invitation, Membership, Organization, Role, Silo
from tests.factories import SCHEMA
from tests.governance_factories import governed_consortium

pytestmark = pytest.mark.django_db


def browser(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_the_members_page_shows_forms_only_to_those_who_may_use_them():
    g = governed_consortium(2)
    url = f"/consortia/{g.consortium.pk}/members/"
    admin_page = browser(g.admin).get(url).content.decode()
    assert "Add an organisation" in admin_page and "Invite someone by e-mail" in admin_page
    org_admin_page = browser(g.org_admins[0]).get(url).content.decode()
    assert "Add an organisation" not in org_admin_page
    assert "Invite someone by e-mail" in org_admin_page
    scientist_page = browser(g.scientists[0]).get(url).content.decode()
    assert "Invite someone by e-mail" not in scientist_page and "Change role" not in scientist_page
    assert g.stewards[1].username in scientist_page  # everyone sees who holds which role


def test_inviting_from_the_dashboard_shows_the_link_and_sends_it():
    g = governed_consortium(1)
    page = browser(g.admin).post(
        f"/consortia/{g.consortium.pk}/invitations/new/",
        {"email": "nia@example.org", "organization": g.orgs[0].pk, "role": "auditor"},
    )
    assert page.status_code == 200
    link = re.search(r"http://testserver/invite/[\w-]+/", page.content.decode()).group(0)
    assert link in mail.outbox[0].body
    assert "An e-mail with this link went to nia@example.org" in page.content.decode()


def test_when_the_mail_server_is_down_the_inviter_still_gets_the_link(settings):
    settings.EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
    settings.EMAIL_HOST, settings.EMAIL_PORT, settings.EMAIL_TIMEOUT = "127.0.0.1", 1, 2
    g = governed_consortium(1)
    page = browser(g.admin).post(
        f"/consortia/{g.consortium.pk}/invitations/new/",
        {"email": "oli@example.org", "organization": g.orgs[0].pk, "role": "auditor"},
    )
    text = page.content.decode()
    assert page.status_code == 200 and "The e-mail could not be sent" in text
    assert re.search(r"/invite/[\w-]+/", text)
    assert Invitation.objects.get().state == "open"


def test_a_refused_invitation_shows_the_reason_and_creates_nothing():
    g = governed_consortium(1)
    page = browser(g.admin).post(
        f"/consortia/{g.consortium.pk}/invitations/new/",
        {"email": "pat@example.org", "organization": g.orgs[0].pk, "role": "data_steward"},
    )
    assert page.status_code == 403
    assert "is an approving role: only an organisation admin of" in page.content.decode()
    assert not Invitation.objects.exists() and not mail.outbox


def test_organisations_are_added_and_a_duplicate_name_is_explained():
    g = governed_consortium(1)
    url = f"/consortia/{g.consortium.pk}/organizations/new/"
    added = browser(g.admin).post(url, {"name": "Lakeside", "kind": "hospital"})
    assert added.status_code == 302
    assert Organization.objects.get(name="Lakeside").kind == "hospital"
    again = browser(g.admin).post(url, {"name": "Lakeside", "kind": "hospital"})
    assert again.status_code == 409
    assert "already has an organisation named &#x27;Lakeside&#x27;" in again.content.decode()
    assert browser(g.org_admins[0]).post(url, {"name": "Hillside"}).status_code == 403
    assert not Organization.objects.filter(name="Hillside").exists()


def test_role_change_and_deactivation_from_the_dashboard_follow_the_rules():
    g = governed_consortium(1)
    steward = Membership.objects.get(user=g.stewards[0])
    refused = browser(g.admin).post(f"/memberships/{steward.pk}/deactivate/")
    assert refused.status_code == 403
    assert "only an organisation admin of" in refused.content.decode()
    assert Membership.objects.get(pk=steward.pk).status == "active"
    done = browser(g.org_admins[0]).post(f"/memberships/{steward.pk}/deactivate/")
    assert done.status_code == 302
    assert Membership.objects.get(pk=steward.pk).status == "deactivated"
    scientist = Membership.objects.get(user=g.scientists[0])
    changed = browser(g.admin).post(f"/memberships/{scientist.pk}/role/", {"role": "auditor"})
    assert changed.status_code == 302
    assert Membership.objects.get(user=g.scientists[0], status="active").role == Role.AUDITOR
    assert AuditEvent.objects.filter(action="membership.role_changed").count() == 1


# --- a steward registers a silo ----------------------------------------------------------------


def register(user: Any, consortium_id: int, org: Organization, **fields: Any) -> Any:
    data = {"organization": org.pk, "name": "ward-7", "row_count": 1200, "location": "", **fields}
    return browser(user).post(f"/consortia/{consortium_id}/silos/new/", data)


def schema_file(content: Any) -> SimpleUploadedFile:
    raw = content if isinstance(content, bytes) else json.dumps(content).encode()
    return SimpleUploadedFile("schema.json", raw, content_type="application/json")


def test_a_steward_registers_a_silo_by_uploading_its_schema():
    g = governed_consortium(1)
    form = browser(g.stewards[0]).get(f"/consortia/{g.consortium.pk}/silos/new/")
    assert form.status_code == 200
    assert "quorum-agent init --data FILE.csv" in form.content.decode()
    done = register(g.stewards[0], g.consortium.pk, g.orgs[0], schema_file=schema_file(SCHEMA))
    silo = Silo.objects.get(name="ward-7")
    assert done.status_code == 302 and done["Location"] == f"/silos/{silo.pk}/"
    assert silo.admission == "pending" and silo.schema["target"]["column"] == "y"
    assert AuditEvent.objects.filter(action="silo.registered", object_id=str(silo.pk)).exists()


@pytest.mark.parametrize(
    ("upload", "pasted", "message"),
    [
        (
            {**SCHEMA, "columns": [{"name": "a", "type": "weird"}]},
            "",
            "column &#x27;a&#x27;: type &#x27;weird&#x27; is not supported; allowed: numeric, "
            "categorical, boolean",
        ),
        (
            {**SCHEMA, "cols": []},
            "",
            "schema: unknown key(s) &#x27;cols&#x27;; allowed keys: columns, target",
        ),
        (b'{"columns": [', "", "the file is not valid JSON: Expecting value (line 1, column 14)"),
        (None, "[1, 2]", "the pasted text must hold a JSON object"),
        (None, "", "a silo is registered with its dataset schema"),
    ],
)
def test_a_malformed_schema_names_the_fault_and_registers_nothing(upload, pasted, message):
    g = governed_consortium(1)
    fields: dict[str, Any] = {"schema_text": pasted}
    if upload is not None:
        fields["schema_file"] = schema_file(upload)
    page = register(g.stewards[0], g.consortium.pk, g.orgs[0], **fields)
    assert page.status_code == 400
    assert message in page.content.decode()
    assert not Silo.objects.filter(name="ward-7").exists()


def test_only_data_stewards_register_silos_from_the_dashboard():
    g = governed_consortium(1)
    page = browser(g.scientists[0]).get(f"/consortia/{g.consortium.pk}/silos/new/")
    assert page.status_code == 403
