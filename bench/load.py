"""Load: many protocol-level agents against a real server process, in both profiles.

Simulated agents speak the wire protocol (docs/protocol.md) and nothing else: hello with their
silo token, heartbeats, the statistics a stats_request asks for, and for each task an update
built from the task's own weights (plus a small perturbation); no training. Two phases per
profile, against one ASGI process (`manage.py serve`):

1. connections: `--agents` agents connect (ramped) and heartbeat for `--hold` seconds; every
   drop, reconnect and error is counted. Bar: all connected, zero drops.
2. rounds: a plan naming `--round-silos` of those silos, with an MLP of about `--params`
   parameters, is proposed, approved by every participating silo's steward and run for
   `--rounds` rounds while all agents stay connected. Round overhead is the wall time from the
   round opening (tasks dispatched) to the new model version; agents do no training, so it is
   the server's. Bar: every round completes with every selected silo's update.

Profiles: embedded (SQLite, in-process orchestrator) and production (PostgreSQL database
quorum_bench_<pid>, a private Redis database number, a Celery worker and beat, one ASGI process);
the database is dropped and the Redis database flushed afterwards. The silos, organisations,
stewards and tokens are created through the service layer (`silo_register`, `silo_admit`) in a
setup step. Every child process is stopped on exit, Ctrl-C included.

    .venv/bin/python bench/load.py              # 1,000 agents for 60 s; 200-silo rounds, 1M params
    .venv/bin/python bench/load.py --quick      # 100 agents for 10 s; 20-silo rounds, small model
    .venv/bin/python bench/load.py --profiles embedded --agents 500 --round-silos 100

Internal sub-commands (run as child processes): `_setup`, `_run` (Django, on the profile's
database) and `_agents` (the simulated agents, asyncio + websockets).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

if __package__ in (None, ""):  # run as a script: make `bench` and the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import ROOT, Table, bar, write_results

PY = sys.executable
PG_BASE_URL = os.environ.get("QUORUM_BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/postgres")
REDIS_BASE_URL = os.environ.get("QUORUM_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_CLAIM_KEY = "quorum:bench-load-session"
N_FEATURES = 16


# --------------------------------------------------------------------------------------------
# Sizes


def mlp_hidden(params: int, features: int = N_FEATURES) -> list[int]:
    """Two hidden layers [h, h] whose MLP has about `params` parameters (f*h + h*h + 3h + 1)."""
    b = features + 3
    h = int((-b + math.sqrt(b * b + 4 * max(params - 1, 1))) / 2)
    return [max(1, min(h, 4096))] * 2


def mlp_params(hidden: list[int], features: int = N_FEATURES) -> int:
    """Parameter count of the plan's MLP (weights and biases, one output logit)."""
    total, width = 0, features
    for h in [*hidden, 1]:
        total += width * h + h
        width = h
    return total


def plan_spec(*, silos: int, rounds: int, hidden: list[int], deadline: float) -> dict[str, Any]:
    """The benchmark plan: an MLP on N_FEATURES numeric columns, FedAvg, every silo required."""
    return {
        "model": {"kind": "mlp", "hidden": hidden, "activation": "relu"},
        "schema": schema_dict(),
        "training": {"rounds": rounds, "local_epochs": 1, "batch_size": 32, "lr": 0.01},
        "evaluation": {"test_fraction": 0.2, "seed": 0},
        "aggregation": {"strategy": "fedavg"},
        "min_silos": silos,
        "round_deadline_seconds": deadline,
        "round_retries": 0,
        "wait_for_silos_seconds": deadline,
        "seed": 0,
    }


def schema_dict() -> dict[str, Any]:
    """The dataset schema every simulated silo registers."""
    column = {"type": "numeric", "transform": "none", "missing": "impute"}
    return {
        "columns": [{"name": f"x{i}", **column} for i in range(N_FEATURES)],
        "target": {"column": "y", "positive": ["1"]},
        "sensitive": [],
    }


# --------------------------------------------------------------------------------------------
# Django side (child processes with the profile's environment)


def _django() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    os.chdir(ROOT)
    import django

    django.setup()


