"""Passkeys in the dashboard without a browser: the account page stores a passkey's public key and
shows the line a site pins; the plan page hands the passkey button the challenge of the approval
message; the approval carries the assertion, which the server verifies with fedcore (a software
authenticator stands in for the browser here; tests/browser/test_passkey_approval.py uses
Chromium's virtual authenticator)."""

from __future__ import annotations

import base64
import html
import re
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from django.test import Client

from fedcore import approvals, webauthn
from federation.models import Approval, AuditEvent, StewardPasskey
from tests.dashboard_factories import propose
from tests.governance_factories import governed_consortium
from tests.unit.test_webauthn import SoftAuthenticator

pytestmark = pytest.mark.django_db

HOST = "localhost"
ORIGIN = "http://localhost:8000"


def client_for(user: Any) -> Client:
    client = Client(HTTP_HOST=HOST)
    client.force_login(user)
    return client


def register(
    client: Client, passkey: SoftAuthenticator, credential: bytes = b"credential-1"
) -> Any:
    spki = passkey.key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return client.post(
        "/account/passkeys/",
        {
            "name": "laptop",
            "credential_id": webauthn.b64url_encode(credential),
            "algorithm": str(passkey.alg),
            "public_key": base64.b64encode(spki).decode(),
        },
    )


def form_values(html: str) -> dict[str, str]:
    found = {
        name: re.search(rf'{name}="([^"]*)"', html)
        for name in ("data-challenge", "data-rp-id", "data-credentials")
    }
    values = {name: match.group(1) for name, match in found.items() if match}
    signed_at = re.search(r'name="signed_at" value="([^"]*)"', html)
    values["signed_at"] = signed_at.group(1) if signed_at else ""
    return values


def approve_with(client: Client, plan: Any, assertion: dict[str, str], signed_at: str) -> Any:
    return client.post(
        f"/plans/{plan.pk}/approve/",
        {
            "plan_hash": plan.current_version.spec_hash,
            "signed_at": signed_at,
            "passkey_credential_id": assertion["credential_id"],
            "passkey_authenticator_data": assertion["authenticator_data"],
            "passkey_client_data_json": assertion["client_data_json"],
            "passkey_signature": assertion["signature"],
        },
    )


def test_register_a_passkey_then_approve_with_it() -> None:
    gov = governed_consortium(1)
    steward = gov.stewards[0]
    plan = propose(gov, min_silos=1)
    client = client_for(steward)
    passkey = SoftAuthenticator()
    response = register(client, passkey, b"credential-1")
    assert response.status_code == 302
    stored = StewardPasskey.objects.get(user=steward)
    assert stored.public_key == passkey.public
    page = html.unescape(client.get("/account/passkeys/").content.decode())
    assert f'steward_keys = ["{passkey.public}"]' in page
    assert AuditEvent.objects.filter(action="passkey.registered").exists()

    values = form_values(client.get(f"/plans/{plan.pk}/").content.decode())
    assert values["data-rp-id"] == HOST
    assert values["data-credentials"] == stored.credential_id
    expected = approvals.approval_challenge(
        consortium=gov.consortium.name,
        organization=gov.orgs[0].name,
        plan_hash=plan.current_version.spec_hash,
        signed_at=values["signed_at"],
    )
    assert values["data-challenge"] == webauthn.b64url_encode(expected)

    assertion = passkey.assert_(expected, rp_id=HOST, origin=ORIGIN)
    response = approve_with(client, plan, assertion, values["signed_at"])
    assert response.status_code == 302, response.content.decode()[-2000:]
    approval = Approval.objects.get(version=plan.current_version, user=steward)
    assert approval.signature["kind"] == "webauthn"
    assert approval.signature["key"] == passkey.public
    found = approvals.verified_approval(
        [
            {
                "organization": gov.orgs[0].name,
                "plan_hash": approval.plan_hash,
                "signature": approval.signature,
            }
        ],
        pinned_keys=[passkey.public],
        consortium=gov.consortium.name,
        plan_hash=approval.plan_hash,
    )
    assert found["signature"]["credential_id"] == stored.credential_id


def test_an_assertion_over_another_message_is_refused_and_nothing_is_stored() -> None:
    gov = governed_consortium(1)
    plan = propose(gov, min_silos=1)
    client = client_for(gov.stewards[0])
    passkey = SoftAuthenticator()
    register(client, passkey)
    values = form_values(client.get(f"/plans/{plan.pk}/").content.decode())
    wrong = approvals.approval_challenge(
        consortium=gov.consortium.name,
        organization=gov.orgs[0].name,
        plan_hash="0" * 64,
        signed_at=values["signed_at"],
    )
    response = approve_with(
        client, plan, passkey.assert_(wrong, rp_id=HOST, origin=ORIGIN), values["signed_at"]
    )
    assert response.status_code == 400
    page = html.unescape(response.content.decode())
    assert "challenge is not the hash of this approval message" in page, re.findall(
        r"role=\"alert\">([^<]*)", page
    )
    assert not Approval.objects.filter(version=plan.current_version).exists()


def test_someone_elses_passkey_cannot_sign_for_you() -> None:
    gov = governed_consortium(2)
    plan = propose(gov, min_silos=1)
    other = client_for(gov.stewards[1])
    other_key = SoftAuthenticator()
    register(other, other_key, b"theirs")
    client = client_for(gov.stewards[0])
    register(client, SoftAuthenticator(), b"mine")
    values = form_values(client.get(f"/plans/{plan.pk}/").content.decode())
    challenge = webauthn.b64url_decode(values["data-challenge"])
    assertion = {
        **other_key.assert_(challenge, rp_id=HOST, origin=ORIGIN),
        "credential_id": webauthn.b64url_encode(b"theirs"),
    }
    response = approve_with(client, plan, assertion, values["signed_at"])
    assert response.status_code == 400
    assert "not one of yours" in html.unescape(response.content.decode())
    assert not Approval.objects.filter(version=plan.current_version).exists()


def test_a_public_key_that_does_not_load_is_refused() -> None:
    gov = governed_consortium(1)
    client = client_for(gov.stewards[0])
    response = client.post(
        "/account/passkeys/",
        {"credential_id": "Y3JlZA", "algorithm": "-7", "public_key": "AAAA"},
    )
    assert response.status_code == 400
    assert "does not load" in html.unescape(response.content.decode())
    assert not StewardPasskey.objects.exists()
