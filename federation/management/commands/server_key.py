"""`manage.py server_key`: print the public key sites pin in site.toml ([server] public_key)."""

from __future__ import annotations

from django.core.management.base import BaseCommand

from federation.signing import server_public_key_text


class Command(BaseCommand):
    help = "Print the server's Ed25519 public key (created on first use) for sites to pin."

    def handle(self, *args: object, **options: object) -> None:
        self.stdout.write(server_public_key_text())
