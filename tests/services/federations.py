"""Consortia with real agents for the services suite, and what every run must satisfy."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth import get_user_model
from django.test import Client
from websockets.sync.client import connect

from fedcore import tensors
from federation.models import (
    AuditEvent,
    Membership,
    ModelVersion,
    Role,
    Round,
    Run,
    Silo,
    Update,
)
from federation.services.audit import audit_verify
from federation.services.silos import silo_issue_token
from federation.storage import blob_store
from tests.factories import (
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
)
from tests.services.harness import Proc, Stack, write_site_csv


@dataclass
class Federation:
    """A consortium, its silos and an approved plan, with one agent per silo (not started)."""

    plan: Any
    silos: list[Silo]
    agents: list[Proc]
    admin: Any = None
    procs: list[Proc] = field(default_factory=list)


def federation(
    stack: Stack,
    tmp_path: Path,
    placement: list[int],
    *,
    slow: dict[int, str] | None = None,
    gate: Path | None = None,
    rounds: int = 2,
    **spec: Any,
) -> Federation:
    """Silos whose agents connect to server placement[i]; agent i is slowed by slow[i]
    (QUORUM_TEST_TRAIN_DELAY of tests/services/slow_agent.py) until the file `gate` exists.
    `spec`: plan_spec overrides."""
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(len(placement), organization__consortium=consortium)
    base = plan_spec(**spec)
    base["training"] = {**base["training"], "rounds": rounds}
    plan = PlanFactory(consortium=consortium, spec=base, silos=silos)
    approve_by_stewards(plan)
    agents = []
    for i, (silo, server) in enumerate(zip(silos, placement, strict=True)):
        kwargs = {
            "server": server,
            "token": silo_issue_token(silo=silo),
            "data_csv": write_site_csv(tmp_path / f"{silo.name}.csv", seed=i),
        }
        if slow and i in slow:
            agents.append(stack.slow_agent(tmp_path, silo.name, delay=slow[i], gate=gate, **kwargs))
        else:
            agents.append(stack.agent(tmp_path, silo.name, **kwargs))
    return Federation(plan=plan, silos=silos, agents=agents)


def online(silos: list[Silo]) -> set[int]:
    """Ids of the silos with a live connection."""
    return set(
        Silo.objects.filter(pk__in=[s.pk for s in silos], connection_id__isnull=False).values_list(
            "pk", flat=True
        )
    )


def run_over(run_id: int) -> bool:
    return not Run.objects.get(pk=run_id).active


def assert_run_consistent(run: Run) -> None:
    """Whatever happened: each accepted update counted once, each model version stored intact,
    the audit chain unbroken."""
    completed = list(run.round_set.filter(status=Round.Status.COMPLETED).order_by("number"))
    versions = list(ModelVersion.objects.filter(run=run).order_by("number"))
    assert [v.number for v in versions] == [0, *(r.number for r in completed)]
    for version in versions:
        data = blob_store().get(version.blob_key)
        assert tensors.sha256_hex(data) == version.checksum, f"model v{version.number}"
    accepted = AuditEvent.objects.filter(action="update.accepted", object_id=str(run.pk))
    assert accepted.count() == Update.objects.filter(round__run=run).count()
    for round_ in completed:
        events = AuditEvent.objects.filter(
            action="round.completed", object_id=str(run.pk), data__round=round_.number
        )
        assert events.count() == 1, f"round {round_.number} completed {events.count()} times"
        counted = events.get().data["updates"]
        assert sorted(counted) == sorted(round_.updates.values_list("silo_id", flat=True))
        assert len(set(counted)) == len(counted)
    verification = audit_verify()
    assert verification.ok, verification


class LiveListener:
    """A dashboard's /ws/live/ socket, logged in as `user`, collecting events on a thread.

    Like the dashboard's monitor.js it reconnects whenever the socket closes or fails to open
    (backoff doubling from 0.25 s to 2 s); `opened` counts the connections.
    """

    def __init__(self, url: str, user: Any, *, timeout: float = 15.0) -> None:
        client = Client()
        client.force_login(user)
        cookie = client.cookies[settings.SESSION_COOKIE_NAME].value
        self.url = url
        self.headers = {
            "Cookie": f"{settings.SESSION_COOKIE_NAME}={cookie}",
            "Origin": url.replace("ws://", "http://").split("/ws/")[0],
        }
        self.events: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self.opened = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._listen, name="live-listener", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while self.opened == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert self.opened, f"the live socket did not open: {self.errors}"

    def _listen(self) -> None:
        delay = 0.25
        while not self.stopping.is_set():
            try:
                with connect(self.url, additional_headers=self.headers, open_timeout=5) as ws:
                    self.opened += 1
                    delay = 0.25
                    while not self.stopping.is_set():
                        try:
                            self.events.append(json.loads(ws.recv(timeout=0.2)))
                        except TimeoutError:
                            continue
            except Exception as exc:  # closed or refused: reconnect, as the page does
                self.errors.append(repr(exc))
            self.stopping.wait(delay)
            delay = min(delay * 2, 2.0)

    def saw(self, event: str) -> bool:
        """Whether an event of this kind arrived."""
        return any(e.get("event") == event for e in self.events)

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)


def consortium_admin(plan: Any, silo: Silo) -> Any:
    """A consortium admin of the plan's consortium (may start runs, sees them live)."""
    user = get_user_model().objects.create_user(username=f"admin-{plan.pk}", password="x" * 12)
    Membership.objects.create(user=user, organization=silo.organization, role=Role.CONSORTIUM_ADMIN)
    return user


def describe(run_id: int) -> str:
    """The state of a run, for a failure message."""
    run = Run.objects.get(pk=run_id)
    lines = [f"run {run.pk}: {run.status} {run.error!r}"]
    for r in run.round_set.order_by("number", "attempt"):
        selected = sorted(r.selected.values_list("pk", flat=True))
        updates = sorted(r.updates.values_list("silo_id", flat=True))
        lines.append(
            f"  round {r.number}.{r.attempt}: {r.status} selected={selected} updates={updates} "
            f"deadline={r.deadline:%H:%M:%S} aggregation_started={r.aggregation_started_at}"
        )
    return "\n".join(lines)
