"""Governance services: silo admission, plan versions and approvals, members, access."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import pytest
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import Http404

from fedcore.plan import plan_hash
from federation import dispatch, governance
from federation.models import (
    Approval,
    AuditEvent,
    Consortium,
    Membership,
    PlanVersion,
    Role,
    Silo,
    TrainingPlan,
)
from federation.services.audit import audit_verify
from federation.services.errors import Conflict
from federation.services.members import membership_add
from federation.services.plans import (
    plan_approve,
    plan_edit,
    plan_propose,
    plan_reject,
    plan_submit,
    plan_withdraw,
)
from federation.services.silos import (
    silo_admit,
    silo_authenticate,
    silo_register,
    silo_reject,
    silo_revoke_token,
    silo_rotate_token,
)
from tests.factories import SCHEMA, SiloFactory, plan_spec
from tests.governance_factories import Governed, UserFactory, governed_consortium, member

pytestmark = pytest.mark.django_db

Status = TrainingPlan.Status


def snapshot() -> dict[str, int]:
    """Row counts of everything a governance service may write."""
    models = (Silo, Membership, TrainingPlan, PlanVersion, Approval, AuditEvent)
    return {model.__name__: model.objects.count() for model in models}


def actions() -> list[str]:
    return list(AuditEvent.objects.values_list("action", flat=True))


def training(**overrides: Any) -> dict[str, Any]:
    return {
        "rounds": 2,
        "local_epochs": 1,
        "batch_size": 16,
        "optimizer": "adam",
        "lr": 0.05,
        **overrides,
    }


def propose(g: Governed, *, silos: list[Silo] | None = None, **spec: Any) -> TrainingPlan:
    """A submitted plan by the first data scientist, on the silos of orgs 0 and 1 by default."""
    return plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="Thyroid risk",
        description="logistic regression on three labs",
        spec=plan_spec(**spec),
        silos=g.silos[:2] if silos is None else silos,
    )


def approve(user: Any, plan: TrainingPlan, **kwargs: Any) -> Approval:
    """Approve the plan's current version by its hash (as an approver who just reviewed it)."""
    plan.refresh_from_db()
    return plan_approve(actor=user, plan=plan, plan_hash=plan.current_version.spec_hash, **kwargs)


def status_of(plan: TrainingPlan) -> str:
    plan.refresh_from_db()
    return plan.status


@pytest.fixture
def g() -> Governed:
    """Three organisations; the quorum is half of them (2); stewards must all approve."""
    return governed_consortium(3, org_quorum_mode="fraction", org_quorum_value=0.5)


# --------------------------------------------------------------------------------------------
# Silo admission


def test_a_steward_registers_a_pending_silo_for_their_organisation(g: Governed) -> None:
    silo = silo_register(
        actor=g.stewards[1],
        organization=g.orgs[1],
        name="north-lab",
        description="lab results 2019-2024",
        schema={
            "columns": [{"name": "x1", "type": "numeric"}],
            "target": {"column": "y", "positive": ["1"]},
        },
        row_count=1200,
        location="on-prem, building C",
    )

    assert silo.admission == Silo.Admission.PENDING
    assert silo.consortium == g.consortium
    assert silo.token_hash is None
    # The schema is stored in its full form (defaults written out), ready to compare with plans.
    assert silo.schema["columns"][0] == {
        "name": "x1",
        "type": "numeric",
        "transform": "none",
        "missing": "impute",
    }
    event = AuditEvent.objects.get(action="silo.registered")
    assert (event.actor, event.object_id) == (f"user:{g.stewards[1].username}", str(silo.pk))


def test_only_a_steward_of_the_organisation_registers_its_silos(g: Governed) -> None:
    def register(actor: Any) -> Silo:
        return silo_register(
            actor=actor,
            organization=g.orgs[0],
            name="new",
            description="",
            schema=SCHEMA,
            row_count=10,
            location="",
        )

    with pytest.raises(PermissionDenied, match="not a data steward of"):
        register(g.stewards[1])
    with pytest.raises(PermissionDenied, match="data_steward"):
        register(g.scientists[0])
    assert register(g.stewards[0]).organization == g.orgs[0]