def cmd_setup(argv: list[str]) -> None:
    """Migrate; create a consortium with `--silos` admitted silos; write their tokens as JSON."""
    p = argparse.ArgumentParser(prog="load.py _setup")
    p.add_argument("--silos", type=int, required=True)
    p.add_argument("--silos-per-org", type=int, default=10)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    _django()
    from django.contrib.auth import get_user_model
    from django.core.management import call_command
    from django.db import transaction

    from federation.models import Consortium, Membership, Organization, Role
    from federation.services.members import membership_accept, membership_add
    from federation.services.silos import silo_admit, silo_register

    started = time.monotonic()
    call_command("migrate", verbosity=0, interactive=False)
    users = get_user_model().objects
    orgs = math.ceil(args.silos / args.silos_per_org)
    with transaction.atomic():
        consortium = Consortium.objects.create(
            name="Load consortium",
            description="bench/load.py",
            require_steward_unanimity=True,
            org_quorum_mode=Consortium.QuorumMode.FRACTION,
            org_quorum_value=0.05,
        )
        office = Organization.objects.create(
            consortium=consortium, name="Consortium office", kind=Organization.Kind.RESEARCH_LAB
        )
        admin = users.create_user(username="load-admin", password=None)
        Membership.objects.create(user=admin, organization=office, role=Role.CONSORTIUM_ADMIN)
        scientist = users.create_user(username="load-scientist", password=None)
        membership_add(actor=admin, user=scientist, organization=office, role=Role.DATA_SCIENTIST)
    tokens: list[dict[str, Any]] = []
    for o in range(orgs):
        with transaction.atomic():
            org = Organization.objects.create(
                consortium=consortium, name=f"Hospital {o:04d}", kind=Organization.Kind.HOSPITAL
            )
            # The org's own admin (invited by the consortium admin) grants the steward role.
            org_admin = users.create_user(username=f"load-orgadmin-{o:04d}", password=None)
            membership_accept(
                actor=org_admin,
                membership=membership_add(
                    actor=admin, user=org_admin, organization=org, role=Role.ORG_ADMIN
                ),
            )
            steward = users.create_user(username=f"load-steward-{o:04d}", password=None)
            membership_add(actor=org_admin, user=steward, organization=org, role=Role.DATA_STEWARD)
            for s in range(o * args.silos_per_org, min(args.silos, (o + 1) * args.silos_per_org)):
                silo = silo_register(
                    actor=steward,
                    organization=org,
                    name=f"site-{s:04d}",
                    description="simulated site (bench/load.py)",
                    schema=schema_dict(),
                    row_count=200,
                    location="nowhere: a protocol-level simulation",
                )
                token = silo_admit(actor=admin, silo=silo)
                tokens.append({"silo_id": silo.pk, "name": silo.name, "token": token})
    args.out.write_text(json.dumps(tokens))
    print(json.dumps({"silos": len(tokens), "seconds": round(time.monotonic() - started, 2)}))


def cmd_run(argv: list[str]) -> None:
    """Propose, approve and run the benchmark plan; wait for it; print round timings as JSON."""
    p = argparse.ArgumentParser(prog="load.py _run")
    p.add_argument("--silos", type=int, required=True)
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--hidden", type=int, nargs="+", required=True)
    p.add_argument("--deadline", type=float, default=300.0)
    p.add_argument("--timeout", type=float, default=1800.0)
    args = p.parse_args(argv)
    _django()
    from django.contrib.auth import get_user_model

    from federation.models import Membership, ModelVersion, Role, Silo, TrainingPlan
    from federation.services.plans import plan_approve, plan_propose
    from federation.services.runs import run_start

    users = get_user_model().objects
    scientist = users.get(username="load-scientist")
    silos = list(Silo.objects.order_by("pk")[: args.silos])
    consortium = silos[0].consortium
    spec = plan_spec(
        silos=len(silos), rounds=args.rounds, hidden=args.hidden, deadline=args.deadline
    )
    t0 = time.monotonic()
    plan = plan_propose(
        actor=scientist,
        consortium=consortium,
        name=f"Load plan ({len(silos)} silos)",
        description="bench/load.py",
        spec=spec,
        silos=silos,
        submit=True,
    )
    org_ids = sorted({s.organization_id for s in silos})
    for membership in Membership.objects.filter(
        organization_id__in=org_ids, role=Role.DATA_STEWARD
    ).select_related("user"):
        plan_approve(actor=membership.user, plan=plan, plan_hash=plan.current_version.spec_hash)
    plan.refresh_from_db()
    if plan.status != TrainingPlan.Status.APPROVED:
        raise SystemExit(f"the plan is {plan.status} after every steward approved it")
    governance_seconds = time.monotonic() - t0
    run = run_start(actor=scientist, plan=plan)
    started = time.monotonic()
    while time.monotonic() - started < args.timeout:
        run.refresh_from_db()
        if not run.active:
            break
        time.sleep(0.25)
    run.refresh_from_db()
    total = time.monotonic() - started
    rounds = []
    versions = {v.number: v for v in ModelVersion.objects.filter(run=run)}
    for r in run.round_set.order_by("number", "attempt"):
        received = sorted(r.updates.values_list("received_at", flat=True))
        version = versions.get(r.number) if r.status == "completed" else None
        rounds.append(
            {
                "number": r.number,
                "attempt": r.attempt,
                "status": r.status,
                "error": r.error,
                "selected": r.selected.count(),
                "updates": len(received),
                # round opened (tasks dispatched) -> new model version committed
                "overhead_s": (version.created_at - r.started_at).total_seconds()
                if version
                else None,
                "collect_s": (received[-1] - r.started_at).total_seconds() if received else None,
                "first_update_s": (received[0] - r.started_at).total_seconds()
                if received
                else None,
                "aggregate_s": (version.created_at - r.aggregation_started_at).total_seconds()
                if version and r.aggregation_started_at
                else None,
            }
        )
    stats_s = None
    first = run.round_set.order_by("number", "attempt").first()
    if first is not None and run.started_at is not None:
        stats_s = (first.started_at - run.started_at).total_seconds()
    print(
        json.dumps(
            {
                "run": run.pk,
                "status": run.status,
                "error": run.error,
                "seconds": total,
                "governance_s": governance_seconds,
                "stats_s": stats_s,
                "rounds": rounds,
            }
        )
    )


