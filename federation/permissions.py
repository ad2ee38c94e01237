"""Who may see and do what: the one place that decides access.

Reads of a consortium's objects go through the ``access_*`` selectors. A user who is not a member
of the object's consortium gets ``Http404`` (never 403: no existence leak); a member whose roles
do not allow an action gets ``PermissionDenied`` (403) from ``require_roles``.
"""

from __future__ import annotations

from collections.abc import Iterable

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import PermissionDenied
from django.db.models import Q, QuerySet
from django.http import Http404

from federation.models import (
    Consortium,
    Invitation,
    Membership,
    ModelVersion,
    Organization,
    Role,
    Run,
    Silo,
    TrainingPlan,
    UploadedModel,
)

User = AbstractBaseUser | AnonymousUser

READ_ROLES = frozenset(Role.values)
# Actions and the roles that may perform them (docs/governance.md has the full matrix).
CAN_ADMIT_SILOS = frozenset({Role.CONSORTIUM_ADMIN})
CAN_REGISTER_SILOS = frozenset({Role.DATA_STEWARD})
CAN_MANAGE_TOKENS = frozenset({Role.DATA_STEWARD, Role.CONSORTIUM_ADMIN})
CAN_PROPOSE_PLANS = frozenset({Role.DATA_SCIENTIST})
# Uploading a model for evaluation plans to evaluate (federation.services.uploaded_models).
CAN_UPLOAD_MODELS = frozenset({Role.DATA_SCIENTIST, Role.CONSORTIUM_ADMIN})
CAN_DECIDE_PLANS = frozenset({Role.DATA_STEWARD, Role.ORG_ADMIN})
CAN_START_RUNS = frozenset({Role.DATA_SCIENTIST, Role.CONSORTIUM_ADMIN})
CAN_READ_AUDIT = frozenset({Role.AUDITOR, Role.CONSORTIUM_ADMIN})
CAN_MANAGE_MEMBERS = frozenset({Role.CONSORTIUM_ADMIN, Role.ORG_ADMIN})
# Roles whose holders approve plans for their organisation: granted only by that organisation's
# own admin, never to oneself, and held in at most one organisation of a consortium
# (federation.services.members; docs/governance.md "Separation of duties").
APPROVING_ROLES = frozenset({Role.DATA_STEWARD, Role.ORG_ADMIN})
ACTIVE = Membership.Status.ACTIVE


def _authenticated(user: User | None) -> bool:
    return user is not None and bool(getattr(user, "is_authenticated", False))


def consortium_ids_of(user: User | None) -> QuerySet[Membership]:
    """Ids of the consortia the user is a member of (as a subquery-able values list)."""
    if not _authenticated(user):
        return Membership.objects.none().values_list("organization__consortium_id", flat=True)
    return Membership.objects.filter(user=user, status=ACTIVE).values_list(
        "organization__consortium_id", flat=True
    )


def consortia_of(user: User | None) -> QuerySet[Consortium]:
    """Consortia the user belongs to."""
    return Consortium.objects.filter(pk__in=consortium_ids_of(user)).order_by("name")


def consortium_ids_with_roles(user: User | None, roles: Iterable[str]) -> QuerySet[Membership]:
    """Ids of the consortia where the user holds one of the roles (a subquery-able values list)."""
    return consortium_ids_of(user).filter(role__in=list(roles))


def roles_in(user: User | None, consortium_id: int) -> set[str]:
    """The user's roles in a consortium (empty when not a member)."""
    if not _authenticated(user):
        return set()
    return set(
        Membership.objects.filter(
            user=user, organization__consortium_id=consortium_id, status=ACTIVE
        ).values_list("role", flat=True)
    )


def organizations_with_role(
    user: User | None, consortium_id: int, roles: Iterable[str]
) -> QuerySet[Organization]:
    """Organisations of a consortium where the user holds one of the roles."""
    if not _authenticated(user):
        return Organization.objects.none()
    return Organization.objects.filter(
        consortium_id=consortium_id,
        memberships__user=user,
        memberships__role__in=list(roles),
        memberships__status=ACTIVE,
    ).distinct()


def require_roles(
    user: User | None, consortium_id: int, allowed: Iterable[str], action: str
) -> set[str]:
    """The user's roles, if one of them allows the action; else PermissionDenied (or 404)."""
    roles = roles_in(user, consortium_id)
    if not roles:
        raise Http404("no such object")
    if not roles & set(allowed):
        needed = ", ".join(sorted(allowed))
        raise PermissionDenied(f"{action} needs one of the roles: {needed}")
    return roles


def audit_consortium_ids(user: User | None) -> list[int]:
    """Consortia whose audit events the user may read (CAN_READ_AUDIT); PermissionDenied if none."""
    ids = sorted(set(consortium_ids_with_roles(user, CAN_READ_AUDIT)))
    if not ids:
        needed = ", ".join(sorted(CAN_READ_AUDIT))
        raise PermissionDenied(f"reading the audit log needs one of the roles: {needed}")
    return ids


