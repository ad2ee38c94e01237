"""The user's consortia, a consortium's overview, and silo pages."""

from __future__ import annotations

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.utils import timezone
from django.views.decorators.http import require_POST

from dashboard.views.common import page
from federation import governance, permissions, selectors
from federation.models import Consortium
from federation.services.members import membership_accept


@login_required
def home(request: HttpRequest) -> HttpResponse:
    """The user's consortia and open invitations; straight to the overview when there is only
    one consortium and nothing to accept."""
    consortia = list(permissions.consortia_of(request.user))
    invitations = list(selectors.invitations_of(request.user))
    if len(consortia) == 1 and not invitations:
        return redirect("dashboard:overview", consortium_id=consortia[0].pk)
    return page(request, "dashboard/home.html", consortia=consortia, invitations=invitations)


@login_required
@require_POST
def invitation_accept(request: HttpRequest, membership_id: int) -> HttpResponse:
    """The invitee accepts a pending membership (an organisation's first admin)."""
    invitation = permissions.access_invitation(user=request.user, id=membership_id)
    membership = membership_accept(actor=request.user, membership=invitation)
    messages.success(
        request,
        f"You are now {membership.get_role_display()} of {membership.organization.name}.",
    )
    return redirect("dashboard:overview", consortium_id=membership.organization.consortium_id)


def _silo_rows(consortium: Consortium) -> list[dict[str, object]]:
    """Silos with their agent's state: online (connected, heartbeat recent), stale or offline."""
    stale_after = settings.QUORUM_SILO_OFFLINE_AFTER
    now = timezone.now()
    rows = []
    for silo in selectors.consortium_silos(consortium):
        online = selectors.silo_is_online(silo)
        quiet = (
            online
            and silo.last_heartbeat is not None
            and (now - silo.last_heartbeat).total_seconds() > stale_after
        )
        rows.append({"silo": silo, "online": online, "quiet": quiet})
    return rows


@login_required
def overview(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """Members, silos and their agents, active runs, and plans waiting for the user's decision."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    organizations = list(selectors.consortium_organizations(consortium))
    return page(
        request,
        "dashboard/overview.html",
        consortium=consortium,
        section="overview",
        organizations=organizations,
        memberships=selectors.consortium_memberships(consortium),
        silos=_silo_rows(consortium),
        active_runs=selectors.consortium_runs(consortium, active=True),
        recent_runs=selectors.consortium_runs(consortium, active=False)[:5],
        awaiting=selectors.plans_awaiting_decision(user=request.user, consortium=consortium),
        needed=governance.organizations_needed(consortium, len(organizations)),
    )


@login_required
def silo_detail(request: HttpRequest, silo_id: int) -> HttpResponse:
    """A silo: its schema, admission, agent, participation history and privacy budget."""
    silo = permissions.access_silo(user=request.user, id=silo_id)
    schema = silo.schema or {}
    return page(
        request,
        "dashboard/silo_detail.html",
        consortium=silo.consortium,
        section="overview",
        silo=silo,
        online=selectors.silo_is_online(silo),
        columns=schema.get("columns", []),
        target=schema.get("target"),
        sensitive=schema.get("sensitive", []),
        runs=selectors.silo_participation(silo),
        rounds=selectors.silo_rounds(silo),
        privacy=selectors.silo_privacy(silo),
    )