# --------------------------------------------------------------------------------------------
# The simulated agents (child process: asyncio + websockets, no Django)


class Counters:
    """What the agents of one process saw; written to a status file every second."""

    def __init__(self) -> None:
        self.connected = 0
        self.welcomed = 0  # sessions ever welcomed
        self.drops = 0  # a welcomed session closed without us asking
        self.reconnects = 0
        self.connect_errors = 0
        self.errors: Counter[str] = Counter()  # error frames by code
        self.heartbeats = 0
        self.heartbeat_acks = 0
        self.rtts: list[tuple[float, float]] = []  # (when, heartbeat round trip seconds)
        self.stats_requests = 0
        self.plan_offers = 0
        self.tasks = 0
        self.updates = 0
        self.update_acks = 0
        self.runs_finished = 0
        self.update_build_s = 0.0
        self.last_error = ""

    def snapshot(self) -> dict[str, Any]:
        now = time.time()
        self.rtts = [(t, r) for t, r in self.rtts if now - t < 120]
        return {
            "pid": os.getpid(),
            "time": now,
            **{k: v for k, v in vars(self).items() if k not in {"rtts", "errors"}},
            "errors": dict(self.errors),
            "rtts": [(round(t, 3), round(r, 5)) for t, r in self.rtts],
        }


class Model:
    """The round's received weights and a fixed perturbation, decoded once per (run, round)."""

    def __init__(self) -> None:
        self.key: tuple[int, int] | None = None
        self.state: dict[str, Any] = {}
        self.noise: dict[str, Any] = {}
        self.payloads: dict[int, bytes] = {}  # by perturbation scale: 7 encodes per round

    def update_payload(self, run: int, rnd: int, payload: bytes, index: int) -> bytes:
        """Safetensors of received weights + (1 + index % 7) * 1e-3 * fixed noise."""
        import torch

        from fedcore import tensors

        if self.key != (run, rnd):
            self.state = tensors.decode_state_dict(payload)
            gen = torch.Generator().manual_seed(rnd)
            self.noise = {
                k: torch.randn(v.shape, generator=gen, dtype=v.dtype) * 1e-3
                for k, v in self.state.items()
                if v.is_floating_point()
            }
            self.key = (run, rnd)
            self.payloads = {}
        scale = 1 + index % 7
        if scale not in self.payloads:
            state = {
                k: (v + scale * self.noise[k]) if k in self.noise else v
                for k, v in self.state.items()
            }
            self.payloads[scale] = tensors.encode_state_dict(state)
        return self.payloads[scale]


