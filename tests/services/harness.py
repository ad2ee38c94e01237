"""The production stack as real processes: ASGI servers, a Celery worker and beat, site agents.

Everything talks through the services a production deployment uses: PostgreSQL (this pytest
session's test database), Redis (a database number claimed for this session: channel layer and
Celery broker) and a blob folder shared by every process.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
from django.conf import settings
from django.db import connection

from tests import redis_claim
from tests.e2e import harness
from tests.e2e.harness import Proc, wait_until
from tests.services.tcp_proxy import TcpProxy

__all__ = ["Proc", "Stack", "wait_until"]

REDIS_CLAIM_KEY = "quorum:services-test-session"


def database_address() -> tuple[str, int]:
    """Host and port of this session's PostgreSQL."""
    db = connection.settings_dict
    return db.get("HOST") or "127.0.0.1", int(db.get("PORT") or 5432)


def database_url(port: int | None = None) -> str:
    """A postgres:// URL of this session's test database (children connect to it), through
    ``port`` on 127.0.0.1 when given (the stack's TcpProxy)."""
    db = connection.settings_dict
    user = quote(db.get("USER") or "", safe="")
    password = quote(db.get("PASSWORD") or "", safe="")
    auth = f"{user}:{password}@" if password else (f"{user}@" if user else "")
    host, real_port = database_address()
    if port is not None:
        host, real_port = "127.0.0.1", port
    port_text = str(real_port)
    return f"postgres://{auth}{host}:{port_text}/{quote(db['NAME'], safe='')}"


def claim_redis_db(base_url: str) -> tuple[str, Any]:
    """An empty Redis database number for this session, marked as ours."""
    return redis_claim.claim_redis_db(base_url, claim_key=REDIS_CLAIM_KEY, ttl=3600)


