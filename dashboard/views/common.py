"""What every page shares: the role-aware navigation and rendering with it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from federation import permissions
from federation.models import Consortium, Role


@dataclass(frozen=True)
class Nav:
    """The current consortium and what the user's roles there allow (menus and buttons)."""

    consortium: Consortium
    roles: frozenset[str]

    @property
    def role_labels(self) -> list[str]:
        """The user's roles in this consortium, human-readable."""
        return [label for value, label in Role.choices if value in self.roles]

    @property
    def can_propose(self) -> bool:
        return bool(self.roles & permissions.CAN_PROPOSE_PLANS)

    @property
    def can_decide(self) -> bool:
        return bool(self.roles & permissions.CAN_DECIDE_PLANS)

    @property
    def can_start_runs(self) -> bool:
        return bool(self.roles & permissions.CAN_START_RUNS)

    @property
    def can_read_audit(self) -> bool:
        return bool(self.roles & permissions.CAN_READ_AUDIT)

    @property
    def can_manage_members(self) -> bool:
        return bool(self.roles & permissions.CAN_MANAGE_MEMBERS)

    @property
    def can_register_silos(self) -> bool:
        return bool(self.roles & permissions.CAN_REGISTER_SILOS)

    @property
    def is_consortium_admin(self) -> bool:
        return Role.CONSORTIUM_ADMIN in self.roles


def nav_for(request: HttpRequest, consortium: Consortium) -> Nav:
    """The navigation of a page about one of the user's consortia."""
    return Nav(
        consortium=consortium,
        roles=frozenset(permissions.roles_in(request.user, consortium.pk)),
    )


def page(
    request: HttpRequest,
    template: str,
    *,
    consortium: Consortium | None = None,
    section: str = "",
    status: int = 200,
    **context: Any,
) -> HttpResponse:
    """Render a page with the navigation of its consortium."""
    nav = context.pop("nav", None) or (nav_for(request, consortium) if consortium else None)
    return render(
        request,
        template,
        {"nav": nav, "section": section, **context},
        status=status,
    )
