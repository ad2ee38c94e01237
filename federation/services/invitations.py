"""Invitations by e-mail: a role in an organisation, offered through a secret link with expiry.

Who may invite whom to which role is exactly who may grant it (``members.membership_grant_check``):
a consortium admin invites data scientists, auditors, consortium admins and an organisation's
*first* admin; approving roles (data steward, organisation admin) are offered only by that
organisation's own admin. The rules are checked when the invitation is sent and again when it is
accepted, with the inviter as the one granting, so an inviter who has lost the role since, or an
organisation that has found an admin in the meantime, voids it.

The link's token has 256 bits from ``secrets``; only its SHA-256 is stored (a fast hash is
enough: nothing to guess). Opening it lets a newcomer choose a username and a password (Django's
validators), or a signed-in person whose address it names accept; each link works once. Every
invitation, revocation, acceptance and refusal is audited.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core import mail
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.validators import validate_email
from django.db import transaction
from django.http import Http404
from django.urls import reverse
from django.utils import timezone

from federation import permissions
from federation.models import Invitation, Membership, Organization, Role
from federation.services import members
from federation.services.audit import actor_label, audit_append
from federation.services.errors import Conflict

log = logging.getLogger(__name__)


def invitation_token_hash(token: str) -> str:
    """The stored form of an invitation token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def invitation_link(token: str, base_url: str) -> str:
    """The link to open: ``base_url`` (scheme and host) and the invitation page's path."""
    return base_url.rstrip("/") + reverse("dashboard:invitation_open", args=[token])


def public_base_url(request: Any = None) -> str:
    """The server's address for links: QUORUM_PUBLIC_URL, else the request's own, else
    ``manage.py serve``'s default."""
    if settings.QUORUM_PUBLIC_URL:
        return settings.QUORUM_PUBLIC_URL
    if request is not None:
        return request.build_absolute_uri("/").rstrip("/")
    return "http://127.0.0.1:8000"


def invitation_deliver(*, created: CreatedInvitation, request: Any = None) -> dict[str, Any]:
    """Send the invitation's e-mail; the link and how sending went, for the inviter to see."""
    link = invitation_link(created.token, public_base_url(request))
    error = invitation_send(invitation=created.invitation, link=link)
    return {"link": link, "email_sent": not error, "email_error": error}


@dataclass(frozen=True)
class CreatedInvitation:
    """A new invitation and its token, which exists only here (the server keeps its hash)."""

    invitation: Invitation
    token: str


def normalise_email(email: Any) -> str:
    """A valid address, its domain in lower case; ValidationError naming the field otherwise."""
    text = email.strip() if isinstance(email, str) else ""
    try:
        validate_email(text)
    except ValidationError:
        raise ValidationError(
            {"email": f"{email!r} is not a valid e-mail address (like name@example.org)"}
        ) from None
    return get_user_model().objects.normalize_email(text)


def _users_with_email(email: str) -> list[Any]:
    return list(get_user_model().objects.filter(email__iexact=email).order_by("pk"))


def _open(queryset: Any) -> Any:
    return queryset.filter(
        accepted_at__isnull=True, revoked_at__isnull=True, expires_at__gt=timezone.now()
    )


def invitation_create(
    *,
    actor: Any,
    organization: Organization,
    email: str,
    role: str,
    days: int | None = None,
    user: Any = None,
    membership: Membership | None = None,
) -> CreatedInvitation:
    """Invite whoever holds ``email`` to ``role`` in ``organization`` (audited
    ``invitation.created``; refusals as ``membership.refused``, attempt ``invite``).

    ``user`` and ``membership`` are for ``manage.py create_consortium``: the account exists
    already (without a password) with its membership, and the link sets its password.
    """
    try:
        return _invitation_create(
            actor=actor,
            organization=organization,
            email=email,
            role=role,
            days=days,
            user=user,
            membership=membership,
        )
    except (PermissionDenied, Conflict) as refused:
        members._audit_refused(
            actor=actor,
            organization=organization,
            reason=str(refused),
            user=user,
            role=role,
            attempt="invite",
            extra={"email": str(email)[:254]},
        )
        raise