def write_site_csv(path: Path, seed: int, n: int = 150) -> Path:
    """A small site dataset: a linear rule with a site-specific shift (non-IID)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.3 * seed, size=(n, 3))
    y = (x[:, 0] - 0.7 * x[:, 1] + 0.2 * rng.normal(size=n) > 0.3 * seed).astype(int)
    frame = pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y})
    frame.loc[::17, "x3"] = np.nan
    frame.to_csv(path, index=False)
    return path


@dataclass
class Stack:
    """Two ASGI servers, one Celery worker (solo pool) and beat, in the production profile."""

    tmp: Path
    redis_url: str
    blob_dir: Path
    key_file: Path
    ports: list[int]
    servers: list[Proc] = field(default_factory=list)
    worker: Proc | None = None
    beat: Proc | None = None
    # Every process of the stack reaches PostgreSQL through this proxy, which a test may cut
    # (tests/services/tcp_proxy.py); the test process itself connects directly.
    db_proxy: TcpProxy | None = None
    # The worker aggregates slowly while this file exists (tests/services/worker.py).
    slow_aggregation_gate: Path = field(init=False)

    def __post_init__(self) -> None:
        self.slow_aggregation_gate = self.tmp / "slow-aggregation"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of the stack."""
        return {
            **os.environ,
            "QUORUM_PROFILE": "production",
            # This process's: a session it creates (force_login) is valid in the servers too.
            "SECRET_KEY": settings.SECRET_KEY,
            "DATABASE_URL": database_url(self.db_proxy.port if self.db_proxy else None),
            "REDIS_URL": self.redis_url,
            "CELERY_BROKER_URL": self.redis_url,
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SECURE_SSL_REDIRECT": "0",  # plain HTTP on loopback: no TLS proxy in front
            "QUORUM_HOME": str(self.tmp / "home"),
            "QUORUM_BLOB_DIR": str(self.blob_dir),
            "QUORUM_SIGNING_KEY_FILE": str(self.key_file),
            "QUORUM_SWEEP_SECONDS": "0.5",
            "QUORUM_HEARTBEAT_SECONDS": "1",
            "QUORUM_AGGREGATION_STALE_SECONDS": "4",
            "QUORUM_TEST_SLOW_AGGREGATION": str(self.slow_aggregation_gate),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            **extra,
        }

    def build(self) -> None:
        """Create (not start) the processes."""
        py = sys.executable
        self.servers = [
            Proc(
                f"server {i}",
                [py, "manage.py", "serve", "--port", str(port), "--log-level", "info"],
                self.tmp / f"server-{i}.log",
                self.env(),
            )
            for i, port in enumerate(self.ports)
        ]
        self.worker = Proc(
            "celery worker",
            [py, "-m", "tests.services.worker", "-n", f"quorum-test-{os.getpid()}@%h"],
            self.tmp / "worker.log",
            self.env(),
        )
        self.beat = Proc(
            "celery beat",
            [
                py,
                "-m",
                "celery",
                "-A",
                "config",
                "beat",
                "-l",
                "info",
                "-s",
                str(self.tmp / "beat-schedule"),
            ],
            self.tmp / "beat.log",
            self.env(),
        )

    @property
    def procs(self) -> list[Proc]:
        """Every process of the stack."""
        return [*self.servers, *(p for p in (self.worker, self.beat) if p is not None)]

    def start(self, timeout: float = 60.0) -> None:
        """Start every process and wait until each is ready."""
        for proc in self.procs:
            proc.start()
        for i in range(len(self.servers)):
            self.wait_server(i, timeout=timeout)
        self.wait_worker(timeout=timeout)
        wait_until(
            lambda: "Scheduler: Sending due task quorum-sweep" in _read(self.beat),
            timeout=timeout,
            what="celery beat to send a sweep",
            procs=self.procs,
        )

    def stop(self) -> None:
        """Stop every process."""
        for proc in self.procs:
            proc.stop()

    def wait_server(self, index: int, *, timeout: float = 60.0) -> None:
        """Until server `index` answers /healthz with 200."""
        wait_until(
            lambda: self.healthz(index)[0] == 200,
            timeout=timeout,
            what=f"server {index} to be healthy",
            procs=self.procs,
        )

    def wait_worker(self, *, timeout: float = 60.0, readiness: int = 1) -> None:
        """Until the worker's log says it is ready for the `readiness`-th time."""
        assert self.worker is not None
        wait_until(
            lambda: _read(self.worker).count(" ready.") >= readiness,
            timeout=timeout,
            what="the celery worker to be ready",
            procs=self.procs,
        )

    def http_url(self, index: int, path: str = "/") -> str:
        """A URL on server `index`."""
        return f"http://127.0.0.1:{self.ports[index]}{path}"

    def ws_url(self, index: int, path: str = "/ws/agent/") -> str:
        """A websocket URL on server `index`."""
        return f"ws://127.0.0.1:{self.ports[index]}{path}"

    def healthz(self, index: int) -> tuple[int, dict[str, Any]]:
        """Status and JSON of GET /healthz on server `index` (0 when it does not answer)."""
        try:
            with urllib.request.urlopen(self.http_url(index, "/healthz"), timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def agent(self, tmp: Path, name: str, *, server: int, token: str, data_csv: Path) -> Proc:
        """A site agent connected to server `server`."""
        return harness.agent(
            tmp,
            name,
            url=self.ws_url(server),
            token=token,
            data_csv=data_csv,
            env=self.env(),
        )

    def slow_agent(
        self,
        tmp: Path,
        name: str,
        *,
        server: int,
        token: str,
        data_csv: Path,
        delay: str,
        gate: Path | None = None,
    ) -> Proc:
        """A site agent whose training takes longer: `delay` as tests/services/slow_agent.py,
        cut short for good once the file `gate` exists."""
        proc = self.agent(tmp, name, server=server, token=token, data_csv=data_csv)
        proc.args = [sys.executable, "-m", "tests.services.slow_agent", *proc.args[3:]]
        proc.env = {**proc.env, "QUORUM_TEST_TRAIN_DELAY": delay}
        if gate is not None:
            proc.env["QUORUM_TEST_TRAIN_GATE"] = str(gate)
        return proc

    def tails(self, extra: list[Proc] | None = None) -> str:
        """The end of every log, for a failure message."""
        return "\n".join(p.tail() for p in [*self.procs, *(extra or [])])


class Supervisor:
    """Restart stack processes that exit, as systemd's Restart=always does in production."""

    def __init__(self, procs: list[Proc], interval: float = 0.5) -> None:
        self.procs = procs
        self.interval = interval
        self.restarted: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="supervisor", daemon=True)

    def __enter__(self) -> Supervisor:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            for proc in self.procs:
                if proc.popen is not None and proc.popen.poll() is not None:
                    self.restarted.append(f"{proc.name} (exit {proc.popen.returncode})")
                    proc.start()


def kill(proc: Proc) -> None:
    """SIGKILL: no clean shutdown, as when a machine or a process dies."""
    assert proc.popen is not None
    proc.popen.send_signal(signal.SIGKILL)
    proc.popen.wait(timeout=10)


def _read(proc: Proc | None) -> str:
    if proc is None:
        return ""
    try:
        return proc.log.read_text(errors="replace")
    except OSError:
        return ""


def elapsed(since: float) -> float:
    """Seconds since a time.monotonic() value."""
    return time.monotonic() - since