def test_registering_with_bad_input_names_the_fields_and_saves_nothing(g: Governed) -> None:
    before = snapshot()

    with pytest.raises(ValidationError) as exc:
        silo_register(
            actor=g.stewards[0],
            organization=g.orgs[0],
            name=g.silos[1].name,  # taken in this consortium
            description="",
            schema={"columns": [{"name": "age", "type": "decimal"}], "target": {"column": "y"}},
            row_count=-5,
            location="x" * 501,
        )

    errors = exc.value.message_dict
    assert set(errors) == {"name", "schema", "row_count", "location"}
    assert "already has a silo named" in errors["name"][0]
    assert "decimal" in errors["schema"][0]
    assert snapshot() == before


def test_admission_returns_the_token_once_and_stores_only_its_hash(g: Governed) -> None:
    silo = SiloFactory(organization=g.orgs[0], admission=Silo.Admission.PENDING)
    assert silo_authenticate(token="anything") is None

    token = silo_admit(actor=g.admin, silo=silo)

    silo.refresh_from_db()
    assert silo.admission == Silo.Admission.ADMITTED
    assert silo.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert silo_authenticate(token=token) == silo
    event = AuditEvent.objects.get(action="silo.admitted")
    assert token not in str(event.data)
    with pytest.raises(Conflict, match="already admitted"):
        silo_admit(actor=g.admin, silo=silo)


def test_only_the_consortium_admin_admits_or_rejects(g: Governed) -> None:
    silo = SiloFactory(organization=g.orgs[0], admission=Silo.Admission.PENDING)

    with pytest.raises(PermissionDenied, match="consortium_admin"):
        silo_admit(actor=g.stewards[0], silo=silo)
    with pytest.raises(PermissionDenied, match="consortium_admin"):
        silo_reject(actor=g.org_admins[0], silo=silo, reason="no")


def test_a_rejection_needs_a_reason_and_is_audited(g: Governed) -> None:
    silo = SiloFactory(organization=g.orgs[0], admission=Silo.Admission.PENDING)
    before = snapshot()

    with pytest.raises(ValidationError) as exc:
        silo_reject(actor=g.admin, silo=silo, reason="   ")
    assert set(exc.value.message_dict) == {"reason"}
    assert snapshot() == before

    silo_reject(actor=g.admin, silo=silo, reason="the schema lacks the TSH column")

    silo.refresh_from_db()
    assert silo.admission == Silo.Admission.REJECTED
    event = AuditEvent.objects.get(action="silo.rejected")
    assert event.data["reason"] == "the schema lacks the TSH column"
    with pytest.raises(Conflict):
        silo_reject(actor=g.admin, silo=silo, reason="again")


def test_rotating_a_token_stops_the_old_one_at_once(g: Governed) -> None:
    silo = SiloFactory(organization=g.orgs[0], admission=Silo.Admission.PENDING)
    old = silo_admit(actor=g.admin, silo=silo)

    new = silo_rotate_token(actor=g.stewards[0], silo=silo)

    assert new != old
    assert silo_authenticate(token=old) is None
    assert silo_authenticate(token=new) == silo
    assert actions()[-1] == "silo.token_rotated"
    with pytest.raises(PermissionDenied, match="not a data steward of the organisation"):
        silo_rotate_token(actor=g.stewards[1], silo=silo)
    assert silo_authenticate(token=silo_rotate_token(actor=g.admin, silo=silo)) == silo


def test_revoking_a_token_disconnects_the_agent_after_commit(
    g: Governed, monkeypatch: pytest.MonkeyPatch, django_capture_on_commit_callbacks: Any
) -> None:
    sent: list[tuple[str, dict[str, Any]]] = []

    class Recorder:
        def send(self, group: str, event: dict[str, Any]) -> None:
            sent.append((group, event))

    monkeypatch.setattr(dispatch, "backend", Recorder)
    silo = SiloFactory(organization=g.orgs[0], admission=Silo.Admission.PENDING)
    token = silo_admit(actor=g.admin, silo=silo)
    Silo.objects.filter(pk=silo.pk).update(connection_id="specific.channel!abc")

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        silo_revoke_token(actor=g.stewards[0], silo=silo)
        assert sent == []  # nothing leaves before the commit

    assert len(callbacks) == 1
    assert sent == [(dispatch.silo_group(silo.pk), {"type": "session.replaced"})]
    assert silo_authenticate(token=token) is None
    silo.refresh_from_db()
    assert silo.token_hash is None
    assert actions()[-1] == "silo.token_revoked"
    with pytest.raises(Conflict, match="no token"):
        silo_revoke_token(actor=g.admin, silo=silo)


# --------------------------------------------------------------------------------------------
# Proposing and validating plans