class SimAgent:
    """One simulated site: a websocket session, reconnecting until told to stop."""

    def __init__(self, index: int, entry: dict[str, Any], shared: AgentPool) -> None:
        self.index = index
        self.token = entry["token"]
        self.name = entry["name"]
        self.pool = shared
        self.ws: Any = None
        self.welcomed = False

    async def run(self, delay: float) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidHandshake

        c = self.pool.counters
        await asyncio.sleep(delay)
        while not self.pool.stop.is_set():
            self.welcomed = False
            try:
                async with connect(
                    self.pool.url,
                    additional_headers={"Authorization": f"Bearer {self.token}"},
                    max_size=None,
                    open_timeout=120,
                    close_timeout=5,
                    ping_interval=20,
                    ping_timeout=20,
                ) as ws:
                    self.ws = ws
                    await self.session(ws)
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                c.connect_errors += 1
                c.last_error = f"{self.name}: connect: {exc!r}"[:300]
            except ConnectionClosed as exc:
                c.last_error = f"{self.name}: closed: {exc!r}"[:300]
            except Exception as exc:  # a bug here must not end the agent silently
                c.errors["agent_exception"] += 1
                c.last_error = f"{self.name}: {exc!r}"[:300]
            finally:
                self.ws = None
            if self.pool.stop.is_set():
                return
            if self.welcomed:
                c.drops += 1
            c.reconnects += 1
            await asyncio.sleep(1.0 + random.random())

    async def session(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        from fedcore import protocol

        c = self.pool.counters
        await ws.send(protocol.encode_control("hello", agent_version="load-0.1", site=self.name))
        first = protocol.decode_control(await ws.recv())
        if first["type"] != "welcome":
            c.errors[str(first.get("code", first["type"]))] += 1
            c.last_error = f"{self.name}: {first}"[:300]
            return
        self.welcomed = True
        c.welcomed += 1
        c.connected += 1
        beat = asyncio.create_task(self.heartbeat(ws, float(first["heartbeat_seconds"])))
        reassembler = protocol.Reassembler()
        try:
            async for frame in ws:
                if isinstance(frame, str):
                    await self.on_control(ws, protocol.decode_control(frame))
                    continue
                message = reassembler.feed(frame)
                if message is not None and message.type == "task":
                    await self.on_task(ws, message)
        except ConnectionClosed:
            if not self.pool.stop.is_set():
                c.last_error = f"{self.name}: closed {ws.close_code} {ws.close_reason!r}"[:300]
        finally:
            c.connected -= 1
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat

    async def heartbeat(self, ws: Any, every: float) -> None:
        from fedcore import protocol

        await asyncio.sleep(random.random() * every)  # spread the beats
        while True:
            await ws.send(protocol.encode_control("heartbeat", ts=time.time(), state="idle"))
            self.pool.counters.heartbeats += 1
            await asyncio.sleep(every)

    async def on_control(self, ws: Any, msg: dict[str, Any]) -> None:
        from fedcore import protocol

        c = self.pool.counters
        kind = msg["type"]
        if kind == "heartbeat_ack":
            c.heartbeat_acks += 1
            c.rtts.append((time.time(), time.time() - float(msg.get("ts", 0.0))))
        elif kind == "stats_request":
            c.stats_requests += 1
            stats = self.pool.stats_for(msg["plan"])
            await ws.send(protocol.encode_control("stats", run=msg["run"], stats=stats))
        elif kind == "plan_offer":
            c.plan_offers += 1  # a real agent files it for the operator's review
        elif kind == "update_ack":
            c.update_acks += 1
        elif kind == "run_finished":
            c.runs_finished += 1
        elif kind == "error":
            c.errors[str(msg["code"])] += 1
            c.last_error = f"{self.name}: {msg['code']}: {msg['reason']}"[:300]

    async def on_task(self, ws: Any, task: Any) -> None:
        from fedcore import protocol

        c = self.pool.counters
        c.tasks += 1
        run, rnd = task.fields["run"], task.fields["round"]
        t0 = time.perf_counter()
        payload = self.pool.model.update_payload(run, rnd, task.payload, self.index)
        rows = 150 + self.index % 100
        update = protocol.BinaryMessage(
            "update",
            {
                "run": run,
                "round": rnd,
                "nonce": secrets.token_hex(16),
                "num_examples": rows,
                "metrics": {
                    "train_loss": 0.6 - 0.01 * rnd,
                    "global_train_loss": 0.62 - 0.01 * rnd,
                    "local": {"auc": 0.7, "accuracy": 0.75},
                },
                "silo": self.name,
            },
            payload,
        )
        frames = protocol.encode_binary(update)
        c.update_build_s += time.perf_counter() - t0
        for frame in frames:
            await ws.send(frame)
        c.updates += 1


class AgentPool:
    """The agents of one process, their shared counters and caches."""

    def __init__(self, url: str, entries: list[tuple[int, dict[str, Any]]]) -> None:
        self.url = url
        self.stop = asyncio.Event()
        self.counters = Counters()
        self.model = Model()
        self.agents = [SimAgent(i, e, self) for i, e in entries]
        self._stats: dict[str, dict[str, Any]] = {}

    def stats_for(self, plan: dict[str, Any]) -> dict[str, Any]:
        """A site's local statistics for the plan's schema (what tabular.local_statistics gives)."""
        from fedcore.tabular import DatasetSchema, schema_hash

        key = json.dumps(plan["schema"], sort_keys=True)
        if key not in self._stats:
            schema = DatasetSchema.from_dict(plan["schema"])
            self._stats[key] = {
                "schema_hash": schema_hash(schema),
                "n_rows": 200,
                "numeric": {
                    c.name: {"count": 200, "mean": 0.1 * i, "m2": 200.0}
                    for i, c in enumerate(schema.columns)
                },
                "categories": {},
            }
        return self._stats[key]


async def _agents_main(
    url: str, entries: list[tuple[int, dict[str, Any]]], rate: float, status: Path
) -> None:
    pool = AgentPool(url, entries)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, pool.stop.set)

    def write_status() -> None:
        tmp = status.with_suffix(".tmp")
        tmp.write_text(json.dumps(pool.counters.snapshot()))
        os.replace(tmp, status)

    tasks = [asyncio.create_task(agent.run(delay=i / rate)) for i, agent in enumerate(pool.agents)]
    while not pool.stop.is_set():
        write_status()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pool.stop.wait(), 1.0)
    # Stopping: close every socket cleanly (not a drop), then the last status.
    closing = [a.ws.close(1000, "load test over") for a in pool.agents if a.ws is not None]
    await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 30)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    write_status()


def cmd_agents(argv: list[str]) -> None:
    """Run simulated agents for every step-th token of the tokens file until SIGTERM."""
    p = argparse.ArgumentParser(prog="load.py _agents")
    p.add_argument("--url", required=True)
    p.add_argument("--tokens", type=Path, required=True)
    p.add_argument("--start", type=int, required=True)
    p.add_argument("--step", type=int, default=1, help="every step-th token from start")
    p.add_argument("--rate", type=float, default=100.0, help="connections opened per second")
    p.add_argument("--status", type=Path, required=True)
    args = p.parse_args(argv)
    raise_nofile()
    entries = json.loads(args.tokens.read_text())
    mine = [(i, e) for i, e in enumerate(entries) if i % args.step == args.start]
    asyncio.run(_agents_main(args.url, mine, args.rate, args.status))


# --------------------------------------------------------------------------------------------
# The driver: services, processes, phases, tables


