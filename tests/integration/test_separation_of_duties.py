"""Separation of duties (issue 13 part 1): the consortium admin cannot approve alone.

The attack is replayed against the demo's own consortium (``demo._create_consortium``, the finance
scenario): the admin, a superuser, grants itself the steward role of every organisation through
the API, then tries to approve and to start a run. Each step is refused with a reason, the
refusals are audited, and nothing else changes.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from federation import governance
from federation.demo.scenarios import finance
from federation.management.commands.demo import _create_consortium, _steward_keys
from federation.models import (
    Approval,
    AuditEvent,
    Membership,
    Organization,
    Role,
    Run,
    TrainingPlan,
)
from federation.services.plans import plan_propose
from tests.api_factories import client_for
from tests.factories import ConsortiumFactory, OrganizationFactory, PlanFactory, approve_by_stewards
from tests.governance_factories import UserFactory, governed_consortium, member

pytestmark = pytest.mark.django_db


def rows() -> dict[str, Any]:
    """Every membership and approval as tuples, and the plans' states (what an attack would change)."""
    return {
        "memberships": sorted(
            Membership.objects.values_list("user_id", "organization_id", "role", "status")
        ),
        "approvals": sorted(
            Approval.objects.values_list("version_id", "user_id", "organization_id")
        ),
        "plans": sorted(TrainingPlan.objects.values_list("pk", "status")),
        "runs": Run.objects.count(),
    }


def refusals() -> list[dict[str, Any]]:
    return list(
        AuditEvent.objects.filter(action="membership.refused").values_list("data", flat=True)
    )


@pytest.fixture
def demo(tmp_path) -> dict[str, Any]:
    """The demo consortium as `manage.py demo` builds it, plus a fresh plan awaiting decisions."""
    scenario = finance(0)
    keys = _steward_keys(scenario, tmp_path)
    plan, _tokens, users, scientist = _create_consortium(scenario, steward_keys=keys)
    fresh = plan_propose(
        actor=scientist,
        consortium=plan.consortium,
        name="the attacker's target",
        description="",
        spec={**scenario.plan, "seed": 99},  # a different hash from the demo's plan
        silos=list(plan.current_version.silos.all()),
        submit=True,
    )
    return {"plan": fresh, "users": users, "admin": get_user_model().objects.get(username="admin")}


def test_the_demo_grants_steward_roles_through_each_organisations_own_admin(demo) -> None:
    site_orgs = Organization.objects.filter(consortium=demo["plan"].consortium).exclude(
        name="Consortium office"
    )
    assert site_orgs.count() == 4
    for org in site_orgs:
        admin_grant = Membership.objects.get(organization=org, role=Role.ORG_ADMIN)
        steward_grant = Membership.objects.get(organization=org, role=Role.DATA_STEWARD)
        # The consortium admin only invited the org admin, who accepted; the org admin, not the
        # consortium admin, granted the steward role.
        assert admin_grant.granted_by.username == "admin"
        assert admin_grant.status == Membership.Status.ACTIVE and admin_grant.accepted_at
        assert steward_grant.granted_by == admin_grant.user
    admin_roles = set(Membership.objects.filter(user=demo["admin"]).values_list("role", flat=True))
    assert admin_roles == {Role.CONSORTIUM_ADMIN}
    # Every step of the set-up is in the audit log, the operator's included.
    actions = list(AuditEvent.objects.values_list("action", flat=True))
    assert actions[:2] == ["consortium.created", "organization.created"]
    assert actions.count("membership.invited") == actions.count("membership.accepted") == 4
    assert "membership.refused" not in actions


def test_attack_the_consortium_admin_grants_itself_every_steward_role_and_approves(demo) -> None:
    plan, admin = demo["plan"], demo["admin"]
    assert admin.is_superuser  # the demo's admin is also the platform superuser
    api = client_for(admin)
    consortium = plan.consortium
    orgs = list(consortium.organizations.exclude(name="Consortium office").order_by("name"))
    before = rows()

    for org in orgs:
        response = api.post(
            f"/api/v1/consortia/{consortium.pk}/members/",
            {"user": "admin", "organization": org.pk, "role": "data_steward"},
            format="json",
        )
        assert response.status_code == 403, response.json()
        assert "nobody grants a role to themselves" in response.json()["detail"]
    # Nor can the admin make itself an organisation admin, the role that grants stewards.
    response = api.post(
        f"/api/v1/consortia/{consortium.pk}/members/",
        {"user": "admin", "organization": orgs[0].pk, "role": "org_admin"},
        format="json",
    )
    assert response.status_code == 403

    assert rows() == before  # nothing granted, half or whole
    refused = refusals()
    assert len(refused) == len(orgs) + 1
    assert {(r["user"], r["role"]) for r in refused} == {
        ("admin", "data_steward"),
        ("admin", "org_admin"),
    }
    assert all("nobody grants a role to themselves" in r["reason"] for r in refused)

    # The approvals and the run the attack was after are refused too.
    approve = api.post(
        f"/api/v1/plans/{plan.pk}/approve/",
        {"plan_hash": plan.current_version.spec_hash},
        format="json",
    )
    assert approve.status_code == 403
    assert "data_steward" in approve.json()["detail"]
    start = api.post("/api/v1/runs/", {"plan": plan.pk}, format="json")
    assert start.status_code == 409, start.json()
    assert rows() == before


