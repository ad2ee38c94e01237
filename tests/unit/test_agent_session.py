"""The agent's websocket session against a small in-test server (clientagent.connection).

The server side is played with fedcore.protocol over websockets on 127.0.0.1; the real Django
consumer is covered by the e2e tests.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

import clientagent.connection as connection
from clientagent.config import load_config
from clientagent.connection import EXIT_AUTH, EXIT_OK, Agent, Backoff
from clientagent.records import APPROVED
from fedcore import models, protocol, signing, tabular, tensors
from fedcore.plan import plan_hash

TOKEN = "good-token"
SERVER_KEY = signing.generate_private_key()  # the fake server signs grants with it
SCHEMA = {
    "columns": [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "categorical"}],
    "target": {"column": "outcome", "positive": ["sick"]},
    "sensitive": ["sex"],
}
PLAN = {
    "model": {"kind": "logistic_regression"},
    "schema": SCHEMA,
    "training": {"rounds": 3, "local_epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.1},
    "evaluation": {"test_fraction": 0.2, "seed": 0},
    "seed": 0,
}
PLAN_HASH = plan_hash(PLAN)
WAIT = 10.0  # seconds; generous for a loaded CI machine, never reached when things work

pytestmark = pytest.mark.timeout(60)

Script = Callable[[ServerConnection, "FakeServer"], Awaitable[None]]


class FakeServer:
    """A websocket server on 127.0.0.1 that plays one script per connection, in order."""

    def __init__(self, scripts: list[Script], *, token: str = TOKEN):
        self.scripts = list(scripts)
        self.token = token
        self.port = 0
        self.server: Server | None = None
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.heartbeats = 0

    async def start(self) -> None:
        self.server = await serve(
            self._handler,
            "127.0.0.1",
            self.port,
            process_request=self._check_token,
            max_size=connection.MAX_WS_MESSAGE_BYTES,
        )
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/agent/"

    def _check_token(self, conn: ServerConnection, request: Any) -> Any:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return conn.respond(HTTPStatus.UNAUTHORIZED, "unknown token\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        script = self.scripts.pop(0)
        try:
            await script(ws, self)
            await ws.wait_closed()
        except ConnectionClosed:
            pass
        await self.events.put(("closed", ws.close_code))

    async def next_event(self, kind: str) -> Any:
        while True:
            got, value = await asyncio.wait_for(self.events.get(), WAIT)
            if got == kind:
                return value

    async def expect(self, ws: ServerConnection, msg_type: str) -> dict[str, Any]:
        """The next control message, which must be of ``msg_type`` (heartbeats are counted)."""
        while True:
            message = await asyncio.wait_for(ws.recv(), WAIT)
            assert isinstance(message, str), "expected a text frame"
            fields = protocol.decode_control(message)
            if fields["type"] == "heartbeat":
                self.heartbeats += 1
                if msg_type != "heartbeat":
                    continue
            if fields["type"] == "ready" and msg_type != "ready":
                continue  # said after a local decision, whatever else happens
            assert fields["type"] == msg_type, fields
            return fields

    async def recv_update(self, ws: ServerConnection) -> protocol.BinaryMessage:
        reassembler = protocol.Reassembler()
        while True:
            message = await asyncio.wait_for(ws.recv(), WAIT)
            if isinstance(message, str):
                kind = protocol.decode_control(message)["type"]
                assert kind in ("heartbeat", "ready"), message  # ready: after a local decision
                self.heartbeats += kind == "heartbeat"
                continue
            update = reassembler.feed(message)
            if update is not None:
                return update


def grant(
    plan: dict[str, Any] = PLAN,
    *,
    run: int = 5,
    key: Any = SERVER_KEY,
    round: int | None = None,
    attempt: int = 1,
    weights: bytes | None = None,
    preprocessing: dict[str, Any] | None = None,
    expires_in: float = 600.0,
    **changes: Any,
) -> dict[str, Any]:
    """The server's signed authorization for silo site-a of consortium thyroid (``changes``
    override payload fields before signing): for a stats_request, or with ``round`` for that
    round's task with these weights and preprocessing."""
    approval = {"user": "steward-a", "organization": "Hospital A", "role": "data_steward"}
    scope = signing.request_scope(
        kind=signing.STATS_KIND if round is None else signing.TASK_KIND,
        rounds=plan["training"]["rounds"],
        round=round,
        attempt=attempt,
        weights_sha256=None if weights is None else hashlib.sha256(weights).hexdigest(),
        preprocessing=preprocessing,
        expires_at=datetime.now(UTC) + timedelta(seconds=expires_in),
    )
    payload = {
        "run": run,
        "silo": "site-a",
        "consortium": "thyroid",
        "plan_hash": plan_hash(plan),
        "approvals": [approval],
        "silo_approvals": [approval],
        "issued_at": datetime.now(UTC).isoformat(),
        **scope,
        **changes,
    }
    return signing.sign_authorization(key, payload)


