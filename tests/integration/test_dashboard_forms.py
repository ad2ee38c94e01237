"""The dashboard's governance forms: approve, reject, propose, edit, start, with the services'
rules and messages, and nothing half-saved when they refuse."""

from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from federation.models import (
    Approval,
    AuditEvent,
    Membership,
    PlanVersion,
    Role,
    Run,
    TrainingPlan,
)
from federation.services.plans import plan_edit
from tests.dashboard_factories import approve_all, propose
from tests.factories import plan_spec
from tests.governance_factories import Governed, governed_consortium

pytestmark = pytest.mark.django_db

Status = TrainingPlan.Status


@pytest.fixture
def gov() -> Governed:
    return governed_consortium(3)


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def snapshot() -> dict[str, int]:
    """Row counts of everything the forms' services may write."""
    return {
        model.__name__: model.objects.count()
        for model in (TrainingPlan, PlanVersion, Approval, Run, AuditEvent)
    }


def propose_form(gov: Governed, **overrides: Any) -> dict[str, Any]:
    data = {
        "name": "Readmission risk",
        "description": "30-day readmission",
        "spec": json.dumps(plan_spec()),
        "silos": [s.pk for s in gov.silos],
        "submit": "on",
    }
    data.update(overrides)
    return {k: v for k, v in data.items() if v is not None}


# Approve and reject ------------------------------------------------------------------------


def test_the_last_steward_approval_makes_the_plan_approved(gov: Governed) -> None:
    plan = propose(gov)
    digest = plan.current_version.spec_hash
    for steward in gov.stewards[:2]:
        response = client_for(steward).post(f"/plans/{plan.pk}/approve/", {"plan_hash": digest})
        assert response.status_code == 302
    plan.refresh_from_db()
    assert plan.status == Status.SUBMITTED  # the third organisation's steward has not approved
    html = client_for(gov.stewards[0]).get(f"/plans/{plan.pk}/").content.decode()
    assert "You approved version 1" in html and 'id="approve-form"' not in html

    client = client_for(gov.stewards[2])
    response = client.post(f"/plans/{plan.pk}/approve/", {"plan_hash": digest}, follow=True)
    plan.refresh_from_db()
    assert plan.status == Status.APPROVED
    assert "It is now approved and can run." in response.content.decode()
    assert Approval.objects.filter(version=plan.current_version, plan_hash=digest).count() == 3


def test_approving_a_stale_hash_shows_the_conflict_and_records_nothing(gov: Governed) -> None:
    plan = propose(gov)
    reviewed = plan.current_version.spec_hash
    steward = client_for(gov.stewards[0])
    assert f'value="{reviewed}"' in steward.get(f"/plans/{plan.pk}/").content.decode()
    # The plan changes while the steward reads it.
    plan_edit(
        actor=gov.scientists[0],
        plan=plan,
        spec=plan_spec(training={**plan_spec()["training"], "lr": 0.01}),
        silos=gov.silos,
    )
    before = snapshot()
    response = steward.post(f"/plans/{plan.pk}/approve/", {"plan_hash": reviewed})
    assert response.status_code == 409
    html = response.content.decode()
    assert "stale plan hash" in html and reviewed in html
    assert snapshot() == before
    # The page now offers the new version's hash.
    plan.refresh_from_db()
    assert f'value="{plan.current_version.spec_hash}"' in html


def test_rejecting_needs_a_reason_and_then_records_it(gov: Governed) -> None:
    plan = propose(gov)
    digest = plan.current_version.spec_hash
    client = client_for(gov.org_admins[1])
    before = snapshot()
    response = client.post(f"/plans/{plan.pk}/reject/", {"plan_hash": digest, "reason": "  "})
    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert snapshot() == before

    response = client.post(
        f"/plans/{plan.pk}/reject/",
        {"plan_hash": digest, "reason": "Uses the ward column we cannot share"},
        follow=True,
    )
    plan.refresh_from_db()
    assert plan.status == Status.REJECTED
    assert plan.rejection_reason == "Uses the ward column we cannot share"
    assert "Uses the ward column we cannot share" in response.content.decode()


def test_deciding_needs_a_steward_or_org_admin(gov: Governed) -> None:
    plan = propose(gov)
    digest = plan.current_version.spec_hash
    before = snapshot()
    for user in (gov.scientists[1], gov.auditors[0], gov.admin):
        client = client_for(user)
        assert client.post(f"/plans/{plan.pk}/approve/", {"plan_hash": digest}).status_code == 403
        rejected = client.post(f"/plans/{plan.pk}/reject/", {"plan_hash": digest, "reason": "no"})
        assert rejected.status_code == 403
    assert snapshot() == before


