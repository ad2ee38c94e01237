"""ASGI entry point: HTTP (Django) and websockets (Channels), plus lifespan.

At start-up in the embedded profile the server's event loop is handed to the dispatch adapter,
which then runs orchestration steps and the deadline sweeper in this process.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
django_asgi = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from config.security import TrustedProxyMiddleware  # noqa: E402
from dashboard.routing import websocket_urlpatterns as dashboard_websockets  # noqa: E402
from federation import dispatch  # noqa: E402
from federation.routing import websocket_urlpatterns  # noqa: E402

# The client address every limiter counts: X-Forwarded-For only from QUORUM_TRUSTED_PROXIES.
router = TrustedProxyMiddleware(
    ProtocolTypeRouter(
        {
            "http": django_asgi,
            "websocket": AuthMiddlewareStack(
                URLRouter(websocket_urlpatterns + dashboard_websockets)
            ),
        }
    )
)


async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Route lifespan events here, everything else to Django and Channels."""
    if scope["type"] != "lifespan":
        await router(scope, receive, send)
        return
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            dispatch.attach_server_loop(asyncio.get_running_loop())
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            dispatch.embedded.detach()
            await send({"type": "lifespan.shutdown.complete"})
            return