def test_a_data_scientist_proposes_version_1(g: Governed) -> None:
    plan = propose(g)

    version = plan.current_version
    assert plan.status == Status.SUBMITTED
    assert plan.proposed_by == g.scientists[0]
    assert version.number == 1
    # The hashed version carries the plan's name and description (docs/plan-spec.md).
    assert version.spec == {
        **plan_spec(),
        "name": "Thyroid risk",
        "description": "logistic regression on three labs",
    }
    assert version.spec_hash == plan_hash(version.spec) != plan_hash(plan_spec())
    assert set(version.silos.all()) == set(g.silos[:2])
    assert actions() == ["plan.proposed", "plan.submitted"]


def test_a_draft_waits_for_submission(g: Governed) -> None:
    plan = plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="draft",
        description="",
        spec=plan_spec(),
        silos=g.silos,
        submit=False,
    )
    with pytest.raises(Conflict, match="only a submitted plan"):
        approve(g.stewards[1], plan)

    plan_submit(actor=g.scientists[0], plan=plan)

    assert status_of(plan) == Status.SUBMITTED
    with pytest.raises(Conflict, match="only a draft"):
        plan_submit(actor=g.scientists[0], plan=plan)


def test_only_data_scientists_propose(g: Governed) -> None:
    with pytest.raises(PermissionDenied, match="data_scientist"):
        plan_propose(
            actor=g.stewards[0],
            consortium=g.consortium,
            name="p",
            description="",
            spec=plan_spec(),
            silos=g.silos,
        )


def test_a_bad_proposal_names_every_field_and_saves_nothing(g: Governed) -> None:
    foreign = governed_consortium(2).silos[0]
    spec = plan_spec(
        model={"kind": "random_forest"},
        training=training(lr=-1),
        privacy={"mode": "sample", "target_epsilon": 0, "delta": 1.5},
        colour="blue",
    )
    before = snapshot()

    with pytest.raises(ValidationError) as exc:
        plan_propose(
            actor=g.scientists[0],
            consortium=g.consortium,
            name=" ",
            description="",
            spec=spec,
            silos=[g.silos[0], foreign],
        )

    errors = exc.value.message_dict
    assert set(errors) == {
        "name",
        "silos",
        "spec.model.kind",
        "spec.training.lr",
        "spec.privacy.target_epsilon",
        "spec.privacy.delta",
        "spec.colour",
    }
    assert "allowed kinds: logistic_regression, mlp" in errors["spec.model.kind"][0]
    assert f"silo id(s) {foreign.pk} are not silos of this consortium" in errors["silos"][0]
    assert foreign.name not in errors["silos"][0]  # nothing leaks about other consortia
    assert snapshot() == before


def test_only_admitted_silos_take_part(g: Governed) -> None:
    pending = SiloFactory(organization=g.orgs[2], admission=Silo.Admission.PENDING)

    with pytest.raises(ValidationError) as exc:
        propose(g, silos=[g.silos[0], pending])

    assert exc.value.message_dict["silos"] == [f"silo(s) {pending.name} are not admitted"]


def test_every_silo_must_have_the_plans_columns_with_their_types(g: Governed) -> None:
    schema = {
        "columns": [
            {"name": "x1", "type": "numeric"},
            {"name": "x2", "type": "categorical"},
        ],
        "target": {"column": "y", "positive": ["1"]},
    }
    odd = SiloFactory(organization=g.orgs[2], name="odd-lab", schema=schema)

    with pytest.raises(ValidationError) as exc:
        propose(g, silos=[g.silos[0], odd])

    message = exc.value.message_dict["silos"][0]
    assert "silo 'odd-lab': column 'x2' is categorical, the plan needs numeric" in message
    assert "silo 'odd-lab' has no column 'x3'" in message
    assert g.silos[0].name not in message


def test_a_plan_needs_at_least_min_silos(g: Governed) -> None:
    with pytest.raises(ValidationError) as exc:
        propose(g, silos=g.silos[:2], min_silos=3)

    assert "2 silo(s) take part; the plan needs at least 3" in exc.value.message_dict["silos"][0]


# --------------------------------------------------------------------------------------------
# Approvals


