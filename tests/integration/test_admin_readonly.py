"""The Django admin cannot bypass governance (issue 13 part 3).

Every model registered in /admin/ is walked as a superuser through the test client: add, change,
delete and bulk delete are refused and change nothing, except the models in
``federation.admin.WRITABLE``, whose writes are either audited services or cannot grant a role.
"""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.db import models as dj
from django.forms.models import model_to_dict
from django.test import Client
from django.urls import reverse

from federation import governance
from federation.admin import WRITABLE
from federation.models import (
    Approval,
    AuditEvent,
    Membership,
    Role,
    TrainingPlan,
)
from federation.services.errors import Conflict
from federation.services.runs import run_start
from tests.factories import PlanFactory, running_round
from tests.governance_factories import UserFactory, governed_consortium

pytestmark = pytest.mark.django_db


@pytest.fixture
def superuser() -> Any:
    return get_user_model().objects.create_superuser("root", "root@example.org", "pw")


@pytest.fixture
def browser(superuser) -> Client:
    client = Client()
    client.force_login(superuser)
    return client


def _labels() -> list[str]:
    return sorted(model._meta.label_lower for model in admin.site._registry)


def _model(label: str) -> Any:
    return next(m for m in admin.site._registry if m._meta.label_lower == label)


def _url(model: Any, view: str, *args: Any) -> str:
    return reverse(f"admin:{model._meta.app_label}_{model._meta.model_name}_{view}", args=args)


def _world(superuser) -> None:
    """At least one row of every registered model (a run with a round, update, model, ...)."""
    g = governed_consortium(2)
    plan = PlanFactory(consortium=g.consortium, status=TrainingPlan.Status.SUBMITTED, silos=g.silos)
    round_ = running_round(g.silos)  # run, round, model version
    run, silo = round_.run, g.silos[0]
    from federation import models as m

    m.Update.objects.create(
        round=round_,
        silo=silo,
        num_examples=10,
        nonce="n",
        sha256="0" * 64,
        size_bytes=1,
        blob_key="k",
    )
    m.SiloStatistics.objects.create(run=run, silo=silo, stats={"rows": 1})
    m.RoundMetric.objects.create(round=round_, silo=silo, scope="local", name="loss", value=1.0)
    m.PrivacyLedgerEntry.objects.create(
        silo=silo,
        run=run,
        round_number=1,
        mechanism="sample",
        noise_multiplier=1.0,
        sample_rate=0.1,
        steps=1,
        delta=1e-5,
        epsilon_total=0.5,
    )
    m.FairnessReport.objects.create(round=round_, report={})
    from federation.services.audit import audit_append

    audit_append(
        actor="system", action="test.seed", consortium_id=None, object_type="", object_id=""
    )
    from tests.factories import approve_by_stewards

    approve_by_stewards(plan)
    from federation.services.api_tokens import api_token_create

    api_token_create(actor=g.stewards[0], user=g.stewards[0], name="seed", days=None)
    m.StewardPasskey.objects.create(
        user=g.stewards[0], credential_id="Y3JlZA", public_key="webauthn:-7:seed"
    )
    from federation.services.invitations import invitation_create

    invitation_create(
        actor=g.admin, organization=g.orgs[1], email="seed@example.org", role="data_scientist"
    )
    from django.contrib.auth.models import Group

    Group.objects.create(name="operators")


def _rows() -> dict[str, Any]:
    """Every row of every registered model but the audit log (its refusals are checked apart)."""
    return {label: rows for label, rows in _state().items() if label != "federation.auditevent"}


def _state() -> dict[str, Any]:
    """Every row of every registered model (fields as dicts): what a write would change."""
    out = {}
    for model in admin.site._registry:
        out[model._meta.label_lower] = sorted(
            (
                repr(sorted(model_to_dict(obj).items(), key=lambda kv: kv[0]))
                for obj in model._default_manager.all()
            ),
        )
    return out


def _post_data(obj: Any) -> dict[str, Any]:
    """The object's own fields as a change form would post them, with a changed text field."""
    data: dict[str, Any] = {}
    for field in obj._meta.concrete_fields:
        if field.primary_key:
            continue
        value = getattr(obj, field.attname)
        if isinstance(field, dj.CharField) and not field.choices:
            value = f"{value}-forged"
        data[field.attname if isinstance(field, dj.ForeignKey) else field.name] = (
            "" if value is None else value
        )
    return data


