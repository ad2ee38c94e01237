"""`manage.py api_token`: create (shown once), list and revoke users' API tokens."""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from federation.models import ApiToken
from federation.services import api_tokens


class Command(BaseCommand):
    help = (
        "Create, list or revoke API tokens. Only a token's SHA-256 is stored: the token is "
        "printed once, by 'create'."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        sub = parser.add_subparsers(dest="action", required=True)
        create = sub.add_parser("create", help="create a token for a user and print it once")
        create.add_argument("username")
        create.add_argument("--name", default="", help="a label, e.g. 'ci'")
        create.add_argument("--days", type=int, default=None, help="days until it expires")
        listing = sub.add_parser("list", help="a user's tokens (prefix, name, expiry, last use)")
        listing.add_argument("username")
        revoke = sub.add_parser("revoke", help="revoke a token by the prefix 'list' shows")
        revoke.add_argument("prefix")

    def _user(self, username: str) -> Any:
        user = get_user_model().objects.filter(username=username).first()
        if user is None:
            raise CommandError(f"no user named {username!r}")
        return user

    def handle(self, *args: Any, **options: Any) -> None:
        action = options["action"]
        if action == "create":
            try:
                created = api_tokens.api_token_create(
                    actor=None,
                    user=self._user(options["username"]),
                    name=options["name"],
                    days=options["days"],
                )
            except ValidationError as exc:
                raise CommandError("; ".join(exc.messages)) from None
            self.stdout.write(created.token)
            self.stderr.write(
                f"expires {created.row.expires_at:%Y-%m-%d %H:%M} UTC; it is shown only now "
                "(the server keeps its SHA-256)"
            )
        elif action == "list":
            for row in ApiToken.objects.filter(user=self._user(options["username"])):
                used = f"{row.last_used_at:%Y-%m-%d %H:%M}" if row.last_used_at else "never"
                state = "EXPIRED" if row.expired else f"expires {row.expires_at:%Y-%m-%d}"
                self.stdout.write(f"{row.prefix}…  {row.name or '-'}  {state}  last used {used}")
        else:
            rows = list(ApiToken.objects.filter(prefix=options["prefix"].rstrip("…")))
            if len(rows) != 1:
                raise CommandError(
                    f"{len(rows)} tokens have prefix {options['prefix']!r}; name exactly one "
                    "(see 'api_token list USER')"
                )
            api_tokens.api_token_revoke(actor=None, token=rows[0])
            self.stdout.write(f"revoked {rows[0].prefix}…")
