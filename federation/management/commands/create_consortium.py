"""manage.py create_consortium: a consortium with its first admin, in one transaction.

The operator's bootstrap, without the Django admin: the consortium, its first organisations and
its consortium admin (account and membership) are created together or not at all, each through
its audited service (actor "system"). The admin sets their password through an invitation link
printed once (the server keeps its SHA-256), or the operator gives it on standard input.
From then on the consortium admin adds organisations and invites people (docs/governance.md).
"""

from __future__ import annotations

import re
import sys
from typing import Any

from django.contrib.auth import get_user_model
from django.contrib.auth.password_validation import validate_password
from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import transaction

from federation.models import Organization, Role
from federation.services import invitations
from federation.services.audit import audit_append
from federation.services.consortia import consortium_create, organization_create
from federation.services.errors import Conflict
from federation.services.members import membership_add

DEFAULT_ADMIN_ORGANIZATION = "Consortium office"


def _messages(error: ValidationError) -> str:
    if hasattr(error, "error_dict"):
        return "; ".join(f"{field}: {m}" for field, ms in error.message_dict.items() for m in ms)
    return "; ".join(error.messages)


class Command(BaseCommand):
    help = (
        "Create a consortium, its organisations and its first consortium admin (atomically, "
        "audited). Prints a link for the admin to set a password, unless --password-stdin."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="the consortium's name (unique on this server)")
        parser.add_argument("--admin-email", required=True, help="the consortium admin's address")
        parser.add_argument(
            "--admin-username",
            default="",
            help="the admin's username (default: the address's part before @); an existing "
            "account with this username and address is made admin as it is",
        )
        parser.add_argument(
            "--organization",
            action="append",
            default=[],
            metavar="ORG",
            help="a member organisation to create (repeat for several); the first is the "
            f"admin's own, else '{DEFAULT_ADMIN_ORGANIZATION}' is created for them",
        )
        parser.add_argument(
            "--kind",
            default=Organization.Kind.OTHER,
            choices=Organization.Kind.values,
            help="the kind of the organisations created",
        )
        parser.add_argument("--description", default="", help="the consortium's description")
        parser.add_argument(
            "--password-stdin",
            action="store_true",
            help="read the admin's password from the first line of standard input instead of "
            "printing a link",
        )
        parser.add_argument(
            "--days", type=int, default=None, help="days until the link expires (default 7)"
        )
        parser.add_argument(
            "--base-url",
            default="",
            help="the server's address for the link (default QUORUM_PUBLIC_URL, else "
            "http://127.0.0.1:8000)",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            email = invitations.normalise_email(options["admin_email"])
        except ValidationError as exc:
            raise CommandError(f"--admin-email: {_messages(exc).removeprefix('email: ')}") from None
        username = options["admin_username"].strip() or _username_from(email)
        organizations = list(dict.fromkeys(o.strip() for o in options["organization"] if o.strip()))
        if not organizations:
            organizations = [DEFAULT_ADMIN_ORGANIZATION]
        password = None
        if options["password_stdin"]:
            password = sys.stdin.readline().rstrip("\r\n")
            if not password:
                raise CommandError("--password-stdin: standard input held no password")
        try:
            with transaction.atomic():
                result = self._create(
                    name=options["name"],
                    description=options["description"],
                    organizations=organizations,
                    kind=options["kind"],
                    email=email,
                    username=username,
                    password=password,
                    days=options["days"],
                )
        except (Conflict, PermissionDenied) as exc:
            raise CommandError(str(exc)) from None
        except ValidationError as exc:
            raise CommandError(_messages(exc)) from None
        consortium, admin, created = result
        self.stdout.write(
            f"consortium {consortium.name!r} (id {consortium.pk}) created with the "
            f"organisation(s) {', '.join(organizations)}"
        )
        self.stdout.write(
            f"{admin.get_username()} <{email}> is its consortium admin (member of "
            f"{organizations[0]})"
        )
        if created is not None:
            base = options["base_url"].rstrip("/") or invitations.public_base_url()
            link = invitations.invitation_link(created.token, base)
            self.stdout.write(
                f"Give {admin.get_username()} this link to set a password (it works once, until "
                f"{created.invitation.expires_at:%Y-%m-%d %H:%M} UTC, and is shown only now):"
            )
            self.stdout.write(f"  {link}")
        else:
            self.stdout.write(f"{admin.get_username()} signs in at /login/ with their password")

    def _create(
        self,
        *,
        name: str,
        description: str,
        organizations: list[str],
        kind: str,
        email: str,
        username: str,
        password: str | None,
        days: int | None,
    ) -> tuple[Any, Any, Any]:
        User = get_user_model()
        consortium = consortium_create(actor=None, name=name, description=description)
        orgs = [
            organization_create(actor=None, consortium=consortium, name=org, kind=kind)
            for org in organizations
        ]
        admin = User.objects.filter(username=username).first()
        if admin is not None:
            if (admin.email or "").lower() != email.lower():
                raise CommandError(
                    f"the account {username!r} exists with another address "
                    f"({admin.email or 'none'}); choose another --admin-username"
                )
            if password is not None:
                raise CommandError(
                    f"the account {username!r} exists already; --password-stdin sets the "
                    "password of a new account only"
                )
        else:
            admin = User(username=username, email=email)
            try:
                User._meta.get_field("username").run_validators(username)
            except ValidationError as exc:
                raise ValidationError({"--admin-username": exc.messages}) from None
            if password is not None:
                try:
                    validate_password(password, user=admin)
                except ValidationError as exc:
                    raise ValidationError({"password": exc.messages}) from None
                admin.set_password(password)
            else:
                admin.set_unusable_password()
            admin.save()
            audit_append(
                actor="system",
                action="user.created",
                consortium_id=consortium.pk,
                object_type="user",
                object_id=admin.pk,
                data={"username": username, "by": "manage.py create_consortium"},
            )
        membership = membership_add(
            actor=None, user=admin, organization=orgs[0], role=Role.CONSORTIUM_ADMIN
        )
        created = None
        if not admin.has_usable_password():
            created = invitations.invitation_create(
                actor=None,
                organization=orgs[0],
                email=email,
                role=Role.CONSORTIUM_ADMIN,
                days=days,
                user=admin,
                membership=membership,
            )
        return consortium, admin, created


def _username_from(email: str) -> str:
    """The part of the address before @, as a valid username."""
    return re.sub(r"[^\w.@+-]", "", email.split("@", 1)[0])[:150] or "admin"
