"""Consortium and organisation creation: the operator's writes, audited like every other.

The Django admin may add consortia and organisations (it calls these services); it may never
change or delete them, since the approval rules and the member count decide what "approved" means.
``manage.py create_consortium`` makes a consortium with its first admin; from then on its
consortium admins add organisations (``organization_add``: the API and the dashboard).
"""

from __future__ import annotations

from typing import Any

from django.core.exceptions import PermissionDenied, ValidationError
from django.db import transaction

from federation import permissions
from federation.models import Consortium, Organization, Role
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict


def quorum_rule_errors(mode: Any, value: Any) -> dict[str, str]:
    """What is wrong with a quorum rule, by field (empty when it is valid)."""
    if mode not in Consortium.QuorumMode.values:
        allowed = ", ".join(Consortium.QuorumMode.values)
        return {"org_quorum_mode": f"unknown mode {mode!r}; allowed: {allowed}"}
    try:
        number = float(value)
    except (TypeError, ValueError):
        return {"org_quorum_value": f"a number is needed, got {value!r}"}
    if mode == Consortium.QuorumMode.FRACTION and not 0 < number <= 1:
        return {"org_quorum_value": f"in fraction mode a value in (0, 1] is needed, got {number}"}
    if mode == Consortium.QuorumMode.COUNT and (number < 1 or not number.is_integer()):
        return {"org_quorum_value": f"in count mode a whole number >= 1 is needed, got {number}"}
    return {}


@transaction.atomic
def consortium_create(
    *,
    actor: Any,
    name: str,
    description: str = "",
    require_steward_unanimity: bool = True,
    org_quorum_mode: str = Consortium.QuorumMode.FRACTION,
    org_quorum_value: float = 0.5,
) -> Consortium:
    """Create a consortium with its approval rules (audited as ``consortium.created``)."""
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "a consortium needs a name"})
    errors = quorum_rule_errors(org_quorum_mode, org_quorum_value)
    if errors:
        raise ValidationError(errors)
    value = float(org_quorum_value)
    if Consortium.objects.filter(name=name).exists():
        raise Conflict(f"a consortium named {name!r} exists already")
    consortium = Consortium.objects.create(
        name=name,
        description=description,
        require_steward_unanimity=require_steward_unanimity,
        org_quorum_mode=org_quorum_mode,
        org_quorum_value=value,
    )
    audit_append(
        actor=actor_label(actor),
        action="consortium.created",
        consortium_id=consortium.pk,
        object_type="consortium",
        object_id=consortium.pk,
        data={
            "name": name,
            "require_steward_unanimity": require_steward_unanimity,
            "org_quorum_mode": org_quorum_mode,
            "org_quorum_value": value,
        },
    )
    return consortium


@transaction.atomic
def organization_create(
    *, actor: Any, consortium: Consortium, name: str, kind: str = Organization.Kind.OTHER
) -> Organization:
    """Add a member organisation to a consortium (audited as ``organization.created``)."""
    name = (name or "").strip()
    if not name:
        raise ValidationError({"name": "an organisation needs a name"})
    if kind not in Organization.Kind.values:
        allowed = ", ".join(Organization.Kind.values)
        raise ValidationError({"kind": f"unknown kind {kind!r}; allowed: {allowed}"})
    if Organization.objects.filter(consortium=consortium, name=name).exists():
        raise Conflict(f"{consortium.name} already has an organisation named {name!r}")
    organization = Organization.objects.create(consortium=consortium, name=name, kind=kind)
    audit_append(
        actor=actor_label(actor),
        action="organization.created",
        consortium_id=consortium.pk,
        object_type="organization",
        object_id=organization.pk,
        data={"name": name, "kind": kind},
    )
    return organization


def organization_add(
    *, actor: Any, consortium: Consortium, name: str, kind: str = Organization.Kind.OTHER
) -> Organization:
    """A consortium admin adds a member organisation (``organization_create`` with the role
    check); a refusal (403 or a duplicate name, 409) is audited as ``organization.refused``."""
    try:
        permissions.require_roles(
            actor, consortium.pk, {Role.CONSORTIUM_ADMIN}, "adding an organisation"
        )
        return organization_create(actor=actor, consortium=consortium, name=name, kind=kind)
    except (PermissionDenied, Conflict) as refused:
        with transaction.atomic():
            audit_append(
                actor=actor_label(actor),
                action="organization.refused",
                consortium_id=consortium.pk,
                object_type="consortium",
                object_id=consortium.pk,
                data={"name": str(name)[:200], "kind": str(kind)[:20], "reason": str(refused)},
            )
        raise
