"""A flood of invalid agent tokens against a real server, while a valid agent's heartbeat
round-trips are timed (issue 6, part 5: "a flood of invalid tokens does not slow valid agents").

Starts ``manage.py serve`` on a fresh SQLite database twice: with the per-address token-failure
limiter (the default: after QUORUM_AGENT_AUTH_FAILURE_LIMIT failures an address is refused with
no database look-up) and with it effectively off (every bad token is looked up, as from many
addresses). In each, one valid agent says hello and sends heartbeats back to back; the round-trip
times are measured alone, then while N concurrent clients reconnect with bad tokens.

    .venv/bin/python bench/hostile_flood.py            # 50 attackers, 5 s per phase
    .venv/bin/python bench/hostile_flood.py --quick    # 20 attackers, 2 s per phase

tests/e2e/test_hostile_input.py runs ``measure`` too, asserting only correctness.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import websockets  # noqa: E402
from websockets.exceptions import ConnectionClosed, InvalidHandshake  # noqa: E402

from bench._common import ROOT, Table, write_results  # noqa: E402
from fedcore import protocol  # noqa: E402


@dataclass
class FloodResult:
    """Round-trip times of the valid agent and what happened to the bad connections."""

    rtt_ms: list[float] = field(default_factory=list)
    heartbeats_sent: int = 0
    acks: int = 0
    valid_open: bool = True
    bad_attempts: int = 0
    bad_closes: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Percentiles of the round trips and counts."""
        rtt = sorted(self.rtt_ms) or [float("nan")]
        return {
            "heartbeats": self.heartbeats_sent,
            "acks": self.acks,
            "rtt_p50_ms": statistics.median(rtt),
            "rtt_p95_ms": rtt[min(len(rtt) - 1, int(0.95 * len(rtt)))],
            "rtt_max_ms": rtt[-1],
            "bad_attempts": self.bad_attempts,
            "bad_per_s": self.bad_attempts / self.seconds if self.seconds else 0.0,
            "bad_closes": dict(self.bad_closes),
            "valid_open": self.valid_open,
        }


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _next_of(ws: Any, kind: str, timeout: float) -> dict[str, Any]:
    """The next control message of type ``kind``, past anything else the server sends."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        if isinstance(raw, str):
            message = protocol.decode_control(raw)
            if message["type"] == kind:
                return message


async def _bad_client(url: str, stop: asyncio.Event, result: FloodResult) -> None:
    while not stop.is_set():
        result.bad_attempts += 1
        try:
            async with websockets.connect(
                url, additional_headers=_auth(secrets.token_urlsafe(32)), open_timeout=10
            ) as ws:
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), 10)
                except ConnectionClosed:
                    pass
                result.bad_closes[str(ws.close_code)] += 1
        except InvalidHandshake as exc:
            result.bad_closes[f"handshake {type(exc).__name__}"] += 1
        except (OSError, TimeoutError) as exc:
            result.bad_closes[type(exc).__name__] += 1


async def attack(url: str, attackers: int, seconds: float) -> FloodResult:
    """``attackers`` clients reconnecting with bad tokens for ``seconds``."""
    result = FloodResult()
    stop = asyncio.Event()
    started = time.perf_counter()
    bad = [asyncio.create_task(_bad_client(url, stop, result)) for _ in range(attackers)]
    await asyncio.sleep(seconds)
    stop.set()
    await asyncio.gather(*bad, return_exceptions=True)
    result.seconds = time.perf_counter() - started
    return result


async def _attack_in_subprocess(url: str, attackers: int, seconds: float) -> Any:
    """Run the attackers in their own process, so they do not share the valid agent's event
    loop (which would time the bench client, not the server). Returns the process."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).resolve()),
        "--attack",
        url,
        "--attackers",
        str(attackers),
        "--seconds",
        str(seconds),
        stdout=asyncio.subprocess.PIPE,
        cwd=str(ROOT),
    )


async def measure(
    url: str, token: str, *, attackers: int, seconds: float, timeout: float = 10.0
) -> FloodResult:
    """Time a valid agent's heartbeats for ``seconds`` while ``attackers`` clients (in another
    process) reconnect with bad tokens (0: alone). The agent says hello first; the connection
    must stay open."""
    result = FloodResult()
    async with websockets.connect(url, additional_headers=_auth(token), max_size=None) as ws:
        await ws.send(protocol.encode_control("hello", agent_version="bench"))
        await _next_of(ws, "welcome", timeout)
        flood = await _attack_in_subprocess(url, attackers, seconds) if attackers else None
        started = time.perf_counter()
        try:
            while time.perf_counter() - started < seconds:
                sent = time.perf_counter()
                await ws.send(protocol.encode_control("heartbeat", ts=time.time()))
                result.heartbeats_sent += 1
                await _next_of(ws, "heartbeat_ack", timeout)
                result.acks += 1
                result.rtt_ms.append(1000 * (time.perf_counter() - sent))
                await asyncio.sleep(0.02)
        except (ConnectionClosed, TimeoutError):
            result.valid_open = False
        finally:
            result.seconds = time.perf_counter() - started
            if flood is not None:
                out, _ = await flood.communicate()
                attacked = json.loads(out.decode().strip().splitlines()[-1])
                result.bad_attempts = attacked["bad_attempts"]
                result.bad_closes.update(attacked["bad_closes"])
                result.seconds = max(result.seconds, attacked["seconds"])
        result.valid_open = result.valid_open and ws.close_code is None
    return result


