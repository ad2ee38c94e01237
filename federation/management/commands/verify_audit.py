"""manage.py verify_audit: recompute the audit log's hash chain; exit 1 at the first break."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError

from federation.services.audit import audit_verify


class Command(BaseCommand):
    help = (
        "Recompute the audit log's hash chain. Prints the head on success; otherwise names the "
        "first broken event (modified, deleted or reordered) and exits with status 1."
    )

    def handle(self, *args: Any, **options: Any) -> None:
        result = audit_verify()
        if not result.ok:
            # CommandError makes manage.py exit with status 1 (returncode is 1 by default).
            raise CommandError(
                f"audit chain BROKEN after {result.checked} good events: {result.problem}"
            )
        self.stdout.write(
            f"audit chain OK: {result.checked} events, head #{result.head_index} {result.head_hash}"
        )
