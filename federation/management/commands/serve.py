"""`manage.py serve`: run the ASGI server (dashboard, API and the agent websocket)."""

from __future__ import annotations

from django.core.management.base import BaseCommand, CommandParser

from federation.server import serve


class Command(BaseCommand):
    help = "Serve Quorum (HTTP and websockets) with uvicorn."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--log-level", default="info")

    def handle(self, *args: object, **options: object) -> None:
        # Exits within about QUORUM_SHUTDOWN_GRACE_SECONDS of SIGTERM (federation.server.serve).
        serve(str(options["host"]), int(options["port"]), str(options["log_level"]))