@transaction.atomic
def _invitation_create(
    *,
    actor: Any,
    organization: Organization,
    email: str,
    role: str,
    days: int | None,
    user: Any,
    membership: Membership | None,
) -> CreatedInvitation:
    if membership is None:
        # Roles first, so only members who may invite learn anything about an address.
        members.membership_grant_check(
            actor=actor, organization=organization, role=role, email=str(email)
        )
    email = normalise_email(email)
    limit = settings.QUORUM_INVITATION_MAX_DAYS
    days = settings.QUORUM_INVITATION_DAYS if days is None else days
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= limit:
        raise ValidationError({"days": f"a whole number of days from 1 to {limit}, got {days!r}"})
    if membership is None:
        for holder in _users_with_email(email):
            members.membership_grant_check(
                actor=actor, organization=organization, role=role, user=holder
            )
            members.membership_user_check(user=holder, organization=organization, role=role)
    pending = _open(
        Invitation.objects.filter(organization=organization, role=role, email__iexact=email)
    ).first()
    if pending is not None:
        raise Conflict(
            f"{email} is invited as {role} of {organization.name} already (until "
            f"{pending.expires_at:%Y-%m-%d %H:%M} UTC); revoke that invitation to send a new one"
        )
    token = secrets.token_urlsafe(32)
    invitation = Invitation.objects.create(
        consortium_id=organization.consortium_id,
        organization=organization,
        email=email,
        role=role,
        token_hash=invitation_token_hash(token),
        invited_by=actor if getattr(actor, "pk", None) else None,
        user=user,
        membership=membership,
        expires_at=timezone.now() + timedelta(days=days),
    )
    audit_append(
        actor=actor_label(actor),
        action="invitation.created",
        consortium_id=organization.consortium_id,
        object_type="invitation",
        object_id=invitation.pk,
        data=_invitation_data(invitation),
    )
    return CreatedInvitation(invitation=invitation, token=token)


def _invitation_data(invitation: Invitation) -> dict[str, Any]:
    inviter = invitation.invited_by
    return {
        "email": invitation.email,
        "organization": invitation.organization.name,
        "organization_id": invitation.organization_id,
        "role": invitation.role,
        "invited_by": inviter.get_username() if inviter is not None else None,
        "expires_at": invitation.expires_at.isoformat(),
    }


def invitation_send(*, invitation: Invitation, link: str) -> str:
    """E-mail the link to the invitee through Django's e-mail backend; "" when sent, else why not
    (the inviter then passes the link on: it is shown to them either way)."""
    inviter = invitation.invited_by
    who = inviter.get_username() if inviter is not None else "The operator of this Quorum server"
    organization = invitation.organization
    body = (
        f"{who} invites you to be {invitation.get_role_display()} of {organization.name} in the "
        f"consortium {organization.consortium.name} on Quorum (governed federated learning).\n\n"
        f"Open this link to choose your username and password, or to accept with your account:\n"
        f"{link}\n\n"
        f"The link works once and expires on {invitation.expires_at:%Y-%m-%d %H:%M} UTC.\n"
        "If you did not expect this, ignore it: nothing happens unless the link is opened.\n"
    )
    try:
        mail.send_mail(
            subject=f"Invitation to {organization.consortium.name} on Quorum",
            message=body,
            from_email=settings.DEFAULT_FROM_EMAIL,
            recipient_list=[invitation.email],
        )
    except Exception as exc:  # noqa: BLE001 (any backend's failure: the link is shown anyway)
        log.warning("invitation %s: e-mail to %s failed: %s", invitation.pk, invitation.email, exc)
        return f"the e-mail could not be sent ({type(exc).__name__}: {exc})"
    return ""


def invitation_revoke(*, actor: Any, invitation: Invitation) -> Invitation:
    """Revoke an open invitation: its link stops working (audited ``invitation.revoked``).

    The inviter may, and so may the consortium's admins and the organisation's admins.
    """
    organization = invitation.organization
    try:
        return _invitation_revoke(actor=actor, invitation=invitation)
    except (PermissionDenied, Conflict) as refused:
        members._audit_refused(
            actor=actor,
            organization=organization,
            reason=str(refused),
            user=None,
            role=invitation.role,
            attempt="revoke_invitation",
            extra={"email": invitation.email, "invitation_id": invitation.pk},
        )
        raise


