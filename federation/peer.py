"""Websocket consumers whose peer vanishes mid-reply still run their disconnect handler.

A peer that dies (a killed agent, a closed laptop) closes its socket; uvicorn notices, queues a
``websocket.disconnect`` message and from then on refuses every send with ClientDisconnected (an
OSError). Channels handles one message at a time: when that refusal escaped a handler that was
still answering (a welcome, a task's frames, an ack), it ended the consumer's loop on the spot,
uvicorn swallowed it without a word, and the queued disconnect message was never handled. The
consumer's ``disconnect`` never ran: the silo stayed "online" on a dead connection until the
stale-heartbeat sweep (3 x QUORUM_SILO_OFFLINE_AFTER), a secure round kept waiting for it and
its channel stayed in its groups. The wider the window between reading a frame and answering it
(a busy database, a loaded machine), the likelier.

:class:`PeerAware` turns a refused send into :class:`PeerGone` and ends only the handler that
tried it; the consumer's loop goes on to the disconnect message, as for any closed connection.
A leaf module: it imports nothing from ``federation``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("quorum.ws")

Send = Callable[[dict[str, Any]], Awaitable[None]]


class PeerGone(ConnectionError):
    """The connection closed before a frame could be sent (its disconnect message is queued)."""


def send_or_peer_gone(send: Send) -> Send:
    """The ASGI ``send`` callable, raising PeerGone where the server refuses a closed connection."""

    async def send_checked(message: dict[str, Any]) -> None:
        try:
            await send(message)
        except PeerGone:
            raise
        except OSError as exc:  # uvicorn's ClientDisconnected: the transport is gone
            raise PeerGone(f"the connection closed before its {message['type']!r}") from exc

    return send_checked


class PeerAware:
    """Mixin for a Channels websocket consumer (first in its bases): a handler that answers a
    vanished peer ends quietly and the consumer goes on to its disconnect handler."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        await super().__call__(scope, receive, send_or_peer_gone(send))  # type: ignore[misc]

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch; a handler cut short by a vanished peer is not an error."""
        try:
            await super().dispatch(message)  # type: ignore[misc]
        except PeerGone as exc:
            log.info("%s: %s (handling %s)", type(self).__name__, exc, message["type"])