def test_stewards_of_every_participating_silo_approve_the_exact_hash(g: Governed) -> None:
    plan = propose(g)

    approve(g.stewards[0], plan)
    state = governance.approval_state(plan.current_version)
    assert status_of(plan) == Status.SUBMITTED
    assert state.stewards_missing == [g.silos[1].name]

    approve(g.stewards[1], plan)

    assert status_of(plan) == Status.APPROVED
    state = governance.approval_state(plan.current_version)
    assert state.satisfied
    assert state.organizations_approved == [g.orgs[0].name, g.orgs[1].name]
    event = AuditEvent.objects.get(action="plan.fully_approved")
    assert event.data["plan_hash"] == plan.current_version.spec_hash
    assert audit_verify().ok


def test_editing_an_approved_plan_voids_its_approvals(g: Governed) -> None:
    plan = propose(g)
    approve(g.stewards[0], plan)
    approve(g.stewards[1], plan)
    v1 = plan.current_version

    v2 = plan_edit(
        actor=g.scientists[0],
        plan=plan,
        spec=plan_spec(training=training(lr=0.02)),
        silos=g.silos[:2],
    )

    plan.refresh_from_db()
    assert (plan.status, plan.current_version, v2.number) == (Status.SUBMITTED, v2, 2)
    assert v2.spec_hash != v1.spec_hash
    state = governance.approval_state(v2)
    assert not state.satisfied
    assert state.stewards_missing == sorted(s.name for s in g.silos[:2])
    assert state.organizations_approved == []
    assert v1.approvals.count() == 2  # history stays with the version it approved
    edited = AuditEvent.objects.get(action="plan.edited")
    assert edited.data["changed"] == ["training.lr"]
    assert edited.data["decisions_voided"] == 2

    with pytest.raises(Conflict) as exc:
        plan_approve(actor=g.stewards[0], plan=plan, plan_hash=v1.spec_hash)
    assert v1.spec_hash in exc.value.message and v2.spec_hash in exc.value.message

    approve(g.stewards[0], plan)
    approve(g.stewards[1], plan)
    assert status_of(plan) == Status.APPROVED


def test_an_approval_of_a_stale_or_unknown_hash_is_refused(g: Governed) -> None:
    plan = propose(g)
    before = snapshot()

    with pytest.raises(Conflict, match="stale plan hash"):
        plan_approve(actor=g.stewards[0], plan=plan, plan_hash="0" * 64)
    with pytest.raises(Conflict, match="stale plan hash"):
        plan_reject(actor=g.stewards[0], plan=plan, plan_hash="0" * 64, reason="no")
    with pytest.raises(ValidationError) as exc:
        plan_approve(actor=g.stewards[0], plan=plan, plan_hash="")
    assert set(exc.value.message_dict) == {"plan_hash"}

    assert snapshot() == before


def test_only_stewards_and_organisation_admins_decide(g: Governed) -> None:
    plan = propose(g)

    for user in (g.auditors[0], g.scientists[1], g.admin):
        with pytest.raises(PermissionDenied, match="data_steward, org_admin"):
            approve(user, plan)


def test_nobody_approves_a_plan_they_proposed(g: Governed) -> None:
    scientist = g.scientists[0]
    Membership.objects.create(user=scientist, organization=g.orgs[0], role=Role.DATA_STEWARD)
    plan = propose(g)
    before = snapshot()

    with pytest.raises(PermissionDenied, match="you proposed plan"):
        approve(scientist, plan)
    with pytest.raises(PermissionDenied, match="you proposed plan"):
        plan_reject(
            actor=scientist, plan=plan, plan_hash=plan.current_version.spec_hash, reason="hm"
        )

    assert snapshot() == before


def test_the_author_of_a_version_does_not_approve_it(g: Governed) -> None:
    editor = g.scientists[1]
    Membership.objects.create(user=editor, organization=g.orgs[1], role=Role.DATA_STEWARD)
    plan = propose(g)
    plan_edit(actor=editor, plan=plan, spec=plan_spec(seed=7), silos=g.silos[:2])

    with pytest.raises(PermissionDenied, match="you wrote version 2"):
        approve(editor, plan)


