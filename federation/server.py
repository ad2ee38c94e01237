"""Running the ASGI server in-process (the demo) or as a command (manage.py serve)."""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time

import uvicorn
from django.conf import settings


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def uvicorn_config(host: str, port: int, log_level: str = "warning") -> uvicorn.Config:
    """Uvicorn settings for Quorum's ASGI app; websocket frames fit the protocol's frame limit."""
    return uvicorn.Config(
        "config.asgi:application",
        host=host,
        port=port,
        log_level=log_level,
        lifespan="on",
        # X-Forwarded-For is honoured by config.security.TrustedProxyMiddleware, only from
        # QUORUM_TRUSTED_PROXIES; uvicorn's own handling trusted 127.0.0.1 by default.
        proxy_headers=False,
        ws="websockets-sansio",
        ws_max_size=settings.QUORUM_MAX_FRAME_BYTES + (64 << 10),
        # No permessage-deflate: zlib on model weights costs seconds per 100 MB for a few
        # percent (the agent does not offer it either; bench/serialization.py).
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
        # Then uvicorn cancels what still runs: without a bound it waited for every
        # connection's clean-up, which blocks for the database's timeouts when the database is
        # what failed (over 20 s on SIGTERM; issue 12).
        timeout_graceful_shutdown=settings.QUORUM_SHUTDOWN_GRACE_SECONDS,
    )


class PromptServer(uvicorn.Server):
    """Uvicorn that remembers when its shutdown began (SIGTERM), for :func:`serve`."""

    shutdown_began: float | None = None

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """Uvicorn's graceful shutdown, bounded by the config's timeout_graceful_shutdown."""
        self.shutdown_began = time.monotonic()
        await super().shutdown(sockets)


def serve(host: str, port: int, log_level: str = "info") -> None:
    """Run the ASGI server until SIGTERM/SIGINT; then exit within about the shutdown grace.

    Uvicorn closes every connection and, after QUORUM_SHUTDOWN_GRACE_SECONDS, cancels what is
    still running. A worker thread may still be inside a database call then (a cancelled
    coroutine does not stop its thread, and Python joins such threads at exit, for as long as
    the database takes to time out). They get what remains of the grace, at least a second; then
    the process exits without them. Nothing accepted is lost: an update counts once its
    transaction commits, an agent that got no ``update_ack`` sends it again after reconnecting
    (a duplicate is refused), and an uncommitted transaction rolls back as after a crash.
    """
    server = PromptServer(uvicorn_config(host, port, log_level))
    server.run()
    if server.shutdown_began is None:  # start-up failed: nothing is running
        sys.exit(0 if server.started else 1)
    grace = settings.QUORUM_SHUTDOWN_GRACE_SECONDS
    deadline = max(server.shutdown_began + grace, time.monotonic() + 1.0)
    main = threading.main_thread()
    stragglers = [t for t in threading.enumerate() if not t.daemon and t is not main]
    for thread in stragglers:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    left = [t.name for t in stragglers if t.is_alive()]
    if left:
        logging.getLogger("quorum.server").warning(
            "exiting with %d thread(s) still busy after the %g s shutdown grace: %s",
            len(left),
            grace,
            ", ".join(left),
        )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class ServerThread:
    """Uvicorn on a background thread of this process (its event loop runs orchestration)."""

    def __init__(self, host: str, port: int, log_level: str = "warning") -> None:
        self.host, self.port = host, port
        self.server = uvicorn.Server(uvicorn_config(host, port, log_level))
        self.thread = threading.Thread(target=self.server.run, name="quorum-asgi", daemon=True)

    def start(self, timeout: float = 30.0) -> None:
        """Start serving; return once the socket listens."""
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the server on {self.host}:{self.port} stopped during start-up")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the server on {self.host}:{self.port} did not start in {timeout} s"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        """Stop serving and wait for the thread."""
        self.server.should_exit = True
        try:
            self.thread.join(timeout=10)
        except KeyboardInterrupt:  # a second Ctrl-C: leave now, the thread is a daemon
            self.server.force_exit = True

    @property
    def http_url(self) -> str:
        """Base URL of the dashboard."""
        return f"http://{self.host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        """URL agents connect to."""
        return f"ws://{self.host}:{self.port}/ws/agent/"
