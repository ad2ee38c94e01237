"""Members of a consortium: organisations, invitations by e-mail, role changes, deactivation,
and the invitation page a link opens. Every write is a service call; a refusal is shown on the
page with the service's reason (and audited by the service)."""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.contrib.auth import login
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.urls import reverse
from django.views.decorators.http import require_POST

from dashboard import people_forms
from dashboard.views.common import nav_for, page
from federation import permissions, selectors
from federation.models import Consortium, Organization, Role
from federation.services import invitations
from federation.services.consortia import organization_add
from federation.services.errors import Conflict
from federation.services.members import membership_change_role, membership_deactivate

STATUS = {PermissionDenied: 403, Conflict: 409}


def _manageable_organizations(request: HttpRequest, consortium: Consortium) -> Any:
    """The organisations the user may invite to: all for a consortium admin, else their own."""
    if Role.CONSORTIUM_ADMIN in permissions.roles_in(request.user, consortium.pk):
        return selectors.consortium_organizations(consortium)
    return permissions.organizations_with_role(
        request.user, consortium.pk, {Role.ORG_ADMIN}
    ).order_by("name")


def _render(
    request: HttpRequest,
    consortium: Consortium,
    *,
    status: int = 200,
    error: str = "",
    org_form: people_forms.OrganizationAddForm | None = None,
    invite_form: people_forms.InvitationForm | None = None,
    created: dict[str, Any] | None = None,
) -> HttpResponse:
    nav = nav_for(request, consortium)
    organizations = _manageable_organizations(request, consortium)
    return page(
        request,
        "dashboard/members.html",
        nav=nav,
        section="members",
        status=status,
        error=error,
        organizations=selectors.consortium_organizations(consortium),
        memberships=selectors.consortium_memberships(consortium),
        invitations=selectors.consortium_invitations(user=request.user, consortium=consortium),
        roles=Role.choices,
        may_manage=bool(nav.roles & permissions.CAN_MANAGE_MEMBERS),
        org_form=org_form
        or (people_forms.OrganizationAddForm() if nav.is_consortium_admin else None),
        invite_form=invite_form
        or (
            people_forms.InvitationForm(organizations=organizations)
            if nav.roles & permissions.CAN_MANAGE_MEMBERS
            else None
        ),
        created=created,
    )