def access_consortium(*, user: User | None, id: int) -> Consortium:
    """A consortium the user is a member of, else 404."""
    consortium = consortia_of(user).filter(pk=id).first()
    if consortium is None:
        raise Http404("no such consortium")
    return consortium


def silos_visible_to(user: User | None) -> QuerySet[Silo]:
    """Silos of the user's consortia."""
    return Silo.objects.filter(consortium_id__in=consortium_ids_of(user))


def access_silo(*, user: User | None, id: int) -> Silo:
    """A silo of one of the user's consortia, else 404."""
    silo = silos_visible_to(user).select_related("organization", "consortium").filter(pk=id).first()
    if silo is None:
        raise Http404("no such silo")
    return silo


def plans_visible_to(user: User | None) -> QuerySet[TrainingPlan]:
    """Plans of the user's consortia."""
    return TrainingPlan.objects.filter(consortium_id__in=consortium_ids_of(user))


def access_plan(*, user: User | None, id: int) -> TrainingPlan:
    """A plan of one of the user's consortia, else 404."""
    plan = (
        plans_visible_to(user)
        .select_related("consortium", "current_version", "proposed_by")
        .filter(pk=id)
        .first()
    )
    if plan is None:
        raise Http404("no such plan")
    return plan


def runs_visible_to(user: User | None) -> QuerySet[Run]:
    """Runs of the user's consortia."""
    return Run.objects.filter(plan__consortium_id__in=consortium_ids_of(user))


def access_run(*, user: User | None, id: int) -> Run:
    """A run of one of the user's consortia, else 404."""
    run = (
        runs_visible_to(user)
        .select_related("plan", "version", "plan__consortium")
        .filter(pk=id)
        .first()
    )
    if run is None:
        raise Http404("no such run")
    return run


def access_model_version(*, user: User | None, id: int) -> ModelVersion:
    """A global model of a run the user may see, else 404."""
    version = (
        ModelVersion.objects.filter(run__in=runs_visible_to(user), pk=id)
        .select_related("run__plan__consortium", "run__version", "round")
        .first()
    )
    if version is None:
        raise Http404("no such model version")
    return version


def uploaded_models_visible_to(user: User | None) -> QuerySet[UploadedModel]:
    """Models uploaded to the user's consortia."""
    return UploadedModel.objects.filter(consortium_id__in=consortium_ids_of(user))


def access_uploaded_model(*, user: User | None, id: int) -> UploadedModel:
    """A model uploaded to one of the user's consortia, else 404."""
    model = (
        uploaded_models_visible_to(user)
        .select_related("consortium", "uploaded_by")
        .filter(pk=id)
        .first()
    )
    if model is None:
        raise Http404("no such uploaded model")
    return model


def access_invitation(*, user: User | None, id: int) -> Membership:
    """A pending membership addressed to the user (an invitation to accept), else 404."""
    if not _authenticated(user):
        raise Http404("no such invitation")
    invitation = (
        Membership.objects.filter(pk=id, user=user, status=Membership.Status.PENDING)
        .select_related("organization__consortium", "user", "granted_by")
        .first()
    )
    if invitation is None:
        raise Http404("no such invitation")
    return invitation


def access_membership(*, user: User | None, id: int) -> Membership:
    """A membership of one of the user's consortia, else 404."""
    membership = (
        Membership.objects.filter(pk=id, organization__consortium_id__in=consortium_ids_of(user))
        .select_related("organization__consortium", "user", "granted_by")
        .first()
    )
    if membership is None:
        raise Http404("no such membership")
    return membership


def invitations_visible_to(user: User | None, consortium_id: int) -> QuerySet[Invitation]:
    """The e-mail invitations of a consortium the user may see: all of them for a consortium
    admin, those of their organisations for an organisation admin, their own for the others."""
    roles = roles_in(user, consortium_id)
    invitations = Invitation.objects.filter(consortium_id=consortium_id)
    if Role.CONSORTIUM_ADMIN in roles:
        return invitations
    if not roles:
        return invitations.none()
    managed = organizations_with_role(user, consortium_id, {Role.ORG_ADMIN})
    return invitations.filter(Q(organization__in=managed) | Q(invited_by=user))


def access_email_invitation(*, user: User | None, id: int) -> Invitation:
    """An e-mail invitation the user may see (``invitations_visible_to``), else 404."""
    invitation = (
        Invitation.objects.filter(pk=id, consortium_id__in=consortium_ids_of(user))
        .select_related("organization__consortium", "invited_by")
        .first()
    )
    if (
        invitation is None
        or not invitations_visible_to(user, invitation.consortium_id)
        .filter(pk=invitation.pk)
        .exists()
    ):
        raise Http404("no such invitation")
    return invitation