# ------------------------------------------------------------------------- standalone server

_SETUP = """
import django
django.setup()
from tests.factories import ConsortiumFactory, SiloFactory
from federation.services.silos import silo_issue_token
silo = SiloFactory(organization__consortium=ConsortiumFactory())
print(silo_issue_token(silo=silo))
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(home: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[bytes], str, str]:
    env = {
        **os.environ,
        "QUORUM_HOME": str(home),
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "QUORUM_LOG_LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
        **env_extra,
    }
    python = sys.executable
    subprocess.run([python, "manage.py", "migrate", "-v", "0"], cwd=ROOT, env=env, check=True)
    token = subprocess.run(
        [python, "-c", _SETUP], cwd=ROOT, env=env, check=True, capture_output=True, text=True
    ).stdout.split()[-1]
    port = _free_port()
    log = open(home / "server.log", "ab")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [python, "manage.py", "serve", "--port", str(port), "--log-level", "error"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 60
    import socket

    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                break
        time.sleep(0.2)
    else:
        server.terminate()
        raise RuntimeError(f"the server did not start; see {home / 'server.log'}")
    return server, f"ws://127.0.0.1:{port}/ws/agent/", token


def main(argv: list[str] | None = None) -> int:
    """Both configurations, alone and flooded; print and write bench/results/hostile_flood.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attackers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--quick", action="store_true", help="20 attackers, 2 s per phase")
    parser.add_argument("--attack", metavar="URL", help=argparse.SUPPRESS)  # the flood process
    args = parser.parse_args(argv)
    if args.attack:
        res = asyncio.run(attack(args.attack, args.attackers, args.seconds))
        print(
            json.dumps(
                {
                    "bad_attempts": res.bad_attempts,
                    "bad_closes": res.bad_closes,
                    "seconds": res.seconds,
                }
            )
        )
        return 0
    attackers, seconds = (20, 2.0) if args.quick else (args.attackers, args.seconds)

    table = Table(
        f"hostile_flood: valid agent heartbeat round trip, {attackers} concurrent bad-token "
        "clients",
        [
            "limiter",
            "phase",
            "heartbeats",
            "acks",
            "p50 ms",
            "p95 ms",
            "max ms",
            "bad conns",
            "bad/s",
            "valid stays open",
            "bad closes",
        ],
    )
    results: dict[str, Any] = {}
    configs = {"on (default)": {}, "off": {"QUORUM_AGENT_AUTH_FAILURE_LIMIT": "100000000"}}
    for label, env_extra in configs.items():
        with tempfile.TemporaryDirectory(prefix="quorum-flood-") as tmp:
            server, url, token = _serve(Path(tmp), env_extra)
            try:
                for phase, n in (("alone", 0), ("flooded", attackers)):
                    res = asyncio.run(measure(url, token, attackers=n, seconds=seconds))
                    s = res.summary()
                    results[f"{label} / {phase}"] = s
                    closes = ", ".join(f"{k}: {v}" for k, v in sorted(s["bad_closes"].items()))
                    table.row(
                        label,
                        phase,
                        s["heartbeats"],
                        s["acks"],
                        s["rtt_p50_ms"],
                        s["rtt_p95_ms"],
                        s["rtt_max_ms"],
                        s["bad_attempts"],
                        s["bad_per_s"],
                        s["valid_open"],
                        closes or "-",
                    )
            finally:
                server.terminate()
                server.wait(timeout=20)
    table.note(
        "close 4401: token refused after a database look-up; 1013: address over the "
        "failure limit, refused with no look-up (try again later)"
    )
    table.note(
        "all clients come from 127.0.0.1; 'off' stands for attackers spread over many addresses"
    )
    table.note(
        "the attackers run in a process of their own, on the same machine as the server and "
        "the valid agent: they compete for its cores"
    )
    table.print()
    write_results("hostile_flood", {"flood": table, "raw": results})
    ok = all(r["valid_open"] and r["acks"] == r["heartbeats"] for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
