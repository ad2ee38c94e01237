"""Redis restarted mid-run (channel layer and broker, no persistence): agents and dashboards
reconnect, the worker and beat reconnect, and the run completes with every update counted once.

Never the machine's shared Redis: this test starts a private redis-server on a free port, and a
stack of its own (one ASGI server, a worker, beat) on it.
"""

from __future__ import annotations

import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis

from federation.models import Round, Run
from federation.server import free_port
from tests.factories import start_run
from tests.services.federations import (
    LiveListener,
    assert_run_consistent,
    consortium_admin,
    describe,
    federation,
    online,
    run_over,
)
from tests.services.harness import Proc, Stack, Supervisor, kill, wait_until

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def redis_server(folder: Path, port: int) -> Proc:
    """A throwaway redis-server: loopback only, nothing saved."""
    binary = shutil.which("redis-server")
    assert binary is not None
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    return Proc("private redis", [*args, "--dir", str(folder)], folder / "redis.log", {})


def wait_redis(url: str, procs: list[Proc]) -> None:
    def up() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    wait_until(up, timeout=15, what="the private redis-server", procs=procs)


@contextmanager
def frozen(procs: list[Proc]) -> Iterator[None]:
    """SIGSTOP the processes for the block, then SIGCONT them."""
    running = [p.popen for p in procs if p.popen is not None and p.popen.poll() is None]
    for popen in running:
        popen.send_signal(signal.SIGSTOP)
    try:
        yield
    finally:
        for popen in running:
            popen.send_signal(signal.SIGCONT)


@pytest.fixture
def private(stack: Stack, tmp_path: Path) -> Iterator[tuple[Stack, Proc]]:
    """A stack of one server, a worker and beat on a private redis-server.

    It shares the session's database, so the session stack's worker and beat are frozen
    meanwhile: they would advance this test's run too, and send its events through their Redis.
    """
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server binary here to run a private Redis for the restart test")
    folder = tmp_path / "private"
    folder.mkdir()
    port = free_port()
    server = redis_server(folder, port).start()
    private = Stack(
        tmp=folder,
        redis_url=f"redis://127.0.0.1:{port}/0",
        blob_dir=stack.blob_dir,
        key_file=stack.key_file,
        ports=[free_port()],
    )
    with frozen([p for p in (stack.worker, stack.beat) if p is not None]):
        try:
            wait_redis(private.redis_url, [server])
            private.build()
            private.start()
            yield private, server
        finally:
            private.stop()
            server.stop()


def test_a_redis_restart_mid_run_is_survived_by_agents_dashboards_and_workers(
    private: tuple[Stack, Proc], tmp_path: Path
) -> None:
    stack, server = private
    fed = federation(
        stack,
        tmp_path,
        [0, 0],
        slow={0: "2=2", 1: "2=2"},  # still training round 2 when Redis goes
        min_silos=2,
        rounds=3,
        round_deadline_seconds=30,
    )
    admin = consortium_admin(fed.plan, fed.silos[0])
    procs = [*stack.procs, *fed.agents, server]
    live = LiveListener(stack.ws_url(0, "/ws/live/"), admin)
    try:
        for agent in fed.agents:
            agent.start()
        wait_until(lambda: len(online(fed.silos)) == 2, timeout=60, what="2 agents", procs=procs)
        run = start_run(fed.plan)
        wait_until(
            lambda: Round.objects.filter(run=run, number=2).exists(),
            timeout=30,
            what="round 2 to open",
            procs=procs,
        )
        assert live.saw("round.completed")
        # The worker may exit on losing the broker (kombu's reconnection is fragile: it can die
        # restoring unacknowledged messages); systemd's Restart=always brings it back, and so
        # does this supervisor.
        with Supervisor([p for p in stack.procs if p not in stack.servers]) as supervisor:
            kill(server)  # everything in Redis is gone: groups, queued tasks, timers
            assert stack.healthz(0)[0] == 503
            server.start()
            wait_redis(stack.redis_url, procs)
            wait_until(lambda: stack.healthz(0)[0] == 200, timeout=30, what="healthy", procs=procs)
            try:
                wait_until(lambda: run_over(run.pk), timeout=60, what="the run end", procs=procs)
            except AssertionError as exc:
                raise AssertionError(f"{describe(run.pk)}\n{supervisor.restarted}") from exc
        print(f"redis restart: processes restarted by the supervisor: {supervisor.restarted}")
        assert stack.servers[0].popen is not None and stack.servers[0].popen.poll() is None
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + stack.tails([*fed.agents, server])
        rounds = list(run.round_set.order_by("number", "attempt"))
        assert [(r.number, r.attempt, r.status) for r in rounds] == [
            (n, 1, Round.Status.COMPLETED) for n in (1, 2, 3)
        ]
        for r in rounds:
            assert sorted(r.updates.values_list("silo_id", flat=True)) == sorted(
                s.pk for s in fed.silos
            )
        assert_run_consistent(run)
        for agent in fed.agents:  # their connections were torn down with the channel layer
            assert "retrying in" in agent.log.read_text(), agent.tail()
        # The dashboard's socket went down with Redis; the page reconnects (monitor.js backs off
        # and refreshes on open) and the server accepts it into the live group again.
        assert live.errors, "the dashboard's socket should have been closed with the layer"
        again = LiveListener(stack.ws_url(0, "/ws/live/"), admin, timeout=30)
        again.close()
    finally:
        live.close()
        for agent in fed.agents:
            agent.stop(timeout=3)
