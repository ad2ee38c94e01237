"""Onboarding without the Django admin (issue 14 part 1): the first consortium from the shell,
organisations, invitations by e-mail with a role, and member management over the REST API and
the invitation page, within the rules of separation of duties.
"""

from __future__ import annotations

import io
import re
import sys
from datetime import timedelta
from typing import Any
from unittest import mock

import pytest
from django.contrib.auth import get_user_model
from django.core import mail
from django.core.management import CommandError, call_command
from django.test import Client
from django.utils import timezone

from federation import permissions
from federation.models import (
    AuditEvent,
    Consortium,
    Invitation,
    Membership,
    Organization,
    Role,
)
from tests.api_factories import client_for
from tests.governance_factories import UserFactory, governed_consortium, member

pytestmark = pytest.mark.django_db
User = get_user_model()
GOOD_PASSWORD = "correct-Horse-battery-9"


def actions(**data: Any) -> list[str]:
    """The audit log's actions, oldest first (optionally of events whose data match)."""
    rows = AuditEvent.objects.order_by("index")
    return [e.action for e in rows if all(e.data.get(key) == value for key, value in data.items())]


def refusal(attempt: str) -> dict[str, Any]:
    """The newest ``membership.refused`` event of that attempt."""
    events = AuditEvent.objects.filter(action="membership.refused").order_by("-index")
    return next(e.data for e in events if e.data.get("attempt") == attempt)


def token_of(link: str) -> str:
    match = re.search(r"/invite/([\w-]+)/$", link)
    assert match, link
    return match.group(1)


def counts() -> tuple[int, int, int, int, int]:
    return (
        Consortium.objects.count(),
        Organization.objects.count(),
        User.objects.count(),
        Membership.objects.count(),
        Invitation.objects.count(),
    )


# --- manage.py create_consortium ---------------------------------------------------------------


def create(*args: str, stdin: str = "") -> str:
    """Run the command as an operator would, with ``stdin`` on its standard input."""
    out = io.StringIO()
    with mock.patch.object(sys, "stdin", io.StringIO(stdin)):
        call_command("create_consortium", *args, stdout=out)
    return out.getvalue()


def test_create_consortium_makes_consortium_and_admin_together_and_the_link_sets_a_password():
    out = create(
        "Heart study",
        "--admin-email",
        "alice@example.org",
        "--organization",
        "North clinic",
        "--organization",
        "South clinic",
        "--base-url",
        "https://quorum.example.org",
    )
    consortium = Consortium.objects.get(name="Heart study")
    assert sorted(consortium.organizations.values_list("name", flat=True)) == [
        "North clinic",
        "South clinic",
    ]
    alice = User.objects.get(username="alice")
    assert alice.email == "alice@example.org" and not alice.has_usable_password()
    assert permissions.roles_in(alice, consortium.pk) == {Role.CONSORTIUM_ADMIN}
    link = out.strip().splitlines()[-1].strip()
    assert link.startswith("https://quorum.example.org/invite/")
    invitation = Invitation.objects.get()
    assert token_of(link) not in invitation.token_hash  # only the hash is stored

    browser = Client()
    page = browser.get(f"/invite/{token_of(link)}/")
    assert page.status_code == 200 and b"Your username is <strong>alice</strong>" in page.content
    done = browser.post(
        f"/invite/{token_of(link)}/", {"password1": GOOD_PASSWORD, "password2": GOOD_PASSWORD}
    )
    assert done.status_code == 302 and done["Location"] == f"/consortia/{consortium.pk}/"
    alice.refresh_from_db()
    assert alice.check_password(GOOD_PASSWORD)
    assert browser.get(f"/consortia/{consortium.pk}/").status_code == 200  # signed in
    assert actions() == [
        "consortium.created",
        "organization.created",
        "organization.created",
        "user.created",
        "membership.added",
        "invitation.created",
        "user.password_set",
        "invitation.accepted",
    ]
    # The link works once.
    again = Client().get(f"/invite/{token_of(link)}/")
    assert again.status_code == 410 and b"each link works once" in again.content