def test_every_registered_model_is_read_only_in_the_admin_unless_listed(superuser, browser) -> None:
    _world(superuser)
    labels = _labels()
    # The walk covers every governance model the issue names.
    for label in (
        "federation.trainingplan",
        "federation.planversion",
        "federation.approval",
        "federation.run",
        "federation.round",
        "federation.update",
        "federation.membership",
        "federation.silo",
        "federation.privacyledgerentry",
        "federation.auditevent",
        "federation.modelversion",
        "federation.fairnessreport",
    ):
        assert label in labels
    assert set(WRITABLE) <= set(labels)
    for label in labels:
        if label in WRITABLE:
            continue
        model = _model(label)
        obj = model._default_manager.first()
        assert obj is not None, f"no {label} row to try the change and delete pages on"
        before, events = _rows(), AuditEvent.objects.count()
        assert browser.get(_url(model, "add")).status_code == 403, label
        assert browser.post(_url(model, "add"), _post_data(obj)).status_code == 403, label
        assert browser.get(_url(model, "change", obj.pk)).status_code == 200, label  # viewable
        assert browser.post(_url(model, "change", obj.pk), _post_data(obj)).status_code == 403, (
            label
        )
        assert browser.post(_url(model, "delete", obj.pk), {"post": "yes"}).status_code == 403, (
            label
        )
        bulk = browser.post(
            _url(model, "changelist"),
            {"action": "delete_selected", "_selected_action": [obj.pk], "post": "yes"},
        )
        assert bulk.status_code in (200, 302, 403), label  # no such action: nothing happens
        assert admin.site._registry[model].get_actions(bulk.wsgi_request) == {}, label
        assert _rows() == before, f"{label} changed through the admin"
        # The three refused writes (add, change, delete) are audited, nothing else is.
        refused = AuditEvent.objects.order_by("index")[events:]
        assert [(e.action, e.data["view"], e.object_type) for e in refused] == [
            ("admin.write_refused", view, label) for view in ("add", "change", "delete")
        ], label