def test_a_rejection_needs_a_reason_and_stops_the_plan(g: Governed) -> None:
    plan = propose(g)
    current = plan.current_version.spec_hash
    before = snapshot()

    with pytest.raises(ValidationError) as exc:
        plan_reject(actor=g.stewards[1], plan=plan, plan_hash=current, reason="  ")
    assert set(exc.value.message_dict) == {"reason"}
    assert snapshot() == before
    assert status_of(plan) == Status.SUBMITTED

    rejection = plan_reject(
        actor=g.stewards[1], plan=plan, plan_hash=current, reason="uses patient age"
    )

    plan.refresh_from_db()
    assert (plan.status, plan.rejection_reason) == (Status.REJECTED, "uses patient age")
    assert rejection.decision == Approval.Decision.REJECT
    assert governance.approval_state(plan.current_version).rejected_by == [g.orgs[1].name]
    with pytest.raises(Conflict, match="only a submitted plan"):
        approve(g.stewards[0], plan)

    plan_edit(actor=g.scientists[0], plan=plan, spec=plan_spec(seed=3), silos=g.silos[:2])
    plan.refresh_from_db()
    assert (plan.status, plan.rejection_reason) == (Status.SUBMITTED, "")


@pytest.mark.parametrize(("value", "approvals_needed"), [(0.2, 1), (0.5, 2), (0.67, 3), (1.0, 3)])
def test_fraction_quorum_of_member_organisations(value: float, approvals_needed: int) -> None:
    g = governed_consortium(3, org_quorum_mode="fraction", org_quorum_value=value)
    plan = propose(g, silos=[g.silos[0]])
    approvers = [g.stewards[0], g.org_admins[1], g.org_admins[2]]

    for count, approver in enumerate(approvers, start=1):
        approve(approver, plan)
        if count < approvals_needed:
            assert status_of(plan) == Status.SUBMITTED
        else:
            break

    assert status_of(plan) == Status.APPROVED
    state = governance.approval_state(plan.current_version)
    assert (state.organizations_needed, len(state.organizations_approved)) == (
        approvals_needed,
        approvals_needed,
    )


@pytest.mark.parametrize(("value", "approvals_needed"), [(1, 1), (2, 2), (5, 3)])
def test_count_quorum_is_capped_at_the_number_of_organisations(
    value: int, approvals_needed: int
) -> None:
    g = governed_consortium(3, org_quorum_mode="count", org_quorum_value=value)
    plan = propose(g, silos=[g.silos[0]])

    for approver in [g.stewards[0], g.org_admins[1], g.org_admins[2]][:approvals_needed]:
        assert status_of(plan) == Status.SUBMITTED
        approve(approver, plan)

    assert status_of(plan) == Status.APPROVED
    assert governance.approval_state(plan.current_version).organizations_needed == approvals_needed


@pytest.mark.parametrize(
    ("mode", "value", "members", "needed"),
    [
        ("fraction", 0.5, 3, 2),
        ("fraction", 0.3, 10, 3),  # 0.3 * 10 is 3.0000000000000004 in floating point
        ("fraction", 1.0, 4, 4),
        ("fraction", 0.0, 4, 0),
        ("count", 2, 5, 2),
        ("count", 9, 5, 5),
        ("count", 2.7, 5, 2),
    ],
)
def test_organizations_needed(mode: str, value: float, members: int, needed: int) -> None:
    consortium = Consortium(org_quorum_mode=mode, org_quorum_value=value)

    assert governance.organizations_needed(consortium, members) == needed


def test_an_org_admin_counts_for_the_quorum_but_not_for_steward_unanimity() -> None:
    g = governed_consortium(3, org_quorum_mode="count", org_quorum_value=1)
    plan = propose(g)

    approve(g.org_admins[0], plan)
    approve(g.org_admins[1], plan)

    assert status_of(plan) == Status.SUBMITTED
    state = governance.approval_state(plan.current_version)
    assert state.stewards_missing == sorted(s.name for s in g.silos[:2])
    approve(g.stewards[0], plan)
    approve(g.stewards[1], plan)
    assert status_of(plan) == Status.APPROVED


def test_one_steward_approval_covers_all_of_its_organisations_silos(g: Governed) -> None:
    second = SiloFactory(organization=g.orgs[0], name="second-lab")
    plan = propose(g, silos=[g.silos[0], second, g.silos[1]])

    approve(g.stewards[0], plan)
    assert governance.approval_state(plan.current_version).stewards_missing == [g.silos[1].name]
    approve(g.stewards[1], plan)

    assert status_of(plan) == Status.APPROVED


def test_without_steward_unanimity_the_quorum_decides() -> None:
    g = governed_consortium(
        3, require_steward_unanimity=False, org_quorum_mode="count", org_quorum_value=1
    )
    plan = propose(g)

    approve(g.org_admins[2], plan)

    assert status_of(plan) == Status.APPROVED