@login_required
def member_list(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """Organisations, memberships and invitations; the forms the user's roles allow."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    return _render(request, consortium)


@login_required
@require_POST
def organization_new(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """A consortium admin adds a member organisation."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    form = people_forms.OrganizationAddForm(request.POST)
    if not form.is_valid():
        return _render(request, consortium, status=400, org_form=form)
    try:
        organization = organization_add(
            actor=request.user,
            consortium=consortium,
            name=form.cleaned_data["name"],
            kind=form.cleaned_data["kind"] or Organization.Kind.OTHER,
        )
    except (PermissionDenied, Conflict) as exc:
        return _render(request, consortium, status=STATUS[type(exc)], error=str(exc), org_form=form)
    except ValidationError as exc:
        form.apply_service_errors(exc)
        return _render(request, consortium, status=400, org_form=form)
    messages.success(request, f"{organization.name} is a member organisation now.")
    return redirect("dashboard:member_list", consortium_id=consortium.pk)


@login_required
@require_POST
def invitation_new(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """Invite someone by e-mail; the page shows the link (and whether the e-mail went out)."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    form = people_forms.InvitationForm(
        request.POST, organizations=_manageable_organizations(request, consortium)
    )
    if not form.is_valid():
        return _render(request, consortium, status=400, invite_form=form)
    data = form.cleaned_data
    try:
        created = invitations.invitation_create(
            actor=request.user,
            organization=data["organization"],
            email=data["email"],
            role=data["role"],
            days=data["days"],
        )
    except (PermissionDenied, Conflict) as exc:
        return _render(
            request, consortium, status=STATUS[type(exc)], error=str(exc), invite_form=form
        )
    except ValidationError as exc:
        form.apply_service_errors(exc)
        return _render(request, consortium, status=400, invite_form=form)
    delivery = invitations.invitation_deliver(created=created, request=request)
    # Rendered, not redirected: the link is shown this once and never stored in a cookie.
    return _render(request, consortium, created={"invitation": created.invitation, **delivery})


@login_required
@require_POST
def invitation_revoke(request: HttpRequest, invitation_id: int) -> HttpResponse:
    """Revoke an open invitation."""
    invitation = permissions.access_email_invitation(user=request.user, id=invitation_id)
    consortium = invitation.organization.consortium
    try:
        invitations.invitation_revoke(actor=request.user, invitation=invitation)
    except (PermissionDenied, Conflict) as exc:
        return _render(request, consortium, status=STATUS[type(exc)], error=str(exc))
    messages.success(request, f"The invitation of {invitation.email} is revoked.")
    return redirect("dashboard:member_list", consortium_id=consortium.pk)


@login_required
@require_POST
def membership_role(request: HttpRequest, membership_id: int) -> HttpResponse:
    """Change a member's role (the old membership is deactivated, the new one granted)."""
    membership = permissions.access_membership(user=request.user, id=membership_id)
    consortium = membership.organization.consortium
    form = people_forms.RoleChangeForm(request.POST)
    if not form.is_valid():
        return _render(request, consortium, status=400, error="choose one of the roles listed")
    try:
        new = membership_change_role(
            actor=request.user, membership=membership, role=form.cleaned_data["role"]
        )
    except (PermissionDenied, Conflict) as exc:
        return _render(request, consortium, status=STATUS[type(exc)], error=str(exc))
    messages.success(
        request,
        f"{new.user.get_username()} is {new.get_role_display()} of {new.organization.name} now "
        f"(no longer {membership.get_role_display()}).",
    )
    return redirect("dashboard:member_list", consortium_id=consortium.pk)


@login_required
@require_POST
def membership_deactivate_view(request: HttpRequest, membership_id: int) -> HttpResponse:
    """Deactivate a membership (or resign from one's own)."""
    membership = permissions.access_membership(user=request.user, id=membership_id)
    consortium = membership.organization.consortium
    try:
        membership_deactivate(actor=request.user, membership=membership)
    except (PermissionDenied, Conflict) as exc:
        return _render(request, consortium, status=STATUS[type(exc)], error=str(exc))
    messages.success(
        request,
        f"{membership.user.get_username()} is no longer {membership.get_role_display()} of "
        f"{membership.organization.name}.",
    )
    if membership.user_id == request.user.pk and not permissions.roles_in(
        request.user, consortium.pk
    ):
        return redirect("dashboard:home")
    return redirect("dashboard:member_list", consortium_id=consortium.pk)


# --------------------------------------------------------------------------------------------
# The page an invitation link opens (no sign-in needed: the link is the credential).


def invitation_open(request: HttpRequest, token: str) -> HttpResponse:
    """Show the invitation; accept it as the signed-in user, or as a new account (username and
    password), or by setting the password of the account made for it."""
    invitation = invitations.invitation_by_token(token)
    if invitation is None:
        return page(
            request,
            "dashboard/invitation.html",
            status=404,
            problem="This invitation link is not valid: check that you copied all of it, or ask "
            "for a new invitation.",
        )
    unusable = invitations.invitation_unusable(invitation)
    if unusable:
        return page(
            request,
            "dashboard/invitation.html",
            status=410,
            invitation=invitation,
            problem=unusable,
        )
    signed_in = request.user.is_authenticated
    kind = "signed_in" if signed_in else invitations.invitation_signup_kind(invitation)
    form = None
    if kind in ("new", "password"):
        form = people_forms.AcceptForm(request.POST or None, ask_username=kind == "new")
    status, error = 200, ""
    if request.method == "POST" and (form is None or form.is_valid()):
        try:
            membership, account = invitations.invitation_accept(
                token=token,
                user=request.user,
                username=form.cleaned_data.get("username", "") if form else "",
                password=form.cleaned_data["password1"] if form else "",
            )
        except (PermissionDenied, Conflict) as exc:
            status, error = STATUS[type(exc)], str(exc)
        except ValidationError as exc:
            if form is None:
                status, error = 400, "; ".join(exc.messages)
            else:
                form.apply_service_errors(exc)
        else:
            if not signed_in:
                login(request, account)
            messages.success(
                request,
                f"Welcome: you are {membership.get_role_display()} of "
                f"{membership.organization.name} in {membership.organization.consortium.name}.",
            )
            return redirect(
                "dashboard:overview", consortium_id=membership.organization.consortium_id
            )
    if form is not None and form.errors:
        status = 400
    return page(
        request,
        "dashboard/invitation.html",
        status=status,
        invitation=invitation,
        kind=kind,
        form=form,
        error=error,
        email_matches=signed_in
        and (request.user.email or "").strip().lower() == invitation.email.lower(),
        login_url=f"{reverse('dashboard:login')}?next={request.path}",
    )