def stats_request(plan: dict[str, Any] = PLAN, *, run: int = 5, **grant_changes: Any) -> str:
    """A signed stats_request as the server sends it."""
    return protocol.encode_control(
        "stats_request",
        run=run,
        plan_hash=plan_hash(plan),
        plan=plan,
        authorization=grant(plan, run=run, **grant_changes),
    )


async def hello_welcome(ws: ServerConnection, server: FakeServer) -> dict[str, Any]:
    hello = await server.expect(ws, "hello")
    await server.events.put(("hello", hello))
    await ws.send(
        protocol.encode_control(
            "welcome", silo="site-a", silo_id=1, consortium="thyroid", heartbeat_seconds=0.05
        )
    )
    return hello


async def stats_round(ws: ServerConnection, server: FakeServer) -> dict[str, Any]:
    """stats_request -> stats; returns the fitted preprocessing the server would derive."""
    await ws.send(stats_request())
    stats = await server.expect(ws, "stats")
    await server.events.put(("stats", stats))
    return tabular.merge_statistics([stats["stats"]], tabular.DatasetSchema.from_dict(SCHEMA))


def task_frames(
    fitted: dict[str, Any],
    plan: dict[str, Any] = PLAN,
    *,
    authorization: dict[str, Any] | None = None,
    round: int = 1,
    **grant_changes: Any,
) -> list[bytes]:
    """A signed task (round 1 of run 5), in several small frames."""
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    model = models.build_model(plan["model"], len(tabular.feature_names(schema, fitted)), seed=3)
    payload = tensors.encode_state_dict(model.state_dict())
    if authorization is None:
        authorization = grant(
            plan, round=round, weights=payload, preprocessing=fitted, **grant_changes
        )
    fields = {
        "run": 5,
        "round": round,
        "rounds": 3,
        "plan_hash": plan_hash(plan),
        "plan": plan,
        "preprocessing": fitted,
        "deadline": time.time() + 60,
        "authorization": authorization,
    }
    task = protocol.BinaryMessage("task", fields, payload)
    # Small frames: the task arrives in several chunks, as a big model would.
    return protocol.encode_binary(task, max_frame_bytes=2048, transfer_id="ab" * 16)


async def send_frames(ws: ServerConnection, frames: list[bytes]) -> None:
    for frame in frames:
        await ws.send(frame)


def write_site(tmp_path: Path, url: str, *, bad_row: int | None = None, policy: str = "") -> Path:
    rng = np.random.default_rng(0)
    n = 120
    age = rng.normal(50, 10, n).round(1).astype(str)
    if bad_row is not None:
        age[bad_row] = "abc"
    outcome = np.where(rng.random(n) < 0.5, "sick", "healthy")
    frame = pd.DataFrame({"age": age, "sex": rng.choice(["F", "M"], n), "outcome": outcome})
    frame.to_csv(tmp_path / "data.csv", index=False)
    path = tmp_path / "site.toml"
    path.write_text(
        f'[server]\nurl = "{url}"\ntoken = "{TOKEN}"\n'
        f'public_key = "{signing.public_key_text(SERVER_KEY)}"\n'
        '[data]\npath = "data.csv"\n[agent]\nname = "site-a"\n'
        + (f"[policy]\n{policy}\n" if policy else "")
    )
    return path


def make_agent(tmp_path: Path, url: str, **kwargs: Any) -> Agent:
    config = load_config(write_site(tmp_path, url, **kwargs))
    backoff = Backoff(base=0.05, cap=0.2, rng=random.Random(0))
    return Agent(config, backoff=backoff, progress_tty=False)


async def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def fast_heartbeats_and_info_logs(monkeypatch, caplog):
    monkeypatch.setattr(connection, "MIN_HEARTBEAT_SECONDS", 0.05)
    caplog.set_level(logging.INFO, logger="clientagent")