def test_a_member_of_several_organisations_chooses_which_one_decides(gov: Governed) -> None:
    plan = propose(gov)
    steward = gov.stewards[0]
    Membership.objects.create(user=steward, organization=gov.orgs[1], role=Role.ORG_ADMIN)
    client = client_for(steward)
    html = client.get(f"/plans/{plan.pk}/").content.decode()
    assert '<select name="organization"' in html
    response = client.post(
        f"/plans/{plan.pk}/approve/",
        {"plan_hash": plan.current_version.spec_hash, "organization": gov.orgs[1].pk},
    )
    assert response.status_code == 302
    approval = Approval.objects.get(user=steward)
    assert approval.organization == gov.orgs[1] and approval.role == Role.ORG_ADMIN


# Propose ----------------------------------------------------------------------------------


def test_a_data_scientist_proposes_a_plan(gov: Governed) -> None:
    client = client_for(gov.scientists[1])
    form = client.get(f"/consortia/{gov.consortium.pk}/plans/new/").content.decode()
    assert 'name="csrfmiddlewaretoken"' in form
    for silo in gov.silos:
        assert f'value="{silo.pk}"' in form
    response = client.post(f"/consortia/{gov.consortium.pk}/plans/new/", propose_form(gov))
    plan = TrainingPlan.objects.get()
    assert response.headers["Location"] == f"/plans/{plan.pk}/"
    assert plan.status == Status.SUBMITTED and plan.proposed_by == gov.scientists[1]
    assert set(plan.current_version.silos.all()) == set(gov.silos)


def test_a_draft_is_saved_then_submitted(gov: Governed) -> None:
    client = client_for(gov.scientists[0])
    client.post(f"/consortia/{gov.consortium.pk}/plans/new/", propose_form(gov, submit=None))
    plan = TrainingPlan.objects.get()
    assert plan.status == Status.DRAFT
    assert client.post(f"/plans/{plan.pk}/submit/").status_code == 302
    plan.refresh_from_db()
    assert plan.status == Status.SUBMITTED


@pytest.mark.parametrize(
    ("overrides", "field_message"),
    [
        ({"spec": "{not json"}, "not valid JSON: Expecting property name"),
        ({"spec": "[1, 2]"}, "the spec must be a JSON object"),
        ({"spec": json.dumps(plan_spec(model={"kind": "quantum_forest"}))}, "model"),
        ({"spec": json.dumps(plan_spec(min_silos=9))}, "min_silos"),
        ({"silos": []}, "choose at least one silo"),
        ({"name": ""}, "This field is required."),
    ],
)
def test_proposing_an_invalid_plan_shows_field_errors_and_saves_nothing(
    gov: Governed, overrides: dict[str, Any], field_message: str
) -> None:
    client = client_for(gov.scientists[0])
    before = snapshot()
    response = client.post(
        f"/consortia/{gov.consortium.pk}/plans/new/", propose_form(gov, **overrides)
    )
    assert response.status_code == 400
    html = response.content.decode()
    assert "Nothing was saved" in html
    assert 'class="field-error"' in html and field_message in html
    assert snapshot() == before


def test_spec_errors_are_shown_under_the_spec_with_their_path(gov: Governed) -> None:
    client = client_for(gov.scientists[0])
    spec = plan_spec(model={"kind": "quantum_forest"})
    response = client.post(
        f"/consortia/{gov.consortium.pk}/plans/new/", propose_form(gov, spec=json.dumps(spec))
    )
    errors = response.context["form"].errors
    assert list(errors) == ["spec"]
    assert any(message.startswith("model") for message in errors["spec"])
    # The text the scientist typed comes back as it was.
    assert "quantum_forest" in response.content.decode()


def test_only_data_scientists_propose(gov: Governed) -> None:
    before = snapshot()
    for user in (gov.stewards[0], gov.admin, gov.auditors[0], gov.org_admins[0]):
        client = client_for(user)
        url = f"/consortia/{gov.consortium.pk}/plans/new/"
        assert client.get(url).status_code == 403
        assert client.post(url, propose_form(gov)).status_code == 403
    assert snapshot() == before


# Edit -------------------------------------------------------------------------------------


