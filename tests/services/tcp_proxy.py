"""A TCP proxy between the stack and PostgreSQL that a test can cut and restore.

The machine's PostgreSQL cluster is shared, so a test never stops it; it cuts this proxy
instead. Three states:

- ``pass``: bytes flow both ways.
- ``refuse``: every proxied connection is closed and the port is closed (connection refused), as
  when the database server is down or restarting.
- ``blackhole``: every proxied connection is closed; new ones are accepted and never answered,
  as a hung database host that still completes TCP handshakes.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading

PASS, REFUSE, BLACKHOLE = "pass", "refuse", "blackhole"


class TcpProxy:
    """127.0.0.1:port -> upstream, on one selector thread."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.state = PASS
        self._commands: list[str] = []
        self._listener: socket.socket | None = self._listen(0)
        self.port: int = self._listener.getsockname()[1]  # kept across cuts
        self._lock = threading.Lock()
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._held: list[socket.socket] = []  # blackholed connections, never answered
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="pg-proxy", daemon=True)
        self._thread.start()

    def _listen(self, port: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(512)
        sock.setblocking(False)
        return sock

    def set_state(self, state: str) -> None:
        """Switch to PASS, REFUSE or BLACKHOLE (connections open now are closed unless PASS)."""
        with self._lock:
            self.state = state
            self._commands.append(state)
        self._wake_w.send(b"x")

    def close(self) -> None:
        """Stop the proxy thread and close everything."""
        self._stop = True
        self._wake_w.send(b"x")
        self._thread.join(timeout=5)

    # The selector thread owns every socket below.

    def _apply(self, state: str) -> None:
        if state != PASS:
            for a in list(self._pairs):
                self._drop(a)
        for held in self._held:
            held.close()
        self._held.clear()
        listening = self._listener is not None
        if state == REFUSE and self._listener is not None:
            self._selector.unregister(self._listener)
            self._listener.close()
            self._listener = None
        elif state != REFUSE and not listening:
            self._listener = self._listen(self.port)
            self._selector.register(self._listener, selectors.EVENT_READ)

    def _drop(self, sock: socket.socket) -> None:
        other = self._pairs.pop(sock, None)
        for s in (sock, other):
            if s is None:
                continue
            self._pairs.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(s)
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()  # with linger 0: a reset, as a crashed server sends

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, OSError):
            return
        if self.state == BLACKHOLE:
            self._held.append(client)
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._pairs[client], self._pairs[upstream] = upstream, client
        self._selector.register(client, selectors.EVENT_READ)
        self._selector.register(upstream, selectors.EVENT_READ)

    def _forward(self, sock: socket.socket) -> None:
        other = self._pairs.get(sock)
        if other is None:
            return
        try:
            data = sock.recv(65536)
            if not data:
                raise ConnectionResetError
            other.settimeout(10)  # PostgreSQL's traffic is small: a short blocking write
            other.sendall(data)
            other.setblocking(False)
        except OSError:
            self._drop(sock)

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._selector.select(timeout=0.5):
                sock = key.fileobj
                if sock is self._wake_r:
                    self._wake_r.recv(4096)
                    with self._lock:
                        commands, self._commands[:] = list(self._commands), []
                    for state in commands:
                        self._apply(state)
                elif sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)  # type: ignore[arg-type]
        for a in list(self._pairs):
            self._drop(a)
        for held in self._held:
            held.close()
        if self._listener is not None:
            self._listener.close()
