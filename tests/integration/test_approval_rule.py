"""The approval rule as one rule with two parts, and what the API, pages and refusals say of it.

Stewards' part: a data steward of every participating silo's organisation. Organisations' part:
a quorum of member organisations, each approving through any one of its data stewards or
organisation admins, so a steward's approval counts for both parts (docs/governance.md).
"""

from __future__ import annotations

from typing import Any

import pytest
from django.test import Client

from federation import governance
from federation.models import Approval, AuditEvent, TrainingPlan
from federation.services.errors import Conflict
from federation.services.plans import plan_approve, plan_propose, plan_reject
from tests.api_factories import client_for
from tests.factories import plan_spec
from tests.governance_factories import Governed, governed_consortium

pytestmark = pytest.mark.django_db

Status = TrainingPlan.Status


def approve(user: Any, plan: TrainingPlan) -> Approval:
    plan.refresh_from_db()
    return plan_approve(actor=user, plan=plan, plan_hash=plan.current_version.spec_hash)


def propose(g: Governed, silos: list[Any]) -> TrainingPlan:
    return plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="Readmission",
        description="",
        spec=plan_spec(),
        silos=silos,
    )


def test_stewards_fill_both_parts_and_a_later_org_admin_is_told_why_not() -> None:
    """The issue's walk: four institutions, three silos, a quorum of half the members."""
    g = governed_consortium(4, org_quorum_mode="fraction", org_quorum_value=0.5)
    plan = propose(g, g.silos[:3])

    approve(g.stewards[0], plan)
    state = governance.approval_state(plan.current_version)
    stewards, organizations = state.parts
    assert (stewards.name, stewards.progress, stewards.met) == ("stewards", "1 of 3 silos", False)
    assert (organizations.progress, organizations.met) == ("1 of 2 needed", False)
    approve(g.stewards[1], plan)
    state = governance.approval_state(plan.current_version)
    assert state.parts[1].progress == "met" and not state.parts[0].met  # quorum met first
    approve(g.stewards[2], plan)

    plan.refresh_from_db()
    assert plan.status == Status.APPROVED
    state = governance.approval_state(plan.current_version)
    organizations = state.parts[1]
    assert (organizations.needed, organizations.counted) == (2, 2)  # capped, never "3 of 2"
    assert organizations.progress == "met (3 approved, 2 needed)"
    assert len(organizations.approved) == 3

    rows, events = Approval.objects.count(), AuditEvent.objects.count()
    with pytest.raises(Conflict) as same_org:
        approve(g.org_admins[0], plan)  # their steward already counted for their organisation
    message = str(same_org.value)
    assert "is already approved: its rule is met" in message
    assert "stewards of every participating silo: met" in message
    assert "organisations: met (3 approved, 2 needed)" in message
    assert f"{g.orgs[0].name} already counts" in message
    assert g.stewards[0].username in message and "nothing left to approve" in message
    with pytest.raises(Conflict) as other_org:
        approve(g.org_admins[3], plan)  # no silo in the plan, and not needed for the quorum
    assert f"{g.orgs[3].name}'s approval is not needed" in str(other_org.value)
    with pytest.raises(Conflict, match="can no longer be rejected; ask the proposer to withdraw"):
        plan_reject(
            actor=g.org_admins[3],
            plan=plan,
            plan_hash=plan.current_version.spec_hash,
            reason="late",
        )
    assert (Approval.objects.count(), AuditEvent.objects.count()) == (rows, events)


def test_org_admins_count_for_the_quorum_only() -> None:
    g = governed_consortium(3, org_quorum_mode="count", org_quorum_value=3)
    plan = propose(g, [g.silos[0]])

    for admin in g.org_admins:
        approve(admin, plan)

    state = governance.approval_state(plan.current_version)
    assert [p.met for p in state.parts] == [False, True]
    assert state.parts[0].missing == [g.silos[0].name] and not state.satisfied
    approve(g.stewards[0], plan)
    assert governance.approval_state(plan.current_version).satisfied


def test_the_api_and_the_plan_page_show_each_part_capped() -> None:
    g = governed_consortium(3, org_quorum_mode="count", org_quorum_value=1)
    plan = propose(g, g.silos[:2])
    approve(g.org_admins[2], plan)
    approve(g.stewards[0], plan)  # two organisations approved; one needed; a steward missing

    body = client_for(g.auditors[0]).get(f"/api/v1/plans/{plan.pk}/").json()["approval_state"]
    assert body["rule"].startswith("A version is approved when nobody rejected it and (1) a data")
    parts = {part["name"]: part for part in body["parts"]}
    assert parts["organizations"]["progress"] == "met (2 approved, 1 needed)"
    assert (parts["organizations"]["counted"], parts["organizations"]["needed"]) == (1, 1)
    assert parts["stewards"]["progress"] == "1 of 2 silos"
    assert parts["stewards"]["missing"] == [g.silos[1].name]
    assert "only data stewards count here" in parts["stewards"]["rule"]
    assert "a steward's approval also counts" in parts["organizations"]["rule"]

    browser = Client()
    browser.force_login(g.auditors[0])
    html = browser.get(f"/plans/{plan.pk}/").content.decode()
    assert "met (2 approved, 1 needed)" in html and "2 of 1" not in html
    assert f"stewards missing: {g.silos[1].name}" in html
    assert "at least 1 of its 3 member organisations approve it" in html


@pytest.mark.parametrize(
    ("counted", "needed", "approved", "text"),
    [
        (0, 3, 0, "0 of 3 needed"),
        (2, 3, 2, "2 of 3 needed"),
        (3, 3, 3, "met"),
        (3, 3, 5, "met (5 approved, 3 needed)"),
        (0, 0, 0, "met"),
    ],
)
def test_progress_never_says_more_than_needed(
    counted: int, needed: int, approved: int, text: str
) -> None:
    assert governance.progress_text(counted, needed, approved) == text
