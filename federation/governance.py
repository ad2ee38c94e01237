"""Governance rules as read-only logic: approval state, version diffs, projected privacy cost.

Nothing here writes; the services in ``federation.services.plans`` act on what it computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from federation.models import Approval, Consortium, Membership, PlanVersion, Role, Silo


@dataclass
class RulePart:
    """One part of a consortium's approval rule and where a version stands against it.

    ``counted`` never exceeds ``needed`` (so nothing reads "5 of 3 needed"); ``approved`` lists
    everyone whose approval counts, more than needed included.
    """

    name: str  # "stewards" or "organizations"
    rule: str  # whose approvals count for this part, in words
    needed: int
    counted: int
    approved: list[str]
    missing: list[str]  # silos (stewards) or organisations (organizations) not yet approved
    met: bool
    progress: str  # "met (4 approved, 3 needed)" or "1 of 3 needed"


@dataclass
class ApprovalState:
    """Where a plan version stands against its consortium's approval rules."""

    plan_hash: str
    # Names of participating silos whose organisation's steward has not approved.
    stewards_missing: list[str] = field(default_factory=list)
    # Names of organisations with an approval by a data steward or an organisation admin.
    organizations_approved: list[str] = field(default_factory=list)
    organizations_needed: int = 0
    # Names of the organisations that rejected this version.
    rejected_by: list[str] = field(default_factory=list)
    # Approvals recorded but not counted, each with why (no active role behind it, or a person
    # already counted for another organisation).
    not_counted: list[str] = field(default_factory=list)
    satisfied: bool = False
    # The rule in one sentence, and each of its parts with its progress (what pages show).
    rule: str = ""
    parts: list[RulePart] = field(default_factory=list)


# Whose approvals count for which part: the one statement the service, the pages, the API and
# docs/governance.md ("The approval rule") share.
STEWARD_PART_RULE = (
    "a data steward of each participating silo's organisation approves (one steward approval "
    "covers all of that organisation's silos); only data stewards count here"
)
ORGANIZATION_PART_RULE = (
    "enough member organisations approve; an organisation approves through any one of its data "
    "stewards or organisation admins, so a steward's approval also counts for their "
    "organisation here, and further approvals of the same organisation count once"
)


def organizations_needed(consortium: Consortium, member_count: int) -> int:
    """How many member organisations must approve under the consortium's quorum rule."""
    value = max(0.0, float(consortium.org_quorum_value))
    if consortium.org_quorum_mode == Consortium.QuorumMode.COUNT:
        return min(int(value), member_count)
    # A small tolerance so that 0.3 * 10 (= 3.0000000000000004) asks for 3, not 4.
    return min(math.ceil(value * member_count - 1e-9), member_count)


def progress_text(counted: int, needed: int, approved: int) -> str:
    """A part's progress in words: "1 of 3 needed", or "met (5 approved, 3 needed)"."""
    if counted >= needed:
        return f"met ({approved} approved, {needed} needed)" if approved > needed else "met"
    return f"{counted} of {needed} needed"


def approval_rule_text(consortium: Consortium, member_count: int) -> str:
    """The consortium's approval rule as one sentence, with its parts."""
    needed = organizations_needed(consortium, member_count)
    quorum = f"at least {needed} of its {member_count} member organisations"
    if consortium.org_quorum_mode == Consortium.QuorumMode.FRACTION:
        quorum += f" (a fraction of {float(consortium.org_quorum_value):g})"
    parts = []
    if consortium.require_steward_unanimity:
        parts.append(
            "(1) a data steward of every participating silo's organisation approves it, and "
        )
    parts.append(
        f"{'(2) ' if parts else ''}{quorum} approve it, each through a data steward or an "
        "organisation admin (a steward's approval counts for both parts; an organisation "
        "counts once)"
    )
    return (
        "A version is approved when nobody rejected it and "
        + "".join(parts)
        + ". Nobody decides on a plan they proposed or a version they wrote."
    )


def approval_state(version: PlanVersion) -> ApprovalState:
    """Evaluate the consortium's rules over the decisions recorded for this version."""
    consortium = version.plan.consortium
    decisions = list(
        Approval.objects.filter(version=version, plan_hash=version.spec_hash).select_related(
            "organization", "user"
        )
    )
    approvals, not_counted = _counted_approvals(
        consortium, [a for a in decisions if a.decision == Approval.Decision.APPROVE]
    )
    rejections = [a for a in decisions if a.decision == Approval.Decision.REJECT]
    silos = list(version.silos.order_by("name"))
    members = list(consortium.organizations.order_by("name").values_list("name", flat=True))

    parts: list[RulePart] = []
    stewards_missing: list[str] = []
    if consortium.require_steward_unanimity:
        # One steward approval acting for organisation O covers all of O's participating silos.
        steward_orgs = {a.organization_id for a in approvals if a.role == Role.DATA_STEWARD}
        stewards_missing = [s.name for s in silos if s.organization_id not in steward_orgs]
        covered = [s.name for s in silos if s.organization_id in steward_orgs]
        parts.append(
            RulePart(
                name="stewards",
                rule=STEWARD_PART_RULE,
                needed=len(silos),
                counted=len(covered),
                approved=covered,
                missing=stewards_missing,
                met=bool(silos) and not stewards_missing,
                progress=(
                    "met"
                    if silos and not stewards_missing
                    else f"{len(covered)} of {len(silos)} silos"
                ),
            )
        )
    organizations_approved = sorted({a.organization.name for a in approvals})
    needed = organizations_needed(consortium, len(members))
    counted = min(len(organizations_approved), needed)
    parts.append(
        RulePart(
            name="organizations",
            rule=ORGANIZATION_PART_RULE,
            needed=needed,
            counted=counted,
            approved=organizations_approved,
            missing=[name for name in members if name not in organizations_approved],
            met=len(organizations_approved) >= needed,
            progress=progress_text(counted, needed, len(organizations_approved)),
        )
    )
    rejected_by = sorted({a.organization.name for a in rejections})
    satisfied = bool(silos) and all(part.met for part in parts) and not rejected_by
    return ApprovalState(
        plan_hash=version.spec_hash,
        stewards_missing=stewards_missing,
        organizations_approved=organizations_approved,
        organizations_needed=needed,
        rejected_by=rejected_by,
        not_counted=not_counted,
        satisfied=satisfied,
        rule=approval_rule_text(consortium, len(members)),
        parts=parts,
    )


