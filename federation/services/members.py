"""Membership writes: giving a user a role in an organisation."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from federation import permissions
from federation.models import Membership, Organization, Role
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict


@transaction.atomic
def membership_add(*, actor: Any, user: Any, organization: Organization, role: str) -> Membership:
    """Give a user a role in an organisation.

    A consortium admin may add any role to any organisation of the consortium; an organisation
    admin may add roles other than consortium admin to their own organisation. A platform
    superuser may add anyone (that is how a consortium gets its first admin).
    """
    if not getattr(actor, "is_superuser", False):
        roles = permissions.require_roles(
            actor, organization.consortium_id, permissions.CAN_MANAGE_MEMBERS, "adding a member"
        )
        if Role.CONSORTIUM_ADMIN not in roles:
            own = permissions.organizations_with_role(
                actor, organization.consortium_id, {Role.ORG_ADMIN}
            )
            if not own.filter(pk=organization.pk).exists():
                raise PermissionDenied(
                    f"you are not an organisation admin of {organization.name}; only its admins "
                    "or a consortium admin can add members to it"
                )
            if role == Role.CONSORTIUM_ADMIN:
                raise PermissionDenied("only a consortium admin can make someone consortium admin")
    if role not in Role.values:
        raise ValidationError({"role": f"unknown role {role!r}; allowed: {', '.join(Role.values)}"})
    if user is None or not getattr(user, "pk", None):
        raise ValidationError({"user": "a saved user is required"})
    if Membership.objects.filter(user=user, organization=organization, role=role).exists():
        raise Conflict(f"{user.get_username()} already is {role} of {organization.name}")
    membership = Membership.objects.create(user=user, organization=organization, role=role)
    audit_append(
        actor=actor_label(actor),
        action="membership.added",
        consortium_id=organization.consortium_id,
        object_type="membership",
        object_id=membership.pk,
        data={
            "user": user.get_username(),
            "organization": organization.name,
            "organization_id": organization.pk,
            "role": role,
        },
    )
    return membership