def test_create_consortium_refuses_a_taken_name_or_a_bad_address_and_creates_nothing():
    create("Heart study", "--admin-email", "alice@example.org")
    before = counts()
    with pytest.raises(CommandError, match="a consortium named 'Heart study' exists already"):
        create("Heart study", "--admin-email", "bob@example.org")
    with pytest.raises(CommandError, match=r"--admin-email: 'bob@' is not a valid e-mail"):
        create("Lung study", "--admin-email", "bob@")
    with pytest.raises(CommandError, match="password: This password is too short"):
        create("Lung study", "--admin-email", "bob@example.org", "--password-stdin", stdin="x1\n")
    assert counts() == before
    assert not User.objects.filter(username="bob").exists()


def test_create_consortium_with_a_password_on_stdin_prints_no_link():
    out = create(
        "Lung study", "--admin-email", "bob@example.org", "--password-stdin", stdin=GOOD_PASSWORD
    )
    assert "/invite/" not in out and not Invitation.objects.exists()
    assert Client().login(username="bob", password=GOOD_PASSWORD)


# --- organisations ------------------------------------------------------------------------------


def test_a_consortium_admin_adds_organisations_duplicates_are_409_and_others_403():
    g = governed_consortium(1)
    url = f"/api/v1/consortia/{g.consortium.pk}/organizations/"
    made = client_for(g.admin).post(url, {"name": "West lab", "kind": "research_lab"}, "json")
    assert made.status_code == 201, made.json()
    assert made.json()["kind"] == "research_lab"
    assert actions(name="West lab") == ["organization.created"]

    again = client_for(g.admin).post(url, {"name": "West lab"}, "json")
    assert again.status_code == 409
    assert (
        again.json()["detail"]
        == f"{g.consortium.name} already has an organisation named 'West lab'"
    )
    scientist = client_for(g.scientists[0]).post(url, {"name": "East lab"}, "json")
    assert scientist.status_code == 403
    assert (
        "adding an organisation needs one of the roles: consortium_admin"
        in scientist.json()["detail"]
    )
    outsider = client_for(governed_consortium(1).admin).post(url, {"name": "East lab"}, "json")
    assert outsider.status_code == 404
    assert actions(name="West lab") == ["organization.created", "organization.refused"]
    assert actions(name="East lab") == ["organization.refused"]
    assert not Organization.objects.filter(name="East lab").exists()


# --- invitations --------------------------------------------------------------------------------


def invite(actor: Any, g: Any, org: Organization, email: str, role: str, **extra: Any) -> Any:
    return client_for(actor).post(
        f"/api/v1/consortia/{g.consortium.pk}/invitations/",
        {"email": email, "organization": org.pk, "role": role, **extra},
        "json",
    )


def accept_new(link: str, username: str, password: str = GOOD_PASSWORD) -> Any:
    return Client().post(
        f"/invite/{token_of(link)}/",
        {"username": username, "password1": password, "password2": password},
    )


def test_an_invited_newcomer_chooses_username_and_password_and_holds_the_role():
    g = governed_consortium(2)
    answer = invite(g.admin, g, g.orgs[1], "Carol@Example.org", Role.DATA_SCIENTIST)
    assert answer.status_code == 201, answer.json()
    body = answer.json()
    assert body["state"] == "open" and body["email_sent"] is True and body["email_error"] == ""
    assert body["email"] == "Carol@example.org"  # the domain is normalised
    (message,) = mail.outbox
    assert message.to == ["Carol@example.org"] and body["link"] in message.body
    assert body["link"].startswith("http://testserver/invite/")
    expires = Invitation.objects.get().expires_at - timezone.now()
    assert timedelta(days=6, hours=23) < expires <= timedelta(days=7)

    page = Client().get(f"/invite/{token_of(body['link'])}/")
    assert page.status_code == 200 and b"Choose your username and password" in page.content
    done = accept_new(body["link"], "carol")
    assert done.status_code == 302
    carol = User.objects.get(username="carol")
    membership = Membership.objects.get(user=carol)
    assert (membership.role, membership.status, membership.granted_by) == (
        Role.DATA_SCIENTIST,
        Membership.Status.ACTIVE,
        g.admin,
    )
    assert Invitation.objects.get().membership == membership
    assert actions(email="Carol@example.org") == ["invitation.created", "invitation.accepted"]
    listed = client_for(g.admin).get(f"/api/v1/consortia/{g.consortium.pk}/invitations/").json()
    assert [row["state"] for row in listed["results"]] == ["accepted"]
    assert "link" not in listed["results"][0] and "token_hash" not in listed["results"][0]


