"""The production profile end to end: PostgreSQL, Redis, two ASGI servers, a Celery worker and
beat, and real site agents connected to both servers.

Orchestration runs only in the Celery worker (the servers hold the agents' connections), so every
step, timer and message crosses a process boundary: steps through the broker, events to agents
and dashboards through the Redis channel layer, state through PostgreSQL.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from federation.models import AuditEvent, Round, Run
from federation.services.api_tokens import api_token_create
from tests.services.federations import (
    LiveListener,
    assert_run_consistent,
    consortium_admin,
    federation,
    online,
    run_over,
)
from tests.services.harness import Stack, wait_until

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def api_post(url: str, token: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def test_both_servers_report_healthy_production_services(stack: Stack) -> None:
    for index in range(2):
        status, body = stack.healthz(index)
        assert status == 200, body
        assert body["profile"] == "production"
        assert body["checks"]["database"]["vendor"] == "postgresql"
        assert body["checks"]["channel_layer"]["backend"] == "RedisChannelLayer"
        assert body["checks"]["broker"]["used"] is True


def test_a_run_started_on_one_server_trains_agents_on_both_through_the_worker(
    stack: Stack, tmp_path: Path
) -> None:
    fed = federation(stack, tmp_path, [0, 0, 1], min_silos=3, round_deadline_seconds=60)
    admin = consortium_admin(fed.plan, fed.silos[0])
    token = api_token_create(actor=None, user=admin).token
    listener = LiveListener(stack.ws_url(1, "/ws/live/"), admin)
    procs = [*stack.procs, *fed.agents]
    try:
        for agent in fed.agents:
            agent.start()
        wait_until(
            lambda: len(online(fed.silos)) == 3, timeout=60, what="3 agents online", procs=procs
        )
        started = time.monotonic()
        status, body = api_post(stack.http_url(0, "/api/v1/runs/"), token, {"plan": fed.plan.pk})
        assert status == 201, body
        run_id = body["id"]
        wait_until(lambda: run_over(run_id), timeout=90, what="the run to end", procs=procs)
        took = time.monotonic() - started
        run = Run.objects.get(pk=run_id)
        assert run.status == Run.Status.COMPLETED, run.error + stack.tails(fed.agents)
        rounds = list(run.round_set.order_by("number"))
        assert [(r.number, r.attempt, r.status) for r in rounds] == [
            (1, 1, Round.Status.COMPLETED),
            (2, 1, Round.Status.COMPLETED),
        ]
        for r in rounds:
            assert sorted(r.updates.values_list("silo_id", flat=True)) == sorted(
                s.pk for s in fed.silos
            )
        assert_run_consistent(run)
        started_by = AuditEvent.objects.get(action="run.started", object_id=str(run_id))
        assert started_by.actor == f"user:{admin.username}"
        assert (
            AuditEvent.objects.filter(action="stats.received", object_id=str(run_id)).count() == 3
        )

        # The worker ran the orchestration; the servers only held connections.
        assert "round 2 aggregated from 3 updates" in stack.worker.log.read_text()
        for server in stack.servers:
            assert f"run {run_id}: round" not in server.log.read_text()

        # Events the worker published reached a dashboard on the other server.
        wait_until(
            lambda: any(e.get("event") == "run.finished" for e in listener.events),
            timeout=10,
            what="run.finished on the live dashboard",
            procs=procs,
        )
        seen = [(e["event"], e.get("round")) for e in listener.events if e.get("run") == run_id]
        assert ("round.completed", 1) in seen and ("round.completed", 2) in seen, seen
        print(f"services: 3 agents on 2 servers, 2 rounds in {took:.1f} s")
    finally:
        listener.close()
        for agent in fed.agents:
            agent.stop()
