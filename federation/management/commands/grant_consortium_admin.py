"""manage.py grant_consortium_admin: make a consortium's first admin (the operator's bootstrap).

The Django admin cannot write memberships; this goes through ``services.members.membership_add``
and its audit (actor "system"), and it grants only the consortium admin role: approving roles
are granted by each organisation's own admin (docs/governance.md).
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from federation.models import Organization, Role
from federation.services.errors import Conflict
from federation.services.members import membership_add


class Command(BaseCommand):
    help = "Make USER a consortium admin, as a member of ORGANIZATION of CONSORTIUM (audited)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("consortium", help="the consortium's name")
        parser.add_argument("organization", help="the member organisation the admin belongs to")
        parser.add_argument("user", help="the username")

    def handle(self, *args: Any, **options: Any) -> None:
        organization = (
            Organization.objects.filter(
                consortium__name=options["consortium"], name=options["organization"]
            )
            .select_related("consortium")
            .first()
        )
        if organization is None:
            raise CommandError(
                f"no organisation {options['organization']!r} in consortium "
                f"{options['consortium']!r}; add it in /admin/ first"
            )
        user = get_user_model().objects.filter(username=options["user"]).first()
        if user is None:
            raise CommandError(f"no user {options['user']!r}; create the account first")
        try:
            membership_add(
                actor=None, user=user, organization=organization, role=Role.CONSORTIUM_ADMIN
            )
        except (PermissionDenied, Conflict, ValidationError) as refused:
            raise CommandError(str(refused)) from refused
        self.stdout.write(
            f"{user.get_username()} is consortium admin of {organization.consortium.name} "
            f"(member of {organization.name})"
        )