async def test_round_trip_then_reconnect_after_server_restart(tmp_path, caplog):

    async def first(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        fitted = await stats_round(ws, server)
        await send_frames(ws, task_frames(fitted))
        update = await server.recv_update(ws)
        await server.events.put(("update", update))
        await ws.send(protocol.encode_control("update_ack", run=5, round=1, status="accepted"))
        await server.expect(ws, "heartbeat")  # the idle agent keeps heartbeating

    async def second(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)

    server = FakeServer([first, second])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))

    hello = await server.next_event("hello")
    assert hello["agent_version"] == "0.1.0" and hello["site"] == "site-a"
    stats = await server.next_event("stats")
    assert stats["run"] == 5 and stats["stats"]["n_rows"] < 120  # train split only
    update: protocol.BinaryMessage = await server.next_event("update")
    assert update.fields["silo"] == "site-a" and update.fields["num_examples"] < 120
    assert set(update.fields["metrics"]) == {
        "global",
        "local",
        "train_loss",
        "global_train_loss",
        "timing",
    }
    # This test server's task has no sent_at: no download time, only the site's own timings.
    assert set(update.fields["metrics"]["timing"]) == {"train_seconds", "compute_seconds"}
    assert isinstance(update.fields["sent_at"], float)  # when its upload started
    state = tensors.decode_state_dict(update.payload)
    assert sorted(state) == ["linear.bias", "linear.weight"]
    await wait_until(lambda: "round 1/3 accepted" in caplog.text)
    await wait_until(lambda: server.heartbeats >= 1)

    # The server goes away and comes back on the same port: the agent says hello again.
    await server.stop()
    await server.start()
    assert (await server.next_event("hello"))["site"] == "site-a"
    assert "server unreachable, retrying in" in caplog.text
    await wait_until(lambda: agent.sessions == 2)

    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    assert await server.next_event("closed") == 1000  # closed cleanly by the agent
    await server.stop()