def raise_nofile(want: int = 65536) -> int:
    """Raise the soft open-files limit (children inherit it); returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Procs:
    """Every child process this run started, stopped on exit whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def start(self, name: str, args: list[str], env: dict[str, str], log: Path) -> int:
        with open(log, "ab") as fh:
            popen = subprocess.Popen(
                args,
                stdout=fh,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                cwd=ROOT,
            )
        self.procs.append((name, popen, log))
        return popen.pid

    def check(self) -> None:
        """Fail when a child died."""
        for name, popen, log in self.procs:
            if popen.poll() is not None:
                raise RuntimeError(f"{name} exited with {popen.returncode}\n{tail(log)}")

    def stop(self, names: set[str] | None = None, timeout: float = 30.0) -> None:
        chosen = [p for p in self.procs if names is None or p[0] in names]
        for _, popen, _ in chosen:
            if popen.poll() is None:
                popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for _, popen, _ in chosen:
            try:
                popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()
        self.procs = [p for p in self.procs if p not in chosen]


def tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def proc_memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in bytes (empty once it has exited)."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in {"VmRSS", "VmHWM"}:
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    return out


class MemoryWatch:
    """Samples the server processes' VmRSS every half second; keeps the peak per phase."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.phase = "start"
        self.peak: dict[tuple[str, str], int] = {}
        self.hwm: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            mem = proc_memory(pid)
            if "VmRSS" in mem:
                key = (name, self.phase)
                self.peak[key] = max(self.peak.get(key, 0), mem["VmRSS"])
                self.hwm[name] = mem.get("VmHWM", 0)

    def close(self) -> None:
        self.sample()
        self._stop.set()
        self._thread.join(timeout=2)


def claim_redis_db(base_url: str) -> tuple[str, Any]:
    """An empty Redis database number of our own (never 0), marked as claimed."""
    from tests.redis_claim import claim_redis_db as claim

    return claim(base_url, claim_key=REDIS_CLAIM_KEY, ttl=7200)


def pg_admin(sql: str) -> None:
    import psycopg

    parts = urlsplit(PG_BASE_URL)
    with psycopg.connect(
        host=parts.hostname or "127.0.0.1",
        port=parts.port or 5432,
        user=parts.username or None,
        password=parts.password or None,
        dbname=parts.path.lstrip("/") or "postgres",
        autocommit=True,
        connect_timeout=5,
    ) as conn:
        conn.execute(sql)  # type: ignore[arg-type]


def production_available() -> str | None:
    """Why the production profile cannot run here, or None."""
    try:
        pg_admin("SELECT 1")
    except Exception as exc:
        return f"PostgreSQL at {PG_BASE_URL} unreachable: {exc}"
    try:
        import redis

        redis.Redis.from_url(REDIS_BASE_URL, socket_connect_timeout=3).ping()
    except Exception as exc:
        return f"Redis at {REDIS_BASE_URL} unreachable: {exc}"
    return None


def run_child(args: list[str], env: dict[str, str], log: Path, timeout: float) -> dict[str, Any]:
    """Run a Django sub-command to completion; its last stdout line is JSON."""
    proc = subprocess.run(
        args,
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    log.write_text(proc.stdout + "\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{args[2:4]} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def agent_status(files: list[Path]) -> dict[str, Any]:
    """The agent processes' counters, summed (rtts concatenated, errors merged)."""
    total: dict[str, Any] = {"errors": Counter(), "rtts": [], "last_error": ""}
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        for key, value in data.items():
            if key == "errors":
                total["errors"].update(value)
            elif key == "rtts":
                total["rtts"].extend(value)
            elif key == "last_error":
                total["last_error"] = total["last_error"] or value
            elif isinstance(value, int | float) and key not in {"pid", "time"}:
                total[key] = total.get(key, 0) + value
    return total


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


def wait_for(predicate: Any, timeout: float, what: str, procs: Procs) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs.check()
        if predicate():
            return
        time.sleep(0.5)
    raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")