def test_who_may_invite_to_which_role_is_who_may_grant_it_and_refusals_are_audited():
    g = governed_consortium(2)
    before = Invitation.objects.count()
    steward = invite(g.admin, g, g.orgs[0], "dan@example.org", Role.DATA_STEWARD)
    assert steward.status_code == 403
    assert "only an organisation admin of" in steward.json()["detail"]
    assert refusal("invite")["email"] == "dan@example.org"
    # An organisation admin invites the approving roles of their own organisation only.
    own = invite(g.org_admins[0], g, g.orgs[0], "dan@example.org", Role.DATA_STEWARD)
    assert own.status_code == 201
    other = invite(g.org_admins[0], g, g.orgs[1], "erin@example.org", Role.DATA_STEWARD)
    assert other.status_code == 403
    scientist = invite(g.scientists[0], g, g.orgs[0], "erin@example.org", Role.AUDITOR)
    assert scientist.status_code == 403
    g.admin.email = "boss@example.org"
    g.admin.save()
    myself = invite(g.admin, g, g.orgs[0], "BOSS@example.org", Role.AUDITOR)
    assert myself.status_code == 403
    assert "nobody grants a role to themselves" in myself.json()["detail"]
    assert Invitation.objects.count() == before + 1
    bad = invite(g.admin, g, g.orgs[0], "not-an-address", Role.AUDITOR)
    assert bad.status_code == 400
    assert bad.json() == {
        "email": ["'not-an-address' is not a valid e-mail address (like name@example.org)"]
    }
    twice = invite(g.org_admins[0], g, g.orgs[0], "dan@example.org", Role.DATA_STEWARD)
    assert twice.status_code == 409 and "revoke that invitation" in twice.json()["detail"]


def test_a_consortium_admin_invites_only_the_first_admin_of_an_organisation():
    g = governed_consortium(1)
    clinic = Organization.objects.create(consortium=g.consortium, name="New clinic")
    first = invite(g.admin, g, clinic, "fay@example.org", Role.ORG_ADMIN)
    assert first.status_code == 201
    # One open invitation of a first admin is enough: a second would be the admin's own pick.
    second = invite(g.admin, g, clinic, "gus@example.org", Role.ORG_ADMIN)
    assert second.status_code == 403
    assert "fay@example.org (invited by e-mail)" in second.json()["detail"]
    assert accept_new(first.json()["link"], "fay").status_code == 302
    fay = User.objects.get(username="fay")
    assert permissions.roles_in(fay, g.consortium.pk) == {Role.ORG_ADMIN}
    # From now on fay, not the consortium admin, grants the clinic's steward role.
    assert invite(g.admin, g, clinic, "gus@example.org", Role.DATA_STEWARD).status_code == 403
    assert invite(fay, g, clinic, "gus@example.org", Role.DATA_STEWARD).status_code == 201


def test_acceptance_checks_the_rules_again_and_a_refusal_creates_nothing():
    g = governed_consortium(2)
    # An existing account, invited as steward of orgs[0] ...
    hal = member(g.orgs[1], username="hal")
    hal.email = "hal@example.org"
    hal.set_password(GOOD_PASSWORD)
    hal.save()
    link = invite(g.org_admins[0], g, g.orgs[0], "hal@example.org", Role.DATA_STEWARD).json()[
        "link"
    ]
    # ... becomes steward of orgs[1] meanwhile: one person approves for one organisation.
    client_for(g.org_admins[1]).post(
        f"/api/v1/consortia/{g.consortium.pk}/members/",
        {"user": "hal", "organization": g.orgs[1].pk, "role": Role.DATA_STEWARD},
        "json",
    )
    browser = Client()
    anonymous = browser.get(f"/invite/{token_of(link)}/")
    assert b"An account with the address hal@example.org exists" in anonymous.content
    assert browser.login(username="hal", password=GOOD_PASSWORD)
    before = sorted(Membership.objects.values_list("pk", "status"))
    refused = browser.post(f"/invite/{token_of(link)}/")
    assert refused.status_code == 409
    assert b"already holds the approving role data_steward in" in refused.content
    assert sorted(Membership.objects.values_list("pk", "status")) == before
    assert Invitation.objects.get().accepted_at is None
    assert refusal("accept_invitation")["user"] == "hal"