@transaction.atomic
def _invitation_revoke(*, actor: Any, invitation: Invitation) -> Invitation:
    invitation = (
        Invitation.objects.select_for_update()
        .select_related("organization__consortium", "invited_by")
        .get(pk=invitation.pk)
    )
    organization = invitation.organization
    if invitation.invited_by_id is None or invitation.invited_by_id != getattr(actor, "pk", None):
        roles = permissions.require_roles(
            actor,
            organization.consortium_id,
            permissions.CAN_MANAGE_MEMBERS,
            "revoking an invitation",
        )
        own_admin = (
            permissions.organizations_with_role(actor, organization.consortium_id, {Role.ORG_ADMIN})
            .filter(pk=organization.pk)
            .exists()
        )
        if Role.CONSORTIUM_ADMIN not in roles and not own_admin:
            raise PermissionDenied(
                f"only the inviter, a consortium admin or an organisation admin of "
                f"{organization.name} revokes this invitation"
            )
    state = invitation.state
    if state != "open":
        raise Conflict(
            f"this invitation of {invitation.email} is {state}; only an open one is revoked"
        )
    invitation.revoked_at = timezone.now()
    invitation.save(update_fields=["revoked_at"])
    audit_append(
        actor=actor_label(actor),
        action="invitation.revoked",
        consortium_id=organization.consortium_id,
        object_type="invitation",
        object_id=invitation.pk,
        data=_invitation_data(invitation),
    )
    return invitation


# --------------------------------------------------------------------------------------------
# Opening the link.


def invitation_by_token(token: str) -> Invitation | None:
    """The invitation a link names, whatever its state, or None."""
    if not isinstance(token, str) or not 20 <= len(token) <= 100:
        return None
    return (
        Invitation.objects.select_related("organization__consortium", "invited_by", "user")
        .filter(token_hash=invitation_token_hash(token))
        .first()
    )


def invitation_unusable(invitation: Invitation) -> str:
    """Why the link cannot be used any more ("" while it is open)."""
    inviter = invitation.invited_by
    ask = f"ask {inviter.get_username()} for a new one" if inviter else "ask for a new one"
    state = invitation.state
    if state == "accepted":
        return (
            f"This invitation was used on {invitation.accepted_at:%Y-%m-%d %H:%M} UTC; each link "
            "works once. Sign in with the account it was used for."
        )
    if state == "revoked":
        return f"This invitation was revoked on {invitation.revoked_at:%Y-%m-%d %H:%M} UTC; {ask}."
    if state == "expired":
        return f"This invitation expired on {invitation.expires_at:%Y-%m-%d %H:%M} UTC; {ask}."
    return ""


def invitation_signup_kind(invitation: Invitation) -> str:
    """What the page asks of someone who is not signed in: ``password`` (set the password of the
    account made for them), ``signin`` (an account has this address: sign in) or ``new``."""
    if invitation.user is not None and not invitation.user.has_usable_password():
        return "password"
    if _users_with_email(invitation.email):
        return "signin"
    return "new"


def invitation_accept(
    *, token: str, user: Any = None, username: str = "", password: str = ""
) -> tuple[Membership, Any]:
    """Accept an invitation: as the signed-in ``user`` (whose address it must name), or as a new
    account (``username``, ``password``), or by setting the password of the account made for it.

    The membership is granted as if by the inviter now (the rules are checked again). Returns
    the membership and the account. A used, revoked or expired link, or a refused grant, is a
    Conflict or PermissionDenied (audited, nothing created); a bad username or password a
    ValidationError naming the field.
    """
    invitation = invitation_by_token(token)
    if invitation is None:
        raise Http404("no such invitation")
    try:
        return _invitation_accept(
            invitation=invitation, user=user, username=username, password=password
        )
    except (PermissionDenied, Conflict) as refused:
        members._audit_refused(
            actor=user,
            organization=invitation.organization,
            reason=str(refused),
            user=user,
            role=invitation.role,
            attempt="accept_invitation",
            extra={"email": invitation.email, "invitation_id": invitation.pk},
        )
        raise