def run_profile(profile: str, args: argparse.Namespace, procs: Procs) -> dict[str, Any]:
    """Both phases against one profile's stack; returns its figures."""
    tmp = Path(tempfile.mkdtemp(prefix=f"quorum-load-{profile}-"))
    print(f"[{profile}] working folder {tmp}", flush=True)
    env = {
        **os.environ,
        "QUORUM_HOME": str(tmp / "home"),
        "QUORUM_BLOB_DIR": str(tmp / "blobs"),
        "QUORUM_SIGNING_KEY_FILE": str(tmp / "keys" / "server-ed25519.pem"),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "QUORUM_LOG_LEVEL": "INFO",
    }
    env.pop("DJANGO_SETTINGS_MODULE", None)
    redis_client = None
    db_name = None
    result: dict[str, Any] = {"profile": profile}
    try:
        if profile == "production":
            db_name = f"quorum_bench_{os.getpid()}"
            pg_admin(f'CREATE DATABASE "{db_name}"')
            redis_url, redis_client = claim_redis_db(REDIS_BASE_URL)
            parts = urlsplit(PG_BASE_URL)
            env.update(
                QUORUM_PROFILE="production",
                DATABASE_URL=urlunsplit((parts.scheme, parts.netloc, f"/{db_name}", "", "")),
                REDIS_URL=redis_url,
                CELERY_BROKER_URL=redis_url,
                SECRET_KEY="load-bench-throwaway-key-not-a-secret-0123456789abcdef",
                ALLOWED_HOSTS="127.0.0.1,localhost",
                SECURE_SSL_REDIRECT="0",
                # The production profile's psycopg pool (QUORUM_DB_POOL, on by default): without
                # it every database hop of a consumer opened a PostgreSQL connection, and 1,000
                # hellos did not get through in 120 s. --no-db-pool reproduces that.
                QUORUM_DB_POOL="0" if args.no_db_pool else "1",
            )
        else:
            env.update(QUORUM_PROFILE="embedded", DATABASE_URL=f"sqlite:///{tmp / 'bench.sqlite3'}")
        for key in ("QUORUM_HEARTBEAT_SECONDS", "QUORUM_SWEEP_SECONDS"):
            if getattr(args, key.lower()) is not None:
                env[key] = str(getattr(args, key.lower()))

        tokens = tmp / "tokens.json"
        t0 = time.monotonic()
        setup = run_child(
            [
                PY,
                __file__,
                "_setup",
                "--silos",
                str(args.agents),
                "--silos-per-org",
                str(args.silos_per_org),
                "--out",
                str(tokens),
            ],
            env,
            tmp / "setup.log",
            timeout=1800,
        )
        result["setup_s"] = time.monotonic() - t0
        print(
            f"[{profile}] {setup['silos']} silos registered and admitted in "
            f"{result['setup_s']:.1f} s",
            flush=True,
        )

        port = free_port()
        server_pid = procs.start(
            "server",
            [PY, "manage.py", "serve", "--port", str(port), "--log-level", "warning"],
            env,
            tmp / "server.log",
        )
        pids = {"server": server_pid}
        if profile == "production":
            pids["worker"] = procs.start(
                "worker",
                [
                    PY,
                    "-m",
                    "celery",
                    "-A",
                    "config",
                    "worker",
                    "--pool=solo",
                    "--loglevel=INFO",
                    "-n",
                    f"quorum-load-{os.getpid()}@%h",
                ],
                env,
                tmp / "worker.log",
            )
            pids["beat"] = procs.start(
                "beat",
                [
                    PY,
                    "-m",
                    "celery",
                    "-A",
                    "config",
                    "beat",
                    "-l",
                    "info",
                    "-s",
                    str(tmp / "beat-schedule"),
                ],
                env,
                tmp / "beat.log",
            )
        watch = MemoryWatch(pids)
        try:
            wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 90, "the server", procs)
            if profile == "production":
                wait_for(
                    lambda: " ready." in (tmp / "worker.log").read_text(errors="replace"),
                    90,
                    "the celery worker",
                    procs,
                )
            result.update(phases(profile, args, env, tmp, port, tokens, procs, watch))
        finally:
            watch.close()
            procs.stop({"agents"})
            procs.stop({"server", "worker", "beat"})
        result["memory"] = {
            name: {
                "hwm": watch.hwm.get(name),
                **{f"peak_{ph}": v for (n, ph), v in watch.peak.items() if n == name},
            }
            for name in pids
        }
        for name in ("server", "worker"):
            log = tmp / f"{name}.log"
            if log.exists():
                text = log.read_text(errors="replace")
                result[f"{name}_log_errors"] = text.count(" ERROR ") + text.count("Traceback")
    finally:
        procs.stop()
        if redis_client is not None:
            with contextlib.suppress(Exception):
                redis_client.flushdb()
                redis_client.close()
        if db_name is not None:
            with contextlib.suppress(Exception):
                pg_admin(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)')
        if args.keep:
            print(f"[{profile}] kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return result


def phases(
    profile: str,
    args: argparse.Namespace,
    env: dict[str, str],
    tmp: Path,
    port: int,
    tokens: Path,
    procs: Procs,
    watch: MemoryWatch,
) -> dict[str, Any]:
    """Connect and hold the agents, then run the rounds while they stay connected."""
    out: dict[str, Any] = {}
    n = args.agents
    status_files = []
    for i in range(min(args.agent_procs, n)):  # interleaved: round silos spread over them all
        status = tmp / f"agents-{i}.json"
        status_files.append(status)
        procs.start(
            "agents",
            [
                PY,
                __file__,
                "_agents",
                "--url",
                f"ws://127.0.0.1:{port}/ws/agent/",
                "--tokens",
                str(tokens),
                "--start",
                str(i),
                "--step",
                str(args.agent_procs),
                "--rate",
                str(args.rate / args.agent_procs),
                "--status",
                str(status),
            ],
            env,
            tmp / f"agents-{i}.log",
        )

    watch.phase = "connect"
    t0 = time.monotonic()
    wait_for(
        lambda: agent_status(status_files).get("connected", 0) >= n,
        max(120.0, 3 * n / args.rate),
        f"{n} agents to connect",
        procs,
    )
    out["connect_s"] = time.monotonic() - t0
    print(
        f"[{profile}] {n} agents connected in {out['connect_s']:.1f} s; holding {args.hold:.0f} s",
        flush=True,
    )

    time.sleep(args.settle)  # the hello storm's backlog drains before the window opens
    watch.phase = "hold"
    before = agent_status(status_files)
    hold_start = time.time()
    min_connected = n
    end = time.monotonic() + args.hold
    while time.monotonic() < end:
        procs.check()
        min_connected = min(min_connected, agent_status(status_files).get("connected", 0))
        time.sleep(0.5)
    after = agent_status(status_files)
    rtts = [r for t, r in after["rtts"] if t >= hold_start]
    out["hold"] = {
        "agents": n,
        "seconds": args.hold,
        "connected_end": after.get("connected", 0),
        "min_connected": min_connected,
        "drops": after.get("drops", 0) - before.get("drops", 0),
        "reconnects": after.get("reconnects", 0) - before.get("reconnects", 0),
        "connect_errors": after.get("connect_errors", 0) - before.get("connect_errors", 0),
        "error_frames": sum((after["errors"] - before["errors"]).values()),
        "heartbeats": after.get("heartbeats", 0) - before.get("heartbeats", 0),
        "heartbeat_acks": after.get("heartbeat_acks", 0) - before.get("heartbeat_acks", 0),
        "rtt_p50_ms": (pct(rtts, 50) or 0) * 1000,
        "rtt_p99_ms": (pct(rtts, 99) or 0) * 1000,
        "drops_total": after.get("drops", 0),
        "last_error": after.get("last_error", ""),
    }
    print(f"[{profile}] hold: {json.dumps(out['hold'])}", flush=True)

    if args.rounds > 0:
        watch.phase = "rounds"
        hidden = mlp_hidden(args.params)
        out["params"] = mlp_params(hidden)
        print(
            f"[{profile}] rounds: {args.rounds} x {args.round_silos} silos, MLP {hidden} "
            f"({out['params']:,} parameters)",
            flush=True,
        )
        before = agent_status(status_files)
        run_started = time.time()
        out["run"] = run_child(
            [
                PY,
                __file__,
                "_run",
                "--silos",
                str(args.round_silos),
                "--rounds",
                str(args.rounds),
                "--hidden",
                *map(str, hidden),
                "--deadline",
                str(args.deadline),
                "--timeout",
                str(args.timeout),
            ],
            env,
            tmp / "run.log",
            timeout=args.timeout + 600,
        )
        after = agent_status(status_files)
        rtts = [r for t, r in after["rtts"] if t >= run_started]
        out["during_rounds"] = {
            "drops": after.get("drops", 0) - before.get("drops", 0),
            "reconnects": after.get("reconnects", 0) - before.get("reconnects", 0),
            "error_frames": dict(after["errors"] - before["errors"]),
            "tasks": after.get("tasks", 0) - before.get("tasks", 0),
            "updates": after.get("updates", 0) - before.get("updates", 0),
            "update_acks": after.get("update_acks", 0) - before.get("update_acks", 0),
            "stats_requests": after.get("stats_requests", 0) - before.get("stats_requests", 0),
            "update_build_s": after.get("update_build_s", 0) - before.get("update_build_s", 0),
            "rtt_p50_ms": (pct(rtts, 50) or 0) * 1000,
            "rtt_p99_ms": (pct(rtts, 99) or 0) * 1000,
            "last_error": after.get("last_error", ""),
        }
        print(
            f"[{profile}] run {out['run']['status']} in {out['run']['seconds']:.1f} s; "
            f"agents: {json.dumps(out['during_rounds'])}",
            flush=True,
        )
    watch.phase = "stop"
    return out


def mib(value: int | None) -> float | None:
    return None if value is None else value / 2**20


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Print the tables; return them for the JSON."""
    conn = Table(
        f"load: {args.agents:,} agents heartbeating on one ASGI process for {args.hold:.0f} s",
        [
            "profile",
            "agents",
            "connect s",
            "connected",
            "min conn",
            "drops",
            "reconnects",
            "errors",
            "beats",
            "acks",
            "RTT p50 ms",
            "RTT p99 ms",
            "server RSS MiB",
            "zero drops",
        ],
    )
    rounds = Table(
        f"load: {args.rounds} rounds x {args.round_silos} silos, "
        f"{mlp_params(mlp_hidden(args.params)):,}-parameter MLP",
        [
            "profile",
            "done",
            "updates/rd",
            "p50 s",
            "p99 s",
            "collect p50 s",
            "agg p50 s",
            "updates/s",
            "stats s",
            "drops",
            "errors",
            "completes",
        ],
    )
    mem = Table(
        "load: server memory (VmRSS peak per phase, VmHWM at the end), MiB",
        ["profile", "process", "connect", "hold", "rounds", "VmHWM"],
    )
    for r in results:
        if "skipped" in r:
            conn.note(f"{r['profile']}: skipped ({r['skipped']})")
            continue
        if "failed" in r:
            conn.note(f"{r['profile']}: FAILED ({r['failed'][:300]})")
        h = r.get("hold")
        server = r.get("memory", {}).get("server", {})
        if h:
            ok = h["connected_end"] == h["agents"] and h["drops"] == 0 and h["reconnects"] == 0
            conn.row(
                r["profile"],
                h["agents"],
                r.get("connect_s"),
                h["connected_end"],
                h["min_connected"],
                h["drops"],
                h["reconnects"],
                h["connect_errors"] + h["error_frames"],
                h["heartbeats"],
                h["heartbeat_acks"],
                h["rtt_p50_ms"],
                h["rtt_p99_ms"],
                mib(server.get("peak_hold")),
                bar(ok),
            )
        run = r.get("run")
        if run:
            done = [x for x in run["rounds"] if x["status"] == "completed"]
            overhead = [x["overhead_s"] for x in done if x["overhead_s"] is not None]
            updates = sum(x["updates"] for x in done)
            d = r["during_rounds"]
            ok = (
                run["status"] == "completed"
                and len(done) == args.rounds
                and all(x["updates"] == args.round_silos for x in done)
            )
            rounds.row(
                r["profile"],
                f"{len(done)}/{args.rounds}",
                statistics.mean(x["updates"] for x in done) if done else 0,
                pct(overhead, 50),
                pct(overhead, 99),
                pct([x["collect_s"] for x in done if x["collect_s"] is not None], 50),
                pct([x["aggregate_s"] for x in done if x["aggregate_s"] is not None], 50),
                updates / sum(overhead) if overhead and sum(overhead) > 0 else None,
                run.get("stats_s"),
                d["drops"],
                sum(d["error_frames"].values()),
                bar(ok),
            )
            if run["status"] != "completed":
                rounds.note(f"{r['profile']}: run {run['status']}: {run['error']}")
        for name, m in r.get("memory", {}).items():
            mem.row(
                r["profile"],
                name,
                mib(m.get("peak_connect")),
                mib(m.get("peak_hold")),
                mib(m.get("peak_rounds")),
                mib(m.get("hwm")),
            )
    conn.note(
        "a drop is a welcomed session closed without the agent asking; RTT: heartbeat "
        "to heartbeat_ack, measured at the agents"
    )
    rounds.note(
        "p50/p99: round opened (tasks dispatched) to the new model version committed; "
        "agents do no training, so this is the server's overhead"
    )
    rounds.note(
        "collect: opened to the last update stored; agg: aggregation start to the new "
        "version; updates/s: updates / summed round time"
    )
    for t in (conn, rounds, mem):
        t.print()
    return {"connections": conn, "rounds": rounds, "memory": mem}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in {"_setup", "_run", "_agents"}:
        {"_setup": cmd_setup, "_run": cmd_run, "_agents": cmd_agents}[sys.argv[1]](sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke run: 100 agents for 10 s, 2 rounds x 20 silos, 50k params",
    )
    parser.add_argument(
        "--profiles",
        nargs="+",
        choices=["embedded", "production"],
        default=["embedded", "production"],
    )
    parser.add_argument("--agents", type=int, help="connections (default 1000)")
    parser.add_argument("--hold", type=float, help="seconds to hold them (default 60)")
    parser.add_argument("--round-silos", type=int, help="silos per round (default 200)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 0: no rounds)")
    parser.add_argument("--params", type=int, help="model parameters (default 1,000,000)")
    parser.add_argument("--agent-procs", type=int, help="agent processes (default 2)")
    parser.add_argument("--rate", type=float, default=100.0, help="connections per second")
    parser.add_argument(
        "--settle", type=float, default=10.0, help="seconds between all connected and the hold"
    )
    parser.add_argument("--silos-per-org", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=300.0, help="round deadline, s")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give the run up after")
    parser.add_argument(
        "--quorum-heartbeat-seconds",
        type=float,
        default=None,
        help="server's heartbeat interval (default: the server's, 5 s)",
    )
    parser.add_argument("--quorum-sweep-seconds", type=float, default=None)
    parser.add_argument(
        "--no-db-pool",
        action="store_true",
        help="production profile: no psycopg pool (a PostgreSQL connection per database hop)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the working folders (logs)")
    args = parser.parse_args()
    quick = {
        "agents": 100,
        "hold": 10.0,
        "round_silos": 20,
        "rounds": 2,
        "params": 50_000,
        "agent_procs": 1,
    }
    full = {
        "agents": 1000,
        "hold": 60.0,
        "round_silos": 200,
        "rounds": 3,
        "params": 1_000_000,
        "agent_procs": 2,
    }
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.round_silos > args.agents:
        parser.error("--round-silos cannot exceed --agents")
    nofile = raise_nofile()
    print(
        f"load: {args.agents} agents ({args.agent_procs} processes), hold {args.hold:.0f} s; "
        f"{args.rounds} rounds x {args.round_silos} silos; {os.cpu_count()} CPUs; "
        f"open files limit {nofile}",
        flush=True,
    )

    procs = Procs()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    results: list[dict[str, Any]] = []
    try:
        for profile in args.profiles:
            if profile == "production" and (why := production_available()):
                print(f"[production] skipped: {why}", flush=True)
                results.append({"profile": profile, "skipped": why})
                continue
            try:
                results.append(run_profile(profile, args, procs))
            except (RuntimeError, subprocess.TimeoutExpired, ValueError) as exc:
                print(f"[{profile}] FAILED: {exc}", flush=True)
                results.append({"profile": profile, "failed": str(exc)})
    finally:
        procs.stop()
    tables = report(results, args)
    write_results(
        "load",
        {
            "settings": {k: v for k, v in vars(args).items()},
            **tables,
            "profiles": results,
        },
    )
    if any("failed" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