def test_editing_makes_a_new_version_and_the_diff_shows_it(gov: Governed) -> None:
    plan = approve_all(gov, propose(gov))
    assert plan.status == Status.APPROVED
    client = client_for(gov.scientists[0])
    form = client.get(f"/plans/{plan.pk}/edit/").content.decode()
    assert "&quot;lr&quot;: 0.05" in form  # the current spec, ready to edit
    spec = plan_spec(training={**plan_spec()["training"], "lr": 0.02})
    response = client.post(
        f"/plans/{plan.pk}/edit/",
        {"spec": json.dumps(spec), "silos": [s.pk for s in gov.silos[:2]], "description": "v2"},
    )
    assert response.status_code == 302
    plan.refresh_from_db()
    assert plan.current_version.number == 2 and plan.status == Status.SUBMITTED
    html = client.get(f"/plans/{plan.pk}/?from=1&to=2").content.decode()
    assert "<code>training.lr</code>" in html
    assert "<code>0.05</code>" in html and "<code>0.02</code>" in html
    assert "<code>silos</code>" in html and gov.silos[2].name in html


def test_an_edit_that_changes_nothing_or_breaks_the_spec_saves_nothing(gov: Governed) -> None:
    plan = propose(gov)
    client = client_for(gov.scientists[0])
    before = snapshot()
    same = client.post(  # the form as shown: its description field holds the current one
        f"/plans/{plan.pk}/edit/",
        {
            "spec": json.dumps(plan_spec()),
            "description": plan.description,
            "silos": [s.pk for s in gov.silos],
        },
    )
    assert same.status_code == 400 and "nothing to change" in same.content.decode()
    broken = client.post(
        f"/plans/{plan.pk}/edit/",
        {"spec": json.dumps(plan_spec(round_deadline_seconds=-1)), "silos": [gov.silos[0].pk]},
    )
    assert broken.status_code == 400
    assert "round_deadline_seconds: must be a positive number" in broken.content.decode()
    assert snapshot() == before


def test_a_running_plan_cannot_be_edited(gov: Governed) -> None:
    plan = approve_all(gov, propose(gov))
    client = client_for(gov.scientists[0])
    assert client.post(f"/plans/{plan.pk}/start/").status_code == 302
    before = snapshot()
    response = client.post(
        f"/plans/{plan.pk}/edit/",
        {"spec": json.dumps(plan_spec(seed=3)), "silos": [gov.silos[0].pk]},
    )
    assert (
        response.status_code == 409
        and "stop its run before editing it" in response.content.decode()
    )
    assert snapshot() == before


# Runs -------------------------------------------------------------------------------------


def test_the_proposer_starts_a_run_of_an_approved_plan(gov: Governed) -> None:
    plan = approve_all(gov, propose(gov))
    html = client_for(gov.scientists[0]).get(f"/plans/{plan.pk}/").content.decode()
    assert 'id="start-run"' in html
    assert client_for(gov.stewards[0]).post(f"/plans/{plan.pk}/start/").status_code == 403
    response = client_for(gov.scientists[0]).post(f"/plans/{plan.pk}/start/")
    run = Run.objects.get()
    assert response.headers["Location"] == f"/runs/{run.pk}/"
    assert run.plan_hash == plan.current_version.spec_hash
    again = client_for(gov.admin).post(f"/plans/{plan.pk}/start/")
    assert again.status_code == 409 and "only an approved plan can run" in again.content.decode()
    assert Run.objects.count() == 1


def test_starting_a_plan_that_is_not_approved_says_why(gov: Governed) -> None:
    plan = propose(gov)
    response = client_for(gov.scientists[0]).post(f"/plans/{plan.pk}/start/")
    assert response.status_code == 409
    assert "is submitted; only an approved plan can run" in response.content.decode()
    assert Run.objects.count() == 0


def test_stopping_a_run(gov: Governed) -> None:
    plan = approve_all(gov, propose(gov))
    client = client_for(gov.scientists[0])
    client.post(f"/plans/{plan.pk}/start/")
    run = Run.objects.get()
    assert client_for(gov.auditors[0]).post(f"/runs/{run.pk}/stop/").status_code == 403
    response = client.post(f"/runs/{run.pk}/stop/", follow=True)
    run.refresh_from_db()
    assert run.status == Run.Status.STOPPED
    assert f"Run {run.pk} stopped." in response.content.decode()


def test_forms_need_the_csrf_token(gov: Governed) -> None:
    plan = propose(gov)
    client = Client(enforce_csrf_checks=True)
    client.force_login(gov.stewards[0])
    response = client.post(
        f"/plans/{plan.pk}/approve/", {"plan_hash": plan.current_version.spec_hash}
    )
    assert response.status_code == 403
    assert Approval.objects.count() == 0