def test_attack_through_a_sock_puppet_stops_at_the_organisation_that_has_an_admin(demo) -> None:
    """The admin may create accounts, but cannot give one a steward role where an admin exists."""
    plan, admin = demo["plan"], demo["admin"]
    puppet = UserFactory(username="puppet")
    org = plan.current_version.silos.first().organization
    before = rows()
    for role in ("data_steward", "org_admin"):
        response = client_for(admin).post(
            f"/api/v1/consortia/{plan.consortium_id}/members/",
            {"user": "puppet", "organization": org.pk, "role": role},
            format="json",
        )
        assert response.status_code == 403
        detail = response.json()["detail"]
        assert f"only an organisation admin of {org.name} grants it" in detail
        assert "its admins:" in detail
    assert rows() == before
    assert not Membership.objects.filter(user=puppet).exists()


def test_a_consortium_admin_invites_an_organisations_first_admin_who_must_accept() -> None:
    consortium = ConsortiumFactory()
    office = OrganizationFactory(consortium=consortium, name="office")
    admin = member(office, Role.CONSORTIUM_ADMIN, username="cadmin")
    clinic = OrganizationFactory(consortium=consortium, name="clinic")
    invitee = UserFactory(username="invitee")
    steward = UserFactory(username="steward")
    url = f"/api/v1/consortia/{consortium.pk}/members/"

    # A steward role cannot be the first grant: the organisation has no admin to give it.
    refused = client_for(admin).post(
        url, {"user": "steward", "organization": clinic.pk, "role": "data_steward"}, format="json"
    )
    assert refused.status_code == 403
    assert "may invite its first organisation admin" in refused.json()["detail"]

    invited = client_for(admin).post(
        url, {"user": "invitee", "organization": clinic.pk, "role": "org_admin"}, format="json"
    )
    assert invited.status_code == 201, invited.json()
    body = invited.json()
    assert body["status"] == "pending" and body["granted_by"] == "cadmin"
    # Until accepted, the invitation gives nothing: not even a view of the consortium.
    assert client_for(invitee).get(f"/api/v1/consortia/{consortium.pk}/").status_code == 404
    early = client_for(invitee).post(
        url, {"user": "steward", "organization": clinic.pk, "role": "data_steward"}, format="json"
    )
    assert early.status_code == 404
    # A second invitation while one is pending is refused; nobody else can accept this one.
    again = client_for(admin).post(
        url, {"user": "steward", "organization": clinic.pk, "role": "org_admin"}, format="json"
    )
    assert again.status_code == 403 and "its admins: invitee" in again.json()["detail"]
    accept_url = f"/api/v1/memberships/{body['id']}/accept/"
    assert client_for(admin).post(accept_url, {}, format="json").status_code == 404
    assert client_for(steward).post(accept_url, {}, format="json").status_code == 404

    accepted = client_for(invitee).post(accept_url, {}, format="json")
    assert accepted.status_code == 200, accepted.json()
    assert accepted.json()["status"] == "active" and accepted.json()["accepted_at"]
    assert client_for(invitee).post(accept_url, {}, format="json").status_code == 404

    granted = client_for(invitee).post(
        url, {"user": "steward", "organization": clinic.pk, "role": "data_steward"}, format="json"
    )
    assert granted.status_code == 201, granted.json()
    assert granted.json()["granted_by"] == "invitee" and granted.json()["status"] == "active"
    events = list(
        AuditEvent.objects.filter(action__startswith="membership.").values_list("action", "actor")
    )
    assert events == [
        ("membership.refused", "user:cadmin"),
        ("membership.invited", "user:cadmin"),
        ("membership.refused", "user:cadmin"),
        ("membership.accepted", "user:invitee"),
        ("membership.added", "user:invitee"),
    ]


def test_an_invitation_is_accepted_in_the_dashboard() -> None:
    consortium = ConsortiumFactory()
    admin = member(OrganizationFactory(consortium=consortium), Role.CONSORTIUM_ADMIN)
    clinic = OrganizationFactory(consortium=consortium, name="clinic")
    invitee = UserFactory(username="dash-invitee")
    from federation.services.members import membership_add

    invitation = membership_add(actor=admin, user=invitee, organization=clinic, role="org_admin")
    browser = Client()
    browser.force_login(invitee)
    home = browser.get("/")
    assert home.status_code == 200
    assert "Invitation: Organization admin of clinic" in home.content.decode()
    assert browser.get(f"/invitations/{invitation.pk}/accept/").status_code == 405
    accepted = browser.post(f"/invitations/{invitation.pk}/accept/")
    assert accepted.status_code == 302
    invitation.refresh_from_db()
    assert invitation.status == Membership.Status.ACTIVE
    assert AuditEvent.objects.filter(action="membership.accepted").count() == 1
    other = Client()
    other.force_login(admin)
    assert other.post(f"/invitations/{invitation.pk}/accept/").status_code == 404


