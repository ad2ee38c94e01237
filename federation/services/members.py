"""Membership writes: giving a user a role in an organisation, inviting and accepting, changing
a role and deactivating a membership.

Separation of duties (docs/governance.md): the approving roles of an organisation (data steward,
organisation admin) are granted only by that organisation's own organisation admin. A consortium
admin may only *invite* an organisation's first admin, and the invitee must accept before the role
counts. Nobody grants a role to themselves, and one person holds approving roles in at most one
organisation of a consortium. Every grant, invitation and acceptance is audited, and so is every
refused attempt (in its own transaction, since the refused write leaves nothing else behind).

Changing and removing a role follow the rules of granting it: an approving role is changed or
deactivated only by an organisation admin of its organisation (a consortium admin may withdraw
the pending invitation of an organisation's first admin), a consortium admin role only by a
consortium admin. Nobody changes their own role; anyone may deactivate their own membership
(resign), except the last active consortium admin of a consortium.
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction
from django.http import Http404
from django.utils import timezone

from federation import permissions
from federation.models import Invitation, Membership, Organization, Role
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
    if membership.status == Status.DEACTIVATED:
        raise Conflict(
            f"this invitation to be {membership.role} of {organization.name} was withdrawn; "
            "ask for a new one"
        )
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
    *,
    actor: Any,
    organization: Organization,
    reason: str,
    user: Any,
    role: Any,
    attempt: str,
    extra: dict[str, Any] | None = None,
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
                **(extra or {}),
            },
        )


def _org_admins(organization: Organization, *, except_invitation: Any = None) -> list[str]:
    """The organisation's admins, active or invited: usernames, and the e-mail addresses of open
    invitations to the role (but ``except_invitation``, the one being accepted)."""
    admins = list(
        Membership.objects.filter(
            organization=organization,
            role=Role.ORG_ADMIN,
            status__in=[Status.ACTIVE, Status.PENDING],
        )
        .order_by("user__username")
        .values_list("user__username", flat=True)
    )
    invited = Invitation.objects.filter(
        organization=organization,
        role=Role.ORG_ADMIN,
        accepted_at__isnull=True,
        revoked_at__isnull=True,
        expires_at__gt=timezone.now(),
    ).order_by("email")
    if except_invitation is not None:
        invited = invited.exclude(pk=except_invitation.pk)
    return admins + [
        f"{email} (invited by e-mail)" for email in invited.values_list("email", flat=True)
    ]


def _check_one_organisation(user: Any, organization: Organization, role: str) -> None:
    """Conflict when the user holds (or is invited to) an approving role in another organisation."""
    elsewhere = (
        Membership.objects.filter(
            user=user,
            organization__consortium_id=organization.consortium_id,
            role__in=list(APPROVING),
            status__in=[Status.ACTIVE, Status.PENDING],
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


def membership_grant_check(
    *,
    actor: Any,
    organization: Organization,
    role: str,
    user: Any = None,
    email: str = "",
    except_invitation: Any = None,
) -> str:
    """Whether ``actor`` may give ``role`` in ``organization`` (to ``user``, or to whoever holds
    ``email``): the status the membership would have (active; pending for the first admin a
    consortium admin invites), else PermissionDenied (or 404 for a non-member) with the reason.

    The one place of the rules of ``membership_add``; e-mail invitations check them when they
    are sent and again, with the inviter as actor, when they are accepted.
    """
    consortium_id = organization.consortium_id
    # A consortium's first admin is made by the operator: at the shell (actor None, the
    # grant_consortium_admin and create_consortium commands) or by a platform superuser in code.
    # Never any other role.
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
    actor_email = (getattr(actor, "email", "") or "").strip().lower()
    if (getattr(user, "pk", None) is not None and user.pk == getattr(actor, "pk", None)) or (
        email and actor_email and email.strip().lower() == actor_email
    ):
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
    if role in APPROVING:
        admins = _org_admins(organization, except_invitation=except_invitation)
        if own_admin:
            return Status.ACTIVE
        if consortium_admin and role == Role.ORG_ADMIN and not admins:
            return Status.PENDING  # the invitation of the organisation's first admin
        raise PermissionDenied(_approving_refusal(organization, role, admins))
    if role == Role.CONSORTIUM_ADMIN:
        if not (consortium_admin or bootstrap):
            raise PermissionDenied("only a consortium admin can make someone consortium admin")
    elif not (consortium_admin or own_admin):
        raise PermissionDenied(
            f"you are not an organisation admin of {organization.name}; only its admins "
            "or a consortium admin can add members to it"
        )
    return Status.ACTIVE


def membership_user_check(*, user: Any, organization: Organization, role: str) -> Membership | None:
    """Conflict if the user holds the role there already, or an approving role elsewhere; the
    deactivated membership of that role to reactivate, if there is one."""
    existing = Membership.objects.filter(user=user, organization=organization, role=role).first()
    if existing is not None and existing.status != Status.DEACTIVATED:
        state = " (invited, not accepted yet)" if existing.status == Status.PENDING else ""
        raise Conflict(f"{user.get_username()} already is {role} of {organization.name}{state}")
    if role in APPROVING:
        _check_one_organisation(user, organization, role)
    return existing


@transaction.atomic
def _membership_add(
    *,
    actor: Any,
    user: Any,
    organization: Organization,
    role: str,
    invitation: Any = None,
) -> Membership:
    status = membership_grant_check(
        actor=actor, organization=organization, role=role, user=user, except_invitation=invitation
    )
    if user is None or not getattr(user, "pk", None):
        raise ValidationError({"user": "a saved user is required"})
    membership = membership_user_check(user=user, organization=organization, role=role)
    accepted_at = None
    if invitation is not None:
        # The invitee accepts by opening the link: the role counts at once.
        status, accepted_at = Status.ACTIVE, timezone.now()
    granted_by = actor if getattr(actor, "pk", None) else None
    if membership is None:
        membership = Membership.objects.create(
            user=user,
            organization=organization,
            role=role,
            status=status,
            granted_by=granted_by,
            accepted_at=accepted_at,
        )
    else:
        # Granted again after a deactivation: the same row (one per user, organisation and role),
        # with the new grant; the old one stays in the audit log.
        membership.status = status
        membership.granted_by = granted_by
        membership.accepted_at = accepted_at
        membership.deactivated_at = None
        membership.created_at = timezone.now()
        membership.save(
            update_fields=["status", "granted_by", "accepted_at", "deactivated_at", "created_at"]
        )
    data = _membership_data(membership)
    if invitation is not None:
        data["invitation_id"] = invitation.pk
    audit_append(
        actor=actor_label(actor),
        action="membership.invited" if status == Status.PENDING else "membership.added",
        consortium_id=organization.consortium_id,
        object_type="membership",
        object_id=membership.pk,
        data=data,
    )
    return membership


# --------------------------------------------------------------------------------------------
# Changing a role and deactivating a membership.


def membership_change_role(*, actor: Any, membership: Membership, role: str) -> Membership:
    """Change a member's role: the old membership is deactivated (kept, so approvals made under
    it still show their grant) and the new role granted, under the rules of granting it.

    The actor needs authority over the old role (as to deactivate it) and over the new one (as
    to grant it); nobody changes their own role. Returns the new membership. Refusals are
    audited as ``membership.refused``.
    """
    try:
        return _membership_change_role(actor=actor, membership=membership, role=role)
    except (PermissionDenied, Conflict) as refused:
        _audit_refused(
            actor=actor,
            organization=membership.organization,
            reason=str(refused),
            user=membership.user,
            role=role,
            attempt="change_role",
            extra={"membership_id": membership.pk, "from_role": membership.role},
        )
        raise


def membership_deactivate(*, actor: Any, membership: Membership) -> Membership:
    """Deactivate a membership: its role counts for nothing from now on; the row stays.

    An organisation admin of its organisation deactivates an approving role, a consortium admin
    a consortium admin role, either of them the other roles; anyone their own membership. The
    last active consortium admin of a consortium stays (409). Audited, refusals too.
    """
    try:
        return _membership_deactivate(actor=actor, membership=membership)
    except (PermissionDenied, Conflict) as refused:
        _audit_refused(
            actor=actor,
            organization=membership.organization,
            reason=str(refused),
            user=membership.user,
            role=membership.role,
            attempt="deactivate",
            extra={"membership_id": membership.pk},
        )
        raise


def _lock_membership(membership: Membership) -> Membership:
    return (
        Membership.objects.select_for_update()
        .select_related("organization__consortium", "user", "granted_by")
        .get(pk=membership.pk)
    )


def _check_may_remove(actor: Any, membership: Membership, action: str) -> None:
    """PermissionDenied unless the actor may take this membership's role away."""
    organization = membership.organization
    roles = permissions.require_roles(
        actor, organization.consortium_id, permissions.CAN_MANAGE_MEMBERS, action
    )
    consortium_admin = Role.CONSORTIUM_ADMIN in roles
    own_admin = (
        permissions.organizations_with_role(actor, organization.consortium_id, {Role.ORG_ADMIN})
        .filter(pk=organization.pk)
        .exists()
    )
    role = membership.role
    if role in APPROVING:
        withdrawing_first_admin = (
            consortium_admin and role == Role.ORG_ADMIN and membership.status == Status.PENDING
        )
        if not (own_admin or withdrawing_first_admin):
            raise PermissionDenied(
                f"{role} of {organization.name} is an approving role: only an organisation admin "
                f"of {organization.name} changes or removes it"
            )
    elif role == Role.CONSORTIUM_ADMIN:
        if not consortium_admin:
            raise PermissionDenied(
                "only a consortium admin can change or remove a consortium admin"
            )
    elif not (consortium_admin or own_admin):
        raise PermissionDenied(
            f"you are not an organisation admin of {organization.name}; only its admins or a "
            "consortium admin change or remove its members' roles"
        )