def test_a_member_of_several_organisations_names_the_one_they_act_for(g: Governed) -> None:
    both = member(g.orgs[0], Role.DATA_STEWARD)
    Membership.objects.create(user=both, organization=g.orgs[1], role=Role.DATA_STEWARD)
    plan = propose(g)
    before = snapshot()

    with pytest.raises(ValidationError) as exc:
        approve(both, plan)
    message = exc.value.message_dict["organization"][0]
    assert g.orgs[0].name in message and g.orgs[1].name in message
    with pytest.raises(ValidationError, match="you act for"):
        approve(both, plan, organization=g.orgs[2])
    assert snapshot() == before

    approval = approve(both, plan, organization=g.orgs[1])

    assert (approval.organization, approval.role) == (g.orgs[1], Role.DATA_STEWARD)


def test_an_organisation_approves_a_version_once(g: Governed) -> None:
    plan = propose(g)
    approve(g.stewards[0], plan)
    second_steward = member(g.orgs[0], Role.DATA_STEWARD)

    with pytest.raises(Conflict, match="already decided"):
        approve(g.stewards[0], plan)
    with pytest.raises(Conflict, match="already approved"):
        approve(second_steward, plan)


DP_PRIVACY = {
    "mode": "sample",
    "target_epsilon": 3.0,
    "noise_multiplier": None,
    "clip": 1.0,
    "delta": 1e-5,
}


def test_a_plan_over_a_silos_privacy_budget_cannot_be_approved(g: Governed) -> None:
    # Silo 1's budget (1.0) cannot afford a plan calibrated to spend epsilon 3 at each silo.
    Silo.objects.filter(pk=g.silos[1].pk).update(epsilon_budget=1.0)
    plan = propose(g, privacy=DP_PRIVACY)
    before = snapshot()

    with pytest.raises(
        Conflict, match=f"silo '{g.silos[1].name}': after this plan .* over its budget"
    ):
        approve(g.stewards[0], plan)

    assert snapshot() == before


def test_a_plan_within_every_budget_is_approved_and_projects_its_target(g: Governed) -> None:
    Silo.objects.filter(pk__in=[s.pk for s in g.silos]).update(epsilon_budget=5.0)
    plan = propose(g, privacy=DP_PRIVACY)

    projected = governance.projected_epsilon(plan.current_version)
    approve(g.stewards[0], plan)
    approve(g.stewards[1], plan)

    assert status_of(plan) == Status.APPROVED
    assert all(2.9 <= eps <= 3.0 for eps in projected.values()), projected


def test_withdrawing_is_for_the_proposer_before_the_run(g: Governed) -> None:
    plan = propose(g)

    with pytest.raises(PermissionDenied, match="proposer"):
        plan_withdraw(actor=g.scientists[1], plan=plan)
    plan_withdraw(actor=g.scientists[0], plan=plan)

    assert status_of(plan) == Status.WITHDRAWN
    with pytest.raises(Conflict, match="only a submitted plan"):
        approve(g.stewards[0], plan)
    with pytest.raises(Conflict, match="withdrawn"):
        plan_edit(actor=g.scientists[0], plan=plan, spec=plan_spec(seed=1), silos=g.silos[:2])
    running = propose(g)
    TrainingPlan.objects.filter(pk=running.pk).update(status=Status.RUNNING)
    with pytest.raises(Conflict):
        plan_withdraw(actor=g.scientists[0], plan=running)


def test_who_may_edit_and_when(g: Governed) -> None:
    plan = propose(g)

    with pytest.raises(PermissionDenied, match="proposer or a data scientist"):
        plan_edit(actor=g.stewards[0], plan=plan, spec=plan_spec(seed=1), silos=g.silos[:2])
    with pytest.raises(ValidationError, match="nothing to change"):
        plan_edit(actor=g.scientists[0], plan=plan, spec=plan_spec(), silos=g.silos[:2])
    v2 = plan_edit(actor=g.scientists[2], plan=plan, spec=plan_spec(seed=1), silos=g.silos[:2])
    assert v2.created_by == g.scientists[2]

    TrainingPlan.objects.filter(pk=plan.pk).update(status=Status.RUNNING)
    before = snapshot()
    with pytest.raises(Conflict, match="stop its run"):
        plan_edit(actor=g.scientists[0], plan=plan, spec=plan_spec(seed=2), silos=g.silos[:2])
    assert snapshot() == before


