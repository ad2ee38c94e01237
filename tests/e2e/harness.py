"""Real processes for end-to-end tests: the ASGI server and site agents, sharing the test DB."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management import call_command
from django.db import connection

ROOT = Path(__file__).resolve().parents[2]


def process_env(**extra: str) -> dict[str, str]:
    """Environment for a child process that must see this test's database and blobs."""
    db = connection.settings_dict["NAME"]
    return {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{db}",
        "QUORUM_BLOB_DIR": str(settings.QUORUM_BLOB_DIR),
        "QUORUM_SIGNING_KEY_FILE": str(settings.QUORUM_SIGNING_KEY_FILE),
        "QUORUM_SWEEP_SECONDS": "0.5",
        "QUORUM_HEARTBEAT_SECONDS": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        **extra,
    }


@dataclass
class Proc:
    """A child process with its log file."""

    name: str
    args: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = field(default=None)

    def start(self) -> Proc:
        """Start (or restart) the process."""
        with open(self.log, "ab") as fh:
            self.popen = subprocess.Popen(
                self.args,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=ROOT,
            )
        return self

    def terminate(self) -> None:
        """Send SIGTERM if it runs, without waiting (``stop`` waits)."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.terminate()

    def stop(self, timeout: float = 10.0) -> int | None:
        """Terminate and wait."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        return self.popen.returncode

    def tail(self, lines: int = 30) -> str:
        """The end of the log."""
        try:
            text = self.log.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            text = []
        return f"--- {self.name} ({self.log}):\n" + "\n".join(text)


def stop_all(procs: list[Proc], timeout: float = 10.0) -> None:
    """Stop the processes together: SIGTERM to each, then wait for each. An agent takes about a
    second to exit: one after the other, a server and three agents took three."""
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.stop(timeout)


def server(tmp: Path, port: int, env: dict[str, str] | None = None) -> Proc:
    """The Quorum ASGI server (embedded profile) on 127.0.0.1:port (``env``: as for agent)."""
    return Proc(
        "server",
        [sys.executable, "manage.py", "serve", "--port", str(port), "--log-level", "info"],
        tmp / "server.log",
        process_env() if env is None else env,
    )


def agent(
    tmp: Path,
    name: str,
    *,
    url: str,
    token: str,
    data_csv: Path,
    extra: str = "",
    env: dict[str, str] | None = None,
) -> Proc:
    """A real quorum-agent process for one site, pinning the server's public key.

    ``env``: the child's environment (default: process_env(), this test's database and blobs).
    """
    from federation.signing import server_public_key_text

    folder = tmp / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "site.toml").write_text(
        f'[server]\nurl = "{url}"\ntoken = "{token}"\npublic_key = "{server_public_key_text()}"\n\n'
        f'[data]\npath = "{data_csv}"\n\n'
        f'[agent]\nname = "{name}"\n{extra}'
    )
    return Proc(
        f"agent {name}",
        [sys.executable, "-m", "clientagent", "run", "--config", str(folder / "site.toml")],
        folder / "agent.log",
        process_env() if env is None else env,
    )


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, what: str, procs: list[Proc]
) -> None:
    """Poll until predicate() holds; fail with every process's log tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    logs = "\n".join(p.tail() for p in procs)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{logs}")


def port_open(port: int) -> bool:
    """Whether something listens on the loopback port (a server process is up)."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def shared_database(django_db_blocker: Any) -> Iterator[None]:
    """Database access for a module-scoped federation whose rows outlive one test (pytest-django's
    ``django_db_blocker``); flushed afterwards as a transactional test's teardown does, so the
    next test starts from an empty database. The tests that use it must not flush in between:
    their module overrides ``_django_db_helper`` (see test_task_downstream.py)."""
    with django_db_blocker.unblock():
        try:
            yield
        finally:
            call_command("flush", verbosity=0, interactive=False)
