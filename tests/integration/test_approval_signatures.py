"""The approve endpoint takes the steward's signature over the plan hash, checks it, stores it
with the approval and puts it in every grant; a bad signature is refused and changes nothing."""

from __future__ import annotations

import pytest

from fedcore import approvals, signing
from federation.models import Approval, AuditEvent, Role
from federation.signing import authorization_for
from tests.api_factories import World, build_world, fast_password_hashing  # noqa: F401
from tests.factories import start_run

pytestmark = pytest.mark.django_db

KEY = signing.generate_private_key()


@pytest.fixture
def world() -> World:
    return build_world()


def sign(world: World, **changes: str) -> dict[str, str]:
    plan = world.submitted
    target = {
        "consortium": plan.consortium.name,
        "organization": world.gov.orgs[0].name,
        "plan_hash": plan.current_version.spec_hash,
        **changes,
    }
    return approvals.sign_approval(KEY, **target)


def approve(world: World, signature: object) -> object:
    plan = world.submitted
    body = {"plan_hash": plan.current_version.spec_hash, "signature": signature}
    return world.client("steward").post(f"/api/v1/plans/{plan.pk}/approve/", body, format="json")


def test_a_signed_approval_is_stored_audited_and_carried_in_the_grant(world: World) -> None:
    signature = sign(world)
    response = approve(world, signature)
    assert response.status_code == 201, response.json()
    assert response.json()["signature"] == signature
    stored = Approval.objects.get(version=world.submitted.current_version)
    assert stored.signature == signature and stored.role == Role.DATA_STEWARD
    audited = AuditEvent.objects.filter(action="plan.approved").latest("pk")
    assert audited.data["signed_by"] == signing.public_key_text(KEY)

    world.submitted.refresh_from_db()
    run = start_run(world.submitted)
    silo = world.submitted.current_version.silos.get(organization=world.gov.orgs[0])
    scope = {"kind": "stats", "rounds": run.rounds, "expires_at": "2099-01-01T00:00:00+00:00"}
    grant = authorization_for(run=run, silo=silo, scope=scope)["payload"]
    entry = grant["silo_approvals"][0]
    assert entry["signature"] == signature
    # What the agent checks, with the steward's key pinned.
    found = approvals.verified_approval(
        grant["approvals"],
        pinned_keys=[signing.public_key_text(KEY)],
        consortium=grant["consortium"],
        plan_hash=grant["plan_hash"],
    )
    assert found["organization"] == world.gov.orgs[0].name


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan_hash": "0" * 64}, "does not verify"),
        ({"organization": "somewhere else"}, "does not verify"),
        ({"consortium": "another"}, "does not verify"),
    ],
)
def test_a_signature_over_something_else_is_refused_and_nothing_is_stored(
    world: World, change: dict[str, str], message: str
) -> None:
    before = AuditEvent.objects.count()
    response = approve(world, sign(world, **change))
    assert response.status_code == 400
    assert message in str(response.json())
    assert not Approval.objects.filter(version=world.submitted.current_version).exists()
    assert AuditEvent.objects.count() == before


def test_a_malformed_signature_is_refused_by_name(world: World) -> None:
    response = approve(world, {"kind": "ed25519"})
    assert response.status_code == 400
    assert "signature" in str(response.json()) and "must be a non-empty string" in str(
        response.json()
    )
    assert not Approval.objects.filter(version=world.submitted.current_version).exists()


def test_an_unsigned_approval_still_counts_on_the_server(world: World) -> None:
    response = approve(world, None)
    assert response.status_code == 201
    assert response.json()["signature"] is None