def test_consortia_and_organisations_are_added_only_through_audited_services(browser) -> None:
    from federation.models import Consortium, Organization

    response = browser.post(
        reverse("admin:federation_consortium_add"),
        {
            "name": "New consortium",
            "description": "",
            "require_steward_unanimity": "on",
            "org_quorum_mode": "fraction",
            "org_quorum_value": "0.5",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    consortium = Consortium.objects.get(name="New consortium")
    # A rule that could never be met is a form error naming the field, and adds nothing.
    bad = browser.post(
        reverse("admin:federation_consortium_add"),
        {"name": "Bad", "org_quorum_mode": "fraction", "org_quorum_value": "0"},
    )
    assert bad.status_code == 200
    assert "in fraction mode a value in (0, 1] is needed" in bad.content.decode()
    assert not Consortium.objects.filter(name="Bad").exists()
    response = browser.post(
        reverse("admin:federation_organization_add"),
        {"consortium": consortium.pk, "name": "Clinic", "kind": "hospital"},
    )
    assert response.status_code == 302
    organization = Organization.objects.get(name="Clinic")
    assert list(AuditEvent.objects.values_list("action", "actor", "object_id")) == [
        ("consortium.created", "user:root", str(consortium.pk)),
        ("organization.created", "user:root", str(organization.pk)),
    ]
    # Their rules and membership count are never edited or deleted here.
    before = (Consortium.objects.values().get(), Organization.objects.values().get())
    changed = browser.post(
        reverse("admin:federation_consortium_change", args=[consortium.pk]),
        {"name": "x", "org_quorum_mode": "count", "org_quorum_value": "0"},
    )
    assert changed.status_code == 403
    for model, obj in (("consortium", consortium), ("organization", organization)):
        url = reverse(f"admin:federation_{model}_delete", args=[obj.pk])
        assert browser.post(url, {"post": "yes"}).status_code == 403
    assert (Consortium.objects.values().get(), Organization.objects.values().get()) == before


def test_a_user_change_in_the_admin_grants_no_role(superuser, browser) -> None:
    g = governed_consortium(1)
    outsider = UserFactory(username="outsider")
    memberships = sorted(Membership.objects.values_list("user_id", "organization_id", "role"))
    # An account without a role may be edited, even made superuser: that grants no role.
    url = reverse("admin:auth_user_change", args=[outsider.pk])
    form = {
        "username": "outsider",
        "is_active": "on",
        "is_staff": "on",
        "is_superuser": "on",
        "date_joined_0": "2026-01-01",
        "date_joined_1": "00:00:00",
        "initial-date_joined_0": "2026-01-01",
        "initial-date_joined_1": "00:00:00",
    }
    assert browser.post(url, form).status_code == 302
    outsider.refresh_from_db()
    assert outsider.is_superuser
    assert (
        sorted(Membership.objects.values_list("user_id", "organization_id", "role")) == memberships
    )
    from federation import permissions

    assert permissions.roles_in(outsider, g.consortium.pk) == set()
    # A steward's account cannot be changed (a new password would let the operator sign in as
    # the steward), nor deleted (that would cascade to their approvals).
    steward = g.stewards[0]
    password = steward.password
    for url, data in (
        (
            reverse("admin:auth_user_change", args=[steward.pk]),
            {**form, "username": steward.username},
        ),
        (
            reverse("admin:auth_user_password_change", args=[steward.pk]),
            {"password1": "Xy!82kq#a", "password2": "Xy!82kq#a"},
        ),
        (reverse("admin:auth_user_delete", args=[steward.pk]), {"post": "yes"}),
    ):
        assert browser.post(url, data).status_code == 403, url
    steward.refresh_from_db()
    assert steward.password == password and steward.is_active
    # Nor can the operator mint an API token in the steward's name.
    from federation.models import ApiToken
    from federation.services.api_tokens import api_token_create

    assert browser.get(reverse("admin:federation_apitoken_add")).status_code == 403
    token = api_token_create(actor=steward, user=steward, name="cli", days=None).row
    change = reverse("admin:federation_apitoken_change", args=[token.pk])
    assert browser.post(change, {"user": outsider.pk}).status_code == 403
    assert ApiToken.objects.get(pk=token.pk).user_id == steward.pk
    # Deleting one only revokes it, and the revocation is audited.
    delete = reverse("admin:federation_apitoken_delete", args=[token.pk])
    assert browser.post(delete, {"post": "yes"}).status_code == 302
    assert not ApiToken.objects.filter(pk=token.pk).exists()
    assert AuditEvent.objects.filter(action="api_token.revoked").exists()


def test_attack_forging_an_approval_and_an_approved_status_in_the_admin_is_refused(
    superuser, browser
) -> None:
    g = governed_consortium(2)
    plan = PlanFactory(consortium=g.consortium, status=TrainingPlan.Status.SUBMITTED, silos=g.silos)
    version = plan.current_version
    Membership.objects.create(user=superuser, organization=g.orgs[0], role=Role.CONSORTIUM_ADMIN)
    before_events = AuditEvent.objects.count()

    forged = browser.post(
        reverse("admin:federation_approval_add"),
        {
            "version": version.pk,
            "plan_hash": version.spec_hash,
            "user": g.stewards[0].pk,
            "organization": g.orgs[0].pk,
            "role": Role.DATA_STEWARD,
            "decision": "approve",
            "reason": "",
            "created_at_0": "2026-01-01",
            "created_at_1": "00:00:00",
        },
    )
    assert forged.status_code == 403
    status = browser.post(
        reverse("admin:federation_trainingplan_change", args=[plan.pk]),
        {**_post_data(plan), "name": plan.name, "status": "approved"},
    )
    assert status.status_code == 403

    plan.refresh_from_db()
    assert plan.status == TrainingPlan.Status.SUBMITTED
    assert not Approval.objects.exists()
    assert not governance.approval_state(version).satisfied
    refused = AuditEvent.objects.order_by("index")[before_events:]
    assert [(e.action, e.object_type, e.actor) for e in refused] == [
        ("admin.write_refused", "federation.approval", f"user:{superuser.get_username()}"),
        ("admin.write_refused", "federation.trainingplan", f"user:{superuser.get_username()}"),
    ]
    with pytest.raises(Conflict):
        run_start(actor=superuser, plan=plan)


def test_the_first_consortium_admin_is_granted_at_the_shell_and_audited() -> None:
    from django.core.management import CommandError, call_command

    from federation.services.consortia import consortium_create, organization_create

    consortium = consortium_create(actor=None, name="Fresh")
    office = organization_create(actor=None, consortium=consortium, name="Office")
    UserFactory(username="first-admin")
    call_command("grant_consortium_admin", "Fresh", "Office", "first-admin")
    grant = Membership.objects.get(user__username="first-admin")
    assert (grant.organization, grant.role, grant.status) == (
        office,
        Role.CONSORTIUM_ADMIN,
        "active",
    )
    event = AuditEvent.objects.get(action="membership.added")
    assert event.actor == "system" and event.data["role"] == Role.CONSORTIUM_ADMIN
    # The same command never grants twice, and names what is missing.
    with pytest.raises(CommandError, match="already is consortium_admin"):
        call_command("grant_consortium_admin", "Fresh", "Office", "first-admin")
    with pytest.raises(CommandError, match="no organisation 'Nowhere'"):
        call_command("grant_consortium_admin", "Fresh", "Nowhere", "first-admin")
    with pytest.raises(CommandError, match="no user 'ghost'"):
        call_command("grant_consortium_admin", "Fresh", "Office", "ghost")
    assert Membership.objects.count() == 1