async def test_same_task_after_reconnect_is_resent_without_retraining(tmp_path, monkeypatch):
    calls = []
    real_handle_task = connection.handle_task

    def counting_handle_task(*args: Any, **kwargs: Any) -> protocol.BinaryMessage:
        calls.append(1)
        return real_handle_task(*args, **kwargs)

    monkeypatch.setattr(connection, "handle_task", counting_handle_task)
    frames: list[bytes] = []

    async def first(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        frames.extend(task_frames(await stats_round(ws, server)))
        await send_frames(ws, frames)
        await server.events.put(("update", await server.recv_update(ws)))
        await ws.close(1011, "server restarting")  # the link drops before the ack

    async def second(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await send_frames(ws, frames)  # the server still owes nothing: it re-sends the task
        await server.events.put(("update", await server.recv_update(ws)))
        await ws.send(protocol.encode_control("update_ack", run=5, round=1, status="accepted"))

    server = FakeServer([first, second])
    await server.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(make_agent(tmp_path, server.url).run(stop))

    one = await server.next_event("update")
    two = await server.next_event("update")

    assert two.payload == one.payload
    assert two.fields["nonce"] != one.fields["nonce"]
    # A fresh nonce and upload time; everything else as built the first time.
    assert {k: v for k, v in two.fields.items() if k not in ("nonce", "sent_at")} == {
        k: v for k, v in one.fields.items() if k not in ("nonce", "sent_at")
    }
    assert len(calls) == 1
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()


async def test_an_update_the_server_could_not_store_is_sent_again_when_asked_without_retraining(
    tmp_path, monkeypatch
):
    calls = []
    real_handle_task = connection.handle_task

    def counting_handle_task(*args: Any, **kwargs: Any) -> protocol.BinaryMessage:
        calls.append(1)
        return real_handle_task(*args, **kwargs)

    monkeypatch.setattr(connection, "handle_task", counting_handle_task)

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        frames = task_frames(await stats_round(ws, server))
        await send_frames(ws, frames)
        await server.events.put(("update", await server.recv_update(ws)))
        # The server's disk was full: it says so, then asks again (the same task, same link).
        reason = "the server could not store the update; it will ask for it again shortly"
        await ws.send(protocol.encode_error("internal", reason, run=5, round=1))
        await send_frames(ws, frames)
        await server.events.put(("update", await server.recv_update(ws)))
        await ws.send(protocol.encode_control("update_ack", run=5, round=1, status="accepted"))

    server = FakeServer([script])
    await server.start()
    stop = asyncio.Event()
    runner = asyncio.create_task(make_agent(tmp_path, server.url).run(stop))

    one = await server.next_event("update")
    two = await server.next_event("update")

    assert two.payload == one.payload and two.fields["nonce"] != one.fields["nonce"]
    assert len(calls) == 1
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()


async def test_a_new_local_decision_makes_the_agent_say_ready(tmp_path):
    """The server stops selecting a site for a run it refused; an operator's new decision
    (quorum-agent approve) is said to the server with 'ready' within a heartbeat."""
    agent_holder: list[Agent] = []

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await server.expect(ws, "heartbeat")
        await server.expect(ws, "heartbeat")  # the agent has looked at its decisions once
        agent_holder[0].records.decide(
            plan_hash(PLAN), APPROVED, reason="reviewed", operator="test"
        )
        await server.events.put(("ready", await server.expect(ws, "ready")))

    server = FakeServer([script])
    await server.start()
    stop = asyncio.Event()
    agent = make_agent(tmp_path, server.url)
    agent_holder.append(agent)
    runner = asyncio.create_task(agent.run(stop))

    ready = await server.next_event("ready")
    assert ready["type"] == "ready"
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()


async def test_bad_data_and_bad_frames_get_error_replies_and_the_agent_keeps_running(
    tmp_path, caplog
):
    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await ws.send("this is not json")
        await server.events.put(("error", await server.expect(ws, "error")))
        await ws.send(b"QRMB\x01garbage")
        await server.events.put(("error", await server.expect(ws, "error")))
        await ws.send(stats_request())
        await server.events.put(("error", await server.expect(ws, "error")))
        await ws.send(protocol.encode_control("run_finished", run=5, status="failed"))
        await ws.send(protocol.encode_control("heartbeat_ack", ts=1.0))

    server = FakeServer([script])
    await server.start()
    stop = asyncio.Event()
    agent = make_agent(tmp_path, server.url, bad_row=16)
    runner = asyncio.create_task(agent.run(stop))

    assert (await server.next_event("error"))["code"] == "malformed"
    assert (await server.next_event("error"))["code"] in ("truncated", "malformed")
    data_error = await server.next_event("error")
    assert data_error["code"] == "data_invalid" and data_error["run"] == 5
    # The server learns column and row, never the cell value; the operator's log has it all.
    assert "'age'" in data_error["reason"] and "abc" not in data_error["reason"]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR and "abc" in r.message]
    assert logged, "the site operator must see the data problem at ERROR level"
    await wait_until(lambda: "run 5 finished: failed" in caplog.text)
    assert not runner.done()

    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    assert await server.next_event("closed") == 1000
    await server.stop()


async def test_refused_token_at_handshake_exits_3_without_retrying(tmp_path, caplog):
    server = FakeServer([], token="another-token")
    await server.start()

    code = await asyncio.wait_for(make_agent(tmp_path, server.url).run(), WAIT)

    assert code == EXIT_AUTH
    assert "the server refused this site's token" in caplog.text
    assert "retrying" not in caplog.text
    await server.stop()


async def test_auth_failed_message_and_close_4401_exit_3(tmp_path, caplog):
    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await server.expect(ws, "hello")
        await ws.send(protocol.encode_error("auth_failed", "token revoked"))
        await ws.close(4401, "auth failed")

    server = FakeServer([script])
    await server.start()

    code = await asyncio.wait_for(make_agent(tmp_path, server.url).run(), WAIT)

    assert code == EXIT_AUTH
    assert "ask the consortium admin for a new token" in caplog.text
    await server.stop()


async def test_close_4401_alone_also_exits_3(tmp_path):
    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await ws.close(4401, "auth failed")

    server = FakeServer([script])
    await server.start()

    assert await asyncio.wait_for(make_agent(tmp_path, server.url).run(), WAIT) == EXIT_AUTH
    await server.stop()


async def test_stop_while_the_server_is_unreachable(tmp_path, caplog):
    server = FakeServer([])
    await server.start()
    url = server.url
    await server.stop()  # nothing listens on this port any more
    stop = asyncio.Event()
    runner = asyncio.create_task(make_agent(tmp_path, url).run(stop))

    await wait_until(lambda: caplog.text.count("server unreachable, retrying in") >= 3)
    stop.set()

    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    assert "(attempt 3)" in caplog.text


def test_backoff_delays_are_bounded_and_growing():
    class Highest(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b

    backoff = Backoff(rng=Highest())
    ceilings = [backoff.next_delay() for _ in range(10)]
    assert ceilings == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]
    assert backoff.attempt == 10
    backoff.reset()
    assert backoff.next_delay() == 0.5

    jittered = Backoff(rng=random.Random(42))
    for attempt in range(2000):
        delay = jittered.next_delay()
        assert 0.0 <= delay <= (0.5 * 2**attempt if attempt < 6 else 30.0)
    assert jittered.ceiling(10_000) == 30.0  # no float overflow after many failures
    assert isinstance(Backoff().rng, random.SystemRandom)


def test_sigterm_stops_the_cli_cleanly(tmp_path):
    site = write_site(tmp_path, "ws://127.0.0.1:9/ws/agent/")  # port 9: nothing listens
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "clientagent", "run", "--config", str(site)],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],  # the repo root: `-m` imports from there
    )
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "server unreachable, retrying in" in line:
                break
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == EXIT_OK
        rest = proc.stderr.read()
        assert "quorum-agent[site-a]: received SIGTERM, stopping" in rest
        assert "Traceback" not in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