def test_a_bad_edit_saves_nothing(g: Governed) -> None:
    plan = propose(g)
    before = snapshot()

    with pytest.raises(ValidationError) as exc:
        plan_edit(
            actor=g.scientists[0],
            plan=plan,
            spec=plan_spec(round_deadline_seconds=0, fairness={"sensitive_attribute": "sex"}),
            silos=g.silos[:2],
        )

    assert set(exc.value.message_dict) == {
        "spec.round_deadline_seconds",
        "spec.fairness.sensitive_attribute",
    }
    assert snapshot() == before
    plan.refresh_from_db()
    assert plan.current_version.number == 1


def test_plan_diff_shows_changed_paths_and_silos(g: Governed) -> None:
    plan = propose(g)
    v1 = plan.current_version
    mlp = {"kind": "mlp", "hidden": [16, 8]}
    v2 = plan_edit(
        actor=g.scientists[0],
        plan=plan,
        spec=plan_spec(model=mlp, training=training(lr=0.01), secure_aggregation=True),
        silos=[g.silos[0], g.silos[2]],
    )

    diff = governance.plan_diff(v1, v2)

    assert diff == [
        {"path": "model.hidden", "old": None, "new": [16, 8]},
        {"path": "model.kind", "old": "logistic_regression", "new": "mlp"},
        {"path": "secure_aggregation", "old": None, "new": True},
        {"path": "training.lr", "old": 0.05, "new": 0.01},
        {
            "path": "silos",
            "old": sorted([g.silos[0].name, g.silos[1].name]),
            "new": sorted([g.silos[0].name, g.silos[2].name]),
            "added": [g.silos[2].name],
            "removed": [g.silos[1].name],
        },
    ]
    assert governance.plan_diff(v2, v2) == []


def test_a_mitigation_is_part_of_the_hash_and_of_the_version_diff(g: Governed) -> None:
    schema = {**SCHEMA, "sensitive": ["region"]}
    fairness = {"sensitive_attribute": "region", "groups": {"region": ["north", "south"]}}
    for silo in g.silos[:2]:  # sites that hold the sensitive column
        silo.schema = schema
        silo.save(update_fields=["schema"])
    plan = propose(g, schema=schema, fairness=fairness)
    v1 = plan.current_version
    mitigation = {"kind": "constraint", "constraint": "equalized_odds", "bound": 0.02}
    spec = {**v1.spec, "fairness": {**fairness, "mitigation": mitigation}}
    v2 = plan_edit(actor=g.scientists[0], plan=plan, spec=spec, silos=list(v1.silos.all()))
    assert plan.versions.count() == 2

    assert v2.spec_hash != v1.spec_hash
    assert governance.plan_diff(v1, v2) == [
        {"path": "fairness.mitigation.bound", "old": None, "new": 0.02},
        {"path": "fairness.mitigation.constraint", "old": None, "new": "equalized_odds"},
        {"path": "fairness.mitigation.kind", "old": None, "new": "constraint"},
    ]


@pytest.mark.parametrize(
    ("kind", "extra", "words"),
    [
        ("constraint", {}, "secure_aggregation does not cover"),
        ("reweighing", {}, "secure_aggregation does not cover"),
        ("fair_aggregation", {"dp_epsilon": 1.0}, "secure aggregation hides"),
        ("postprocess", {}, "outside the masked vector of the rounds"),
        ("postprocess", {"dp_epsilon": 1.0}, None),
        ("constraint", {"dp_epsilon": 1.0}, None),
        ("reweighing", {"dp_epsilon": 1.0}, None),
    ],
)
def test_a_mitigation_with_secure_aggregation_is_accepted_or_refused_at_proposal_with_the_reason(
    g: Governed, kind: str, extra: dict[str, Any], words: str | None
) -> None:
    schema = {**SCHEMA, "sensitive": ["region"]}
    fairness = {
        "sensitive_attribute": "region",
        "groups": {"region": ["north", "south"]},
        "mitigation": {"kind": kind},
        **extra,
    }
    for silo in g.silos[:2]:
        silo.schema = schema
        silo.save(update_fields=["schema"])
    if words is None:
        plan = propose(g, schema=schema, fairness=fairness, secure_aggregation=True)
        assert plan.current_version.spec["fairness"]["mitigation"]["kind"] == kind
        return
    with pytest.raises(ValidationError) as exc:
        propose(g, schema=schema, fairness=fairness, secure_aggregation=True)
    assert words in exc.value.message_dict["spec.fairness.mitigation.kind"][0]


# --------------------------------------------------------------------------------------------
# Members