def test_nobody_grants_a_role_to_themselves_even_an_organisation_admin() -> None:
    g = governed_consortium(2)
    api = client_for(g.org_admins[0])
    before = rows()
    for role in ("data_steward", "data_scientist", "auditor"):
        response = api.post(
            f"/api/v1/consortia/{g.consortium.pk}/members/",
            {"user": g.org_admins[0].username, "organization": g.orgs[0].pk, "role": role},
            format="json",
        )
        assert response.status_code == 403
        assert "nobody grants a role to themselves" in response.json()["detail"]
    assert rows() == before
    assert len(refusals()) == 3


def test_one_person_holds_approving_roles_in_one_organisation_only() -> None:
    g = governed_consortium(2)
    before = rows()
    response = client_for(g.org_admins[1]).post(
        f"/api/v1/consortia/{g.consortium.pk}/members/",
        {"user": g.stewards[0].username, "organization": g.orgs[1].pk, "role": "data_steward"},
        format="json",
    )
    assert response.status_code == 409
    assert "at most one organisation" in response.json()["detail"]
    assert rows() == before
    [refused] = refusals()
    assert refused["user"] == g.stewards[0].username and refused["role"] == "data_steward"
    # Roles that approve nothing may be held anywhere.
    ok = client_for(g.org_admins[1]).post(
        f"/api/v1/consortia/{g.consortium.pk}/members/",
        {"user": g.stewards[0].username, "organization": g.orgs[1].pk, "role": "auditor"},
        format="json",
    )
    assert ok.status_code == 201


def test_approvals_count_distinct_people_backed_by_an_active_grant() -> None:
    g = governed_consortium(3, org_quorum_mode="count", org_quorum_value=2)
    plan = PlanFactory(
        consortium=g.consortium, status=TrainingPlan.Status.SUBMITTED, silos=[g.silos[0]]
    )
    version = plan.current_version
    # One person holding steward rows in two organisations (written around the services) and a
    # forged approval in the name of a user who holds no role there.
    both = UserFactory(username="both")
    Membership.objects.create(user=both, organization=g.orgs[0], role=Role.DATA_STEWARD)
    Membership.objects.create(user=both, organization=g.orgs[1], role=Role.DATA_STEWARD)
    for org in g.orgs[:2]:
        Approval.objects.create(
            version=version,
            plan_hash=version.spec_hash,
            user=both,
            organization=org,
            role=Role.DATA_STEWARD,
            decision="approve",
        )
    Approval.objects.create(
        version=version,
        plan_hash=version.spec_hash,
        user=g.scientists[2],
        organization=g.orgs[2],
        role=Role.DATA_STEWARD,
        decision="approve",
    )
    state = governance.approval_state(version)
    assert state.organizations_approved == [g.orgs[0].name]
    assert not state.satisfied
    assert len(state.not_counted) == 2
    assert "already counted for" in state.not_counted[0]
    assert "holds no active data_steward role" in state.not_counted[1]
    # A real, distinct steward of a second organisation completes the quorum.
    Approval.objects.create(
        version=version,
        plan_hash=version.spec_hash,
        user=g.stewards[2],
        organization=g.orgs[2],
        role=Role.DATA_STEWARD,
        decision="approve",
    )
    assert governance.approval_state(version).satisfied


def test_the_plan_page_shows_the_role_grant_beside_each_approval() -> None:
    g = governed_consortium(1)
    grant = Membership.objects.get(user=g.stewards[0], role=Role.DATA_STEWARD)
    Membership.objects.filter(pk=grant.pk).update(granted_by=g.org_admins[0])
    plan = PlanFactory(
        consortium=g.consortium, status=TrainingPlan.Status.SUBMITTED, silos=[g.silos[0]]
    )
    from federation.services.plans import plan_approve

    plan_approve(actor=g.stewards[0], plan=plan, plan_hash=plan.current_version.spec_hash)
    approve_by_stewards(plan)  # a second steward whose grant has no recorded granter
    browser = Client()
    browser.force_login(g.auditors[0])
    html = browser.get(f"/plans/{plan.pk}/").content.decode()
    assert f"by {g.org_admins[0].username} on" in html
    assert "by the operator on" in html
    Membership.objects.filter(pk=grant.pk).delete()  # the steward loses the role
    html = browser.get(f"/plans/{plan.pk}/").content.decode()
    assert "no such role held now: does not count" in html
    assert "Approvals not counted" in html