def _new_account(invitation: Invitation, username: str, password: str) -> Any:
    """A new account for the invitation's address (ValidationError naming the field)."""
    User = get_user_model()
    username = username.strip() if isinstance(username, str) else ""
    errors: dict[str, list[str]] = {}
    if not username:
        errors["username"] = ["choose a username"]
    else:
        field = User._meta.get_field(User.USERNAME_FIELD)
        try:
            field.run_validators(username)
            if len(username) > field.max_length:
                raise ValidationError(f"at most {field.max_length} characters")
        except ValidationError as exc:
            errors["username"] = exc.messages
        else:
            if User.objects.filter(**{f"{User.USERNAME_FIELD}__iexact": username}).exists():
                errors["username"] = [f"{username!r} is taken; choose another username"]
    account = User(**{User.USERNAME_FIELD: username}, email=invitation.email)
    try:
        validate_password(password or "", user=account)
    except ValidationError as exc:
        errors["password"] = exc.messages
    if not password:
        errors["password"] = ["choose a password"]
    if errors:
        raise ValidationError(errors)
    account.set_password(password)
    account.save()
    return account


@transaction.atomic
def _invitation_accept(
    *, invitation: Invitation, user: Any, username: str, password: str
) -> tuple[Membership, Any]:
    invitation = (
        Invitation.objects.select_for_update()
        .select_related("organization__consortium", "invited_by", "user", "membership")
        .get(pk=invitation.pk)
    )
    unusable = invitation_unusable(invitation)
    if unusable:
        raise Conflict(unusable)
    organization = invitation.organization
    if getattr(user, "is_authenticated", False):
        if (user.email or "").strip().lower() != invitation.email.lower():
            raise Conflict(
                f"this invitation is for {invitation.email}, and you are signed in as "
                f"{user.get_username()} ({user.email or 'no address'}); sign out, then open the "
                "link again to accept it as that address"
            )
        account = user
    else:
        kind = invitation_signup_kind(invitation)
        if kind == "signin":
            raise Conflict(
                f"an account with the address {invitation.email} exists: sign in with it, then "
                "open the link again to accept"
            )
        if kind == "password":
            account = invitation.user
            try:
                validate_password(password or "", user=account)
            except ValidationError as exc:
                raise ValidationError({"password": exc.messages}) from None
            if not password:
                raise ValidationError({"password": ["choose a password"]})
            account.set_password(password)
            account.save(update_fields=["password"])
        else:
            account = _new_account(invitation, username, password)
        audit_append(
            actor=actor_label(account),
            action="user.password_set" if kind == "password" else "user.created",
            consortium_id=organization.consortium_id,
            object_type="user",
            object_id=account.pk,
            data={"username": account.get_username(), "invitation_id": invitation.pk},
        )
    membership = invitation.membership
    if membership is None:
        inviter = invitation.invited_by
        try:
            membership = members._membership_add(
                actor=inviter,
                user=account,
                organization=organization,
                role=invitation.role,
                invitation=invitation,
            )
        except Http404:
            # The inviter is no longer a member of the consortium at all.
            raise PermissionDenied(
                f"{inviter.get_username() if inviter else 'the inviter'} no longer holds a role "
                f"in {organization.consortium.name} that may grant {invitation.role}; ask an "
                "admin for a new invitation"
            ) from None
    invitation.accepted_at = timezone.now()
    invitation.user = account
    invitation.membership = membership
    invitation.save(update_fields=["accepted_at", "user", "membership"])
    audit_append(
        actor=actor_label(account),
        action="invitation.accepted",
        consortium_id=organization.consortium_id,
        object_type="invitation",
        object_id=invitation.pk,
        data={
            **_invitation_data(invitation),
            "user": account.get_username(),
            "membership_id": membership.pk,
        },
    )
    return membership, account