def test_admins_add_members(g: Governed) -> None:
    newcomer = UserFactory()

    membership_add(actor=g.admin, user=newcomer, organization=g.orgs[2], role=Role.AUDITOR)
    membership_add(
        actor=g.org_admins[1], user=newcomer, organization=g.orgs[1], role=Role.DATA_STEWARD
    )

    assert set(newcomer.memberships.values_list("organization", "role")) == {
        (g.orgs[2].pk, Role.AUDITOR),
        (g.orgs[1].pk, Role.DATA_STEWARD),
    }
    assert actions() == ["membership.added", "membership.added"]
    with pytest.raises(PermissionDenied, match="only an organisation admin of"):
        membership_add(
            actor=g.org_admins[1], user=newcomer, organization=g.orgs[2], role=Role.DATA_STEWARD
        )
    with pytest.raises(PermissionDenied, match="only a consortium admin"):
        membership_add(
            actor=g.org_admins[1], user=newcomer, organization=g.orgs[1], role=Role.CONSORTIUM_ADMIN
        )
    with pytest.raises(PermissionDenied):
        membership_add(actor=g.stewards[0], user=newcomer, organization=g.orgs[0], role="auditor")
    with pytest.raises(Conflict, match="already"):
        membership_add(actor=g.admin, user=newcomer, organization=g.orgs[2], role=Role.AUDITOR)
    before = snapshot()
    with pytest.raises(ValidationError) as exc:
        membership_add(actor=g.admin, user=newcomer, organization=g.orgs[2], role="overlord")
    assert set(exc.value.message_dict) == {"role"}
    assert snapshot() == before


# --------------------------------------------------------------------------------------------
# Other consortia see nothing


def _outsider_calls() -> dict[str, Callable[[Governed, Any, TrainingPlan, Silo], Any]]:
    def hash_of(plan: TrainingPlan) -> str:
        return plan.current_version.spec_hash

    return {
        "silo_register": lambda g, u, plan, pending: silo_register(
            actor=u,
            organization=g.orgs[0],
            name="mine",
            description="",
            schema=SCHEMA,
            row_count=1,
            location="",
        ),
        "silo_admit": lambda g, u, plan, pending: silo_admit(actor=u, silo=pending),
        "silo_reject": lambda g, u, plan, pending: silo_reject(actor=u, silo=pending, reason="x"),
        "silo_rotate_token": lambda g, u, plan, pending: silo_rotate_token(
            actor=u, silo=g.silos[0]
        ),
        "silo_revoke_token": lambda g, u, plan, pending: silo_revoke_token(
            actor=u, silo=g.silos[0]
        ),
        "membership_add": lambda g, u, plan, pending: membership_add(
            actor=u, user=u, organization=g.orgs[0], role=Role.CONSORTIUM_ADMIN
        ),
        "plan_propose": lambda g, u, plan, pending: plan_propose(
            actor=u,
            consortium=g.consortium,
            name="x",
            description="",
            spec=plan_spec(),
            silos=g.silos,
        ),
        "plan_edit": lambda g, u, plan, pending: plan_edit(
            actor=u, plan=plan, spec=plan_spec(seed=5), silos=g.silos
        ),
        "plan_submit": lambda g, u, plan, pending: plan_submit(actor=u, plan=plan),
        "plan_withdraw": lambda g, u, plan, pending: plan_withdraw(actor=u, plan=plan),
        "plan_approve": lambda g, u, plan, pending: plan_approve(
            actor=u, plan=plan, plan_hash=hash_of(plan)
        ),
        "plan_reject": lambda g, u, plan, pending: plan_reject(
            actor=u, plan=plan, plan_hash=hash_of(plan), reason="x"
        ),
        "plan_reject_without_reason": lambda g, u, plan, pending: plan_reject(
            actor=u, plan=plan, plan_hash=hash_of(plan), reason=""
        ),
    }


@pytest.mark.parametrize("service", sorted(_outsider_calls()))
def test_a_member_of_another_consortium_gets_404(g: Governed, service: str) -> None:
    # The outsider holds every role, in another consortium: none of it reaches this one.
    other = governed_consortium(1)
    outsider = member(other.orgs[0], *Role.values)
    plan = propose(g)
    pending = SiloFactory(organization=g.orgs[0], admission=Silo.Admission.PENDING)
    before = snapshot()

    with pytest.raises(Http404):
        _outsider_calls()[service](g, outsider, plan, pending)

    assert snapshot() == before
