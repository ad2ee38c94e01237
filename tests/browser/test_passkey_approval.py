"""A steward registers a passkey in the dashboard and approves a plan with it, in Chromium with a
virtual authenticator (CDP WebAuthn domain); the stored assertion verifies with the fedcore code the
agent runs, against the key the dashboard showed for site.toml.

WebAuthn refuses an IP address as the relying party ID, so this test browses http://localhost.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

import pytest

from fedcore import approvals
from federation.models import Approval, AuditEvent, StewardPasskey, TrainingPlan
from federation.signing import authorization_for
from tests.browser.conftest import Session
from tests.browser.test_dashboard_browser import with_password
from tests.dashboard_factories import propose
from tests.e2e import harness
from tests.factories import start_run
from tests.governance_factories import governed_consortium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]


class LocalhostSession(Session):
    """A Session on http://localhost (a valid WebAuthn RP ID), still offline but for it."""

    def _only_localhost(self, route: Any) -> None:
        if urlparse(route.request.url).hostname in ("localhost", "127.0.0.1"):
            route.continue_()
        else:
            self.watch.blocked.append(route.request.url)
            route.abort()


def test_a_steward_registers_a_passkey_and_signs_an_approval_the_site_can_verify(
    chromium: Any, live_server_proc: tuple[str, int, harness.Proc]
) -> None:
    _, port, _server = live_server_proc
    gov = governed_consortium(1, name="Passkey hospitals")
    steward = with_password(gov.stewards[0])
    plan = propose(gov, name="Readmission risk", min_silos=1)
    s = LocalhostSession(chromium, f"http://localhost:{port}")
    try:
        cdp = s.context.new_cdp_session(s.page)
        cdp.send("WebAuthn.enable")
        cdp.send(
            "WebAuthn.addVirtualAuthenticator",
            {
                "options": {
                    "protocol": "ctap2",
                    "transport": "internal",
                    "hasResidentKey": True,
                    "hasUserVerification": True,
                    "isUserVerified": True,
                }
            },
        )
        s.login(steward.username, "browser-test-pass-1")

        s.goto("/account/passkeys/")
        s.page.fill("#passkey-name", "laptop")
        with s.page.expect_navigation():
            s.page.click("#passkey-register button[type=submit]")
        s.page.wait_for_load_state("networkidle")
        pin = s.page.inner_text(".passkey-pin")
        passkey = StewardPasskey.objects.get(user=steward)
        assert f'steward_keys = ["{passkey.public_key}"]' in pin
        assert passkey.public_key.startswith("webauthn:-7:")  # the virtual authenticator: ES256
        assert AuditEvent.objects.filter(action="passkey.registered").exists()

        s.goto(f"/plans/{plan.pk}/")
        with s.page.expect_navigation():
            s.page.click("#approve-passkey")
        s.page.wait_for_load_state("networkidle")
        assert "You approved version 1" in s.page.inner_text("body")
        approval = Approval.objects.get(version=plan.current_version, user=steward)
        signature = approval.signature
        assert signature["kind"] == "webauthn" and signature["key"] == passkey.public_key
        assert signature["rp_id"] == "localhost"

        # What the agent does with the grant: only the pinned passkey's signature counts.
        plan.refresh_from_db()
        assert plan.status == TrainingPlan.Status.APPROVED
        run = start_run(plan)
        scope = {"kind": "stats", "rounds": run.rounds, "expires_at": "2099-01-01T00:00:00+00:00"}
        grant = authorization_for(run=run, silo=gov.silos[0], scope=scope)["payload"]
        found = approvals.verified_approval(
            grant["approvals"],
            pinned_keys=[pin.split('"')[1]],
            consortium=grant["consortium"],
            plan_hash=grant["plan_hash"],
        )
        assert found["signature"]["credential_id"] == passkey.credential_id
        assert s.watch.problems() == []
    finally:
        s.close()