def test_an_inviter_who_lost_the_role_voids_the_invitation():
    g = governed_consortium(1)
    second_admin = member(g.orgs[0], Role.ORG_ADMIN, username="second-admin")
    link = invite(second_admin, g, g.orgs[0], "ivy@example.org", Role.DATA_STEWARD).json()["link"]
    deactivated = client_for(g.org_admins[0]).post(
        f"/api/v1/memberships/{Membership.objects.get(user=second_admin).pk}/deactivate/"
    )
    assert deactivated.status_code == 200
    before = User.objects.count()
    refused = accept_new(link, "ivy")
    assert refused.status_code == 403
    assert b"no longer holds a role" in refused.content
    assert (
        User.objects.count() == before
        and not Membership.objects.filter(user__username="ivy").exists()
    )


@pytest.mark.parametrize("state", ["expired", "revoked", "used", "unknown"])
def test_expired_revoked_used_or_unknown_links_get_a_clear_page_and_create_nothing(state):
    g = governed_consortium(1)
    link = invite(g.admin, g, g.orgs[0], "jo@example.org", Role.AUDITOR).json()["link"]
    invitation = Invitation.objects.get()
    if state == "expired":
        Invitation.objects.filter(pk=invitation.pk).update(expires_at=timezone.now())
    elif state == "revoked":
        revoked = client_for(g.admin).post(f"/api/v1/invitations/{invitation.pk}/revoke/")
        assert revoked.status_code == 200 and revoked.json()["state"] == "revoked"
    elif state == "used":
        assert accept_new(link, "jo").status_code == 302
    else:
        link = link[:-5] + "XXXX/"
    before = counts()
    page = accept_new(link, "jo2")
    expected = {
        "expired": (410, b"This invitation expired on"),
        "revoked": (410, b"This invitation was revoked on"),
        "used": (410, b"each link works once"),
        "unknown": (404, b"This invitation link is not valid"),
    }[state]
    assert (page.status_code, expected[1] in page.content) == (expected[0], True)
    assert counts() == before


def test_a_weak_password_or_taken_username_is_refused_with_the_validators_message():
    g = governed_consortium(1)
    link = invite(g.admin, g, g.orgs[0], "kim@example.org", Role.AUDITOR).json()["link"]
    weak = accept_new(link, "kim", "12345678")
    assert weak.status_code == 400
    assert b"This password is too common." in weak.content
    taken = accept_new(link, g.admin.username)
    assert taken.status_code == 400 and b"is taken; choose another username" in taken.content
    assert not User.objects.filter(username="kim").exists()
    assert Invitation.objects.get().state == "open"


def test_a_signed_in_user_accepts_only_an_invitation_for_their_own_address():
    g = governed_consortium(1)
    link = invite(g.admin, g, g.orgs[0], "lee@example.org", Role.AUDITOR).json()["link"]
    someone = UserFactory(username="someone", email="someone@example.org")
    browser = Client()
    browser.force_login(someone)
    assert (
        b"Sign out, then open the link again" in browser.get(f"/invite/{token_of(link)}/").content
    )
    refused = browser.post(f"/invite/{token_of(link)}/")
    assert refused.status_code == 409 and not Membership.objects.filter(user=someone).exists()


def test_revoking_needs_the_inviter_or_an_admin_and_only_open_invitations():
    g = governed_consortium(1)
    invite(g.admin, g, g.orgs[0], "max@example.org", Role.AUDITOR)
    invitation = Invitation.objects.get()
    url = f"/api/v1/invitations/{invitation.pk}/revoke/"
    assert client_for(g.scientists[0]).post(url).status_code == 404  # not theirs to see
    assert client_for(g.org_admins[0]).post(url).status_code == 200
    again = client_for(g.admin).post(url)
    assert again.status_code == 409 and "is revoked" in again.json()["detail"]
    assert actions(email="max@example.org")[-2:] == ["invitation.revoked", "membership.refused"]


# --- changing roles and deactivating ------------------------------------------------------------