def _check_not_last_consortium_admin(membership: Membership) -> None:
    """Conflict when the membership is the last active consortium admin of its consortium."""
    if membership.role != Role.CONSORTIUM_ADMIN or membership.status != Status.ACTIVE:
        return
    consortium = membership.organization.consortium
    # Lock every consortium admin row: two admins removing each other at once must not both pass.
    others = list(
        Membership.objects.select_for_update()
        .filter(
            organization__consortium=consortium,
            role=Role.CONSORTIUM_ADMIN,
            status=Status.ACTIVE,
        )
        .exclude(user_id=membership.user_id)
        .values_list("pk", flat=True)
    )
    if not others:
        raise Conflict(
            f"{membership.user.get_username()} is the last consortium admin of {consortium.name}; "
            "make someone else consortium admin first (a consortium needs one to admit silos and "
            "manage members)"
        )


@transaction.atomic
def _membership_change_role(*, actor: Any, membership: Membership, role: str) -> Membership:
    membership = _lock_membership(membership)
    organization = membership.organization
    if role not in Role.values:
        raise ValidationError({"role": f"unknown role {role!r}; allowed: {', '.join(Role.values)}"})
    if membership.user_id == getattr(actor, "pk", None):
        raise PermissionDenied(
            "you cannot change your own role: nobody changes their own role; ask another admin"
        )
    _check_may_remove(actor, membership, "changing a role")
    if membership.status != Status.ACTIVE:
        raise Conflict(
            f"this {membership.role} membership of {organization.name} is {membership.status}, "
            "not active; only an active role can be changed"
        )
    if role == membership.role:
        raise Conflict(f"{membership.user.get_username()} already is {role} of {organization.name}")
    status = membership_grant_check(
        actor=actor, organization=organization, role=role, user=membership.user
    )
    if status != Status.ACTIVE:
        raise PermissionDenied(
            f"a consortium admin does not make someone {role} of {organization.name} by a role "
            "change: invite its first organisation admin (an invitation the person accepts)"
        )
    _check_not_last_consortium_admin(membership)
    old_role = membership.role
    membership.status = Status.DEACTIVATED
    membership.deactivated_at = timezone.now()
    membership.save(update_fields=["status", "deactivated_at"])
    new = _membership_add(actor=actor, user=membership.user, organization=organization, role=role)
    audit_append(
        actor=actor_label(actor),
        action="membership.role_changed",
        consortium_id=organization.consortium_id,
        object_type="membership",
        object_id=new.pk,
        data={
            **_membership_data(new),
            "from_role": old_role,
            "from_membership_id": membership.pk,
        },
    )
    return new


@transaction.atomic
def _membership_deactivate(*, actor: Any, membership: Membership) -> Membership:
    membership = _lock_membership(membership)
    own = membership.user_id == getattr(actor, "pk", None)
    if not own:
        _check_may_remove(actor, membership, "deactivating a membership")
    if membership.status == Status.DEACTIVATED:
        raise Conflict(
            f"{membership.user.get_username()}'s {membership.role} membership of "
            f"{membership.organization.name} is deactivated already"
        )
    _check_not_last_consortium_admin(membership)
    membership.status = Status.DEACTIVATED
    membership.deactivated_at = timezone.now()
    membership.save(update_fields=["status", "deactivated_at"])
    audit_append(
        actor=actor_label(actor),
        action="membership.deactivated",
        consortium_id=membership.organization.consortium_id,
        object_type="membership",
        object_id=membership.pk,
        data={**_membership_data(membership), "resigned": own},
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
