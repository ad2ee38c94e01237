"""Membership writes: giving a user a role in an organisation, inviting and accepting.

Separation of duties (docs/governance.md): the approving roles of an organisation (data steward,
organisation admin) are granted only by that organisation's own organisation admin. A consortium
admin may only *invite* an organisation's first admin, and the invitee must accept before the role
counts. Nobody grants a role to themselves, and one person holds approving roles in at most one
organisation of a consortium. Every grant, invitation and acceptance is audited, and so is every
refused attempt (in its own transaction, since the refused write leaves nothing else behind).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import Http404
from django.utils import timezone

from federation import permissions
from federation.models import Membership, Organization, Role
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict

APPROVING = permissions.APPROVING_ROLES
Status = Membership.Status


def membership_add(*, actor: Any, user: Any, organization: Organization, role: str) -> Membership:
    """Give a user a role in an organisation (or invite an organisation's first admin).

    Who may grant what:

    - data steward, organisation admin (the approving roles): only an organisation admin of that
      same organisation. A consortium admin may invite the first organisation admin of an
      organisation that has none (active or invited); the membership is then ``pending`` and
      gives nothing until the invitee accepts it (``membership_accept``).
    - data scientist, auditor: a consortium admin, or an organisation admin of that organisation.
    - consortium admin: a consortium admin; to bootstrap a consortium, the operator (``actor``
      None: ``manage.py grant_consortium_admin``) or a platform superuser.

    Nobody grants a role to themselves; a person holds approving roles in at most one
    organisation of a consortium. A refusal raises PermissionDenied (403) or Conflict (409) with
    the reason, changes nothing and is audited as ``membership.refused``.
    """
    try:
        return _membership_add(actor=actor, user=user, organization=organization, role=role)
    except (PermissionDenied, Conflict) as refused:
        _audit_refused(
            actor=actor,
            organization=organization,
            reason=str(refused),
            user=user,
            role=role,
            attempt="grant",
        )
        raise


@transaction.atomic
def membership_accept(*, actor: Any, membership: Membership) -> Membership:
    """The invitee accepts a pending membership (an invitation); only then does its role count.

    Anyone but the invitee gets 404 (an invitation is nobody else's business); an accepted one
    is a Conflict. The one-organisation rule is checked again, since roles may have changed since
    the invitation.
    """
    membership = (
        Membership.objects.select_for_update()
        .select_related("organization", "user")
        .filter(pk=membership.pk)
        .first()
    )
    if membership is None or membership.user_id != getattr(actor, "pk", None):
        raise Http404("no such invitation")
    organization = membership.organization
    if membership.status != Status.PENDING:
        raise Conflict(
            f"your {membership.role} membership of {organization.name} is already active; "
            "there is nothing to accept"
        )
    if membership.role in APPROVING:
        _check_one_organisation(membership.user, organization, membership.role)
    membership.status = Status.ACTIVE
    membership.accepted_at = timezone.now()
    membership.save(update_fields=["status", "accepted_at"])
    audit_append(
        actor=actor_label(actor),
        action="membership.accepted",
        consortium_id=organization.consortium_id,
        object_type="membership",
        object_id=membership.pk,
        data=_membership_data(membership),
    )
    return membership


def _membership_data(membership: Membership) -> dict[str, Any]:
    granted_by = membership.granted_by
    return {
        "user": membership.user.get_username(),
        "organization": membership.organization.name,
        "organization_id": membership.organization_id,
        "role": membership.role,
        "status": membership.status,
        "granted_by": granted_by.get_username() if granted_by is not None else None,
    }


def _audit_refused(
    *, actor: Any, organization: Organization, reason: str, user: Any, role: Any, attempt: str
) -> None:
    with transaction.atomic():
        audit_append(
            actor=actor_label(actor),
            action="membership.refused",
            consortium_id=organization.consortium_id,
            object_type="organization",
            object_id=organization.pk,
            data={
                "attempt": attempt,
                "user": user.get_username() if getattr(user, "pk", None) else None,
                "organization": organization.name,
                "organization_id": organization.pk,
                "role": str(role)[:50],
                "reason": reason,
            },
        )


def _org_admins(organization: Organization) -> list[str]:
    """Usernames of the organisation's admins, active or invited."""
    return list(
        Membership.objects.filter(organization=organization, role=Role.ORG_ADMIN)
        .order_by("user__username")
        .values_list("user__username", flat=True)
    )


def _check_one_organisation(user: Any, organization: Organization, role: str) -> None:
    """Conflict when the user holds (or is invited to) an approving role in another organisation."""
    elsewhere = (
        Membership.objects.filter(
            user=user,
            organization__consortium_id=organization.consortium_id,
            role__in=list(APPROVING),
        )
        .exclude(organization=organization)
        .select_related("organization")
        .order_by("organization__name")
        .first()
    )
    if elsewhere is not None:
        raise Conflict(
            f"{user.get_username()} already holds the approving role {elsewhere.role} in "
            f"{elsewhere.organization.name}; one person holds approving roles (data steward, "
            f"organisation admin) in at most one organisation, so they cannot also be {role} "
            f"of {organization.name}"
        )


@transaction.atomic
def _membership_add(*, actor: Any, user: Any, organization: Organization, role: str) -> Membership:
    consortium_id = organization.consortium_id
    # A consortium's first admin is made by the operator: at the shell (actor None, the
    # grant_consortium_admin command) or by a platform superuser in code. Never any other role.
    bootstrap = role == Role.CONSORTIUM_ADMIN and (
        actor is None or getattr(actor, "is_superuser", False)
    )
    roles = (
        permissions.roles_in(actor, consortium_id)
        if bootstrap
        else permissions.require_roles(
            actor, consortium_id, permissions.CAN_MANAGE_MEMBERS, "adding a member"
        )
    )
    if role not in Role.values:
        raise ValidationError({"role": f"unknown role {role!r}; allowed: {', '.join(Role.values)}"})
    if getattr(user, "pk", None) is not None and user.pk == getattr(actor, "pk", None):
        raise PermissionDenied(
            f"you cannot grant yourself the role {role} in {organization.name}: nobody grants a "
            "role to themselves"
            + (
                f"; approving roles of {organization.name} are granted by its own organisation "
                "admin"
                if role in APPROVING
                else ""
            )
        )
    consortium_admin = Role.CONSORTIUM_ADMIN in roles
    own_admin = (
        permissions.organizations_with_role(actor, consortium_id, {Role.ORG_ADMIN})
        .filter(pk=organization.pk)
        .exists()
    )
    status = Status.ACTIVE
    if role in APPROVING:
        admins = _org_admins(organization)
        if not own_admin:
            if consortium_admin and role == Role.ORG_ADMIN and not admins:
                status = Status.PENDING  # the invitation of the organisation's first admin
            else:
                raise PermissionDenied(_approving_refusal(organization, role, admins))
    elif role == Role.CONSORTIUM_ADMIN:
        if not (consortium_admin or bootstrap):
            raise PermissionDenied("only a consortium admin can make someone consortium admin")
    elif not (consortium_admin or own_admin):
        raise PermissionDenied(
            f"you are not an organisation admin of {organization.name}; only its admins "
            "or a consortium admin can add members to it"
        )
    if user is None or not getattr(user, "pk", None):
        raise ValidationError({"user": "a saved user is required"})
    existing = Membership.objects.filter(user=user, organization=organization, role=role).first()
    if existing is not None:
        state = " (invited, not accepted yet)" if existing.status == Status.PENDING else ""
        raise Conflict(f"{user.get_username()} already is {role} of {organization.name}{state}")
    if role in APPROVING:
        _check_one_organisation(user, organization, role)
    membership = Membership.objects.create(
        user=user,
        organization=organization,
        role=role,
        status=status,
        granted_by=actor if getattr(actor, "pk", None) else None,
    )
    audit_append(
        actor=actor_label(actor),
        action="membership.invited" if status == Status.PENDING else "membership.added",
        consortium_id=consortium_id,
        object_type="membership",
        object_id=membership.pk,
        data=_membership_data(membership),
    )
    return membership


def _approving_refusal(organization: Organization, role: str, admins: list[str]) -> str:
    """Why this actor cannot grant an approving role in the organisation, and who can."""
    head = (
        f"{role} of {organization.name} is an approving role: only an organisation admin of "
        f"{organization.name} grants it"
    )
    if admins:
        return f"{head} (its admins: {', '.join(admins)}); ask one of them"
    if role == Role.ORG_ADMIN:
        return head
    return (
        f"{head}, and it has none yet; a consortium admin may invite its first organisation "
        "admin (role org_admin), who accepts and then grants this role"
    )