def test_an_org_admin_changes_a_role_in_their_organisation_the_old_grant_stays_deactivated():
    g = governed_consortium(2)
    old = Membership.objects.get(user=g.scientists[0])
    answer = client_for(g.org_admins[0]).patch(
        f"/api/v1/memberships/{old.pk}/", {"role": Role.DATA_STEWARD}, "json"
    )
    assert answer.status_code == 200, answer.json()
    assert (answer.json()["role"], answer.json()["status"]) == ("data_steward", "active")
    old.refresh_from_db()
    assert old.status == Membership.Status.DEACTIVATED and old.deactivated_at is not None
    assert permissions.roles_in(g.scientists[0], g.consortium.pk) == {Role.DATA_STEWARD}
    assert actions(from_role="data_scientist") == ["membership.role_changed"]


def test_role_changes_follow_the_rules_of_granting_and_nobody_changes_their_own():
    g = governed_consortium(2)
    scientist = Membership.objects.get(user=g.scientists[0])
    url = f"/api/v1/memberships/{scientist.pk}/"
    by_admin = client_for(g.admin).patch(url, {"role": Role.DATA_STEWARD}, "json")
    assert by_admin.status_code == 403 and "approving role" in by_admin.json()["detail"]
    other_org = client_for(g.org_admins[1]).patch(url, {"role": Role.AUDITOR}, "json")
    assert other_org.status_code == 403
    own = Membership.objects.get(user=g.org_admins[0])
    mine = client_for(g.org_admins[0]).patch(
        f"/api/v1/memberships/{own.pk}/", {"role": Role.DATA_STEWARD}, "json"
    )
    assert mine.status_code == 403 and "nobody changes their own role" in mine.json()["detail"]
    unknown = client_for(g.org_admins[0]).patch(url, {"role": "overlord"}, "json")
    assert unknown.status_code == 400
    assert refusal("change_role")["membership_id"] == own.pk
    assert Membership.objects.get(pk=scientist.pk).status == Membership.Status.ACTIVE
    foreign = client_for(governed_consortium(1).admin).patch(url, {"role": Role.AUDITOR}, "json")
    assert foreign.status_code == 404


def test_deactivating_follows_the_rules_and_takes_the_role_away_at_once():
    g = governed_consortium(2)
    steward = Membership.objects.get(user=g.stewards[0])
    url = f"/api/v1/memberships/{steward.pk}/deactivate/"
    by_admin = client_for(g.admin).post(url)
    assert by_admin.status_code == 403 and refusal("deactivate")["membership_id"] == steward.pk
    done = client_for(g.org_admins[0]).post(url)
    assert done.status_code == 200 and done.json()["status"] == "deactivated"
    assert client_for(g.stewards[0]).get(f"/api/v1/consortia/{g.consortium.pk}/").status_code == 404
    again = client_for(g.org_admins[0]).post(url)
    assert again.status_code == 409
    # Granted again: the same row becomes active, with the new grant.
    regrant = client_for(g.org_admins[0]).post(
        f"/api/v1/consortia/{g.consortium.pk}/members/",
        {"user": g.stewards[0].username, "organization": g.orgs[0].pk, "role": "data_steward"},
        "json",
    )
    assert regrant.status_code == 201 and regrant.json()["id"] == steward.pk


def test_the_last_consortium_admin_cannot_resign_but_anyone_else_may():
    g = governed_consortium(1)
    admin = Membership.objects.get(user=g.admin)
    last = client_for(g.admin).post(f"/api/v1/memberships/{admin.pk}/deactivate/")
    assert last.status_code == 409
    assert "is the last consortium admin" in last.json()["detail"]
    auditor = Membership.objects.get(user=g.auditors[0])
    resign = client_for(g.auditors[0]).post(f"/api/v1/memberships/{auditor.pk}/deactivate/")
    assert resign.status_code == 200
    assert AuditEvent.objects.filter(action="membership.deactivated").get().data["resigned"]
    second = member(g.orgs[0])
    client_for(g.admin).post(
        f"/api/v1/consortia/{g.consortium.pk}/members/",
        {"user": second.username, "organization": g.orgs[0].pk, "role": "consortium_admin"},
        "json",
    )
    assert (
        client_for(g.admin).post(f"/api/v1/memberships/{admin.pk}/deactivate/").status_code == 200
    )