def _counted_approvals(
    consortium: Consortium, approvals: list[Approval]
) -> tuple[list[Approval], list[str]]:
    """The approvals that count: distinct people, each backed by an active role grant.

    An approval counts only while its author holds, actively (an accepted grant), the role it was
    made in for the organisation it was made for; so a row written around the services (a forged
    approval in a steward's name who is no steward there) counts for nothing. One person counts
    for one organisation only (their earliest approval), whatever rows the database holds.
    """
    held = set(
        Membership.objects.filter(
            organization__consortium=consortium,
            status=Membership.Status.ACTIVE,
            role__in=[Role.DATA_STEWARD, Role.ORG_ADMIN],
        ).values_list("user_id", "organization_id", "role")
    )
    counted: list[Approval] = []
    not_counted: list[str] = []
    person_org: dict[int, Approval] = {}
    for approval in sorted(approvals, key=lambda a: (a.created_at, a.pk)):
        who = approval.user.get_username()
        org = approval.organization.name
        if (approval.user_id, approval.organization_id, approval.role) not in held:
            not_counted.append(f"{who} for {org}: holds no active {approval.role} role in {org}")
            continue
        first = person_org.setdefault(approval.user_id, approval)
        if first.organization_id != approval.organization_id:
            not_counted.append(
                f"{who} for {org}: already counted for {first.organization.name} "
                "(one person counts for one organisation)"
            )
            continue
        counted.append(approval)
    return counted, not_counted


_ABSENT = object()


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts as dotted paths; lists and scalars are leaves (compared whole)."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


def plan_diff(old: PlanVersion, new: PlanVersion) -> list[dict[str, Any]]:
    """What changed from one version to another: spec paths (sorted), then the silos.

    ``[{"path": "training.lr", "old": 0.01, "new": 0.02}, ...]``; a path absent on one side has
    ``None`` there. A change of silos is one entry ``{"path": "silos", "old": [...], "new": [...],
    "added": [...], "removed": [...]}`` (silo names, sorted).
    """
    before = _flatten(old.spec, "", {})
    after = _flatten(new.spec, "", {})
    changes: list[dict[str, Any]] = []
    for path in sorted(before.keys() | after.keys()):
        a, b = before.get(path, _ABSENT), after.get(path, _ABSENT)
        # `type` too: 1 == 1.0 == True in Python, but they are different plans (and hashes).
        if a is _ABSENT or b is _ABSENT or type(a) is not type(b) or a != b:
            changes.append(
                {
                    "path": path,
                    "old": None if a is _ABSENT else a,
                    "new": None if b is _ABSENT else b,
                }
            )
    old_silos = set(old.silos.values_list("name", flat=True))
    new_silos = set(new.silos.values_list("name", flat=True))
    if old_silos != new_silos:
        changes.append(
            {
                "path": "silos",
                "old": sorted(old_silos),
                "new": sorted(new_silos),
                "added": sorted(new_silos - old_silos),
                "removed": sorted(old_silos - new_silos),
            }
        )
    return changes


def projected_epsilon(version: PlanVersion) -> dict[str, float]:
    """The epsilon a run of this version alone would spend at each silo, by silo name.

    0.0 for a plan without DP. Computed with the same accountant and formulas as the site
    agents (fedcore.privacy.accounting.plan_mechanism), from each silo's registered rows, plus
    the noisy fairness counts of every round (``fairness.dp_epsilon``, basic composition) and
    the noised statistics pass (``privacy.statistics_epsilon``).
    """
    from federation import ledger

    fairness = ledger.plan_pure_epsilon(version.spec)
    out: dict[str, float] = {}
    for silo in version.silos.order_by("name"):
        mechanism = ledger.plan_mechanism(version.spec, silo)
        out[silo.name] = fairness + (
            0.0
            if mechanism is None
            else ledger.composed_epsilon([mechanism], ledger.plan_delta(version.spec) or 1e-5)
        )
    return out


def silo_remaining_epsilon(silo: Silo) -> float | None:
    """The silo's budget minus what it has spent; None when no budget is set (unlimited)."""
    from federation import ledger

    if silo.epsilon_budget is None:
        return None
    return max(0.0, silo.epsilon_budget - ledger.silo_spent_epsilon(silo))


def privacy_budget_problems(version: PlanVersion) -> list[str]:
    """Why the version's projected privacy cost does not fit, one message per silo over budget.

    The test is exact: the silo's history composed with a whole run of this version, by the
    accountant, against the budget (composition is not additive, so "cost <= budget - spent"
    would be wrong in both directions).
    """
    from federation import ledger

    problems = []
    for silo in version.silos.order_by("name"):
        if silo.epsilon_budget is None:
            continue
        total = ledger.projected_total(silo, version)
        if total > silo.epsilon_budget:
            spent = ledger.silo_spent_epsilon(silo)
            problems.append(
                f"silo '{silo.name}': after this plan its data would have spent epsilon="
                f"{total:.4g} (spent so far {spent:.4g}), over its budget epsilon="
                f"{silo.epsilon_budget:.4g}"
            )
    return problems
