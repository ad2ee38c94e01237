"""Hostile input against a real server process: an oversized websocket frame is cut off at the
limit without being buffered, an over-large declared message is refused at its first chunk, a
silent connection times out, and a flood of bad tokens leaves a valid agent connected and
answered (bench/hostile_flood.py times it; here only correctness is asserted)."""

from __future__ import annotations

import asyncio
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from bench.hostile_flood import measure
from fedcore import protocol
from federation.models import AuditEvent
from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.e2e import harness
from tests.factories import ConsortiumFactory, SiloFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

FRAME_LIMIT = 1 << 20  # QUORUM_MAX_FRAME_BYTES; uvicorn's ws_max_size adds 64 KiB for headers
BIG_FRAME = 64 << 20


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[harness.Proc, str]]:
    port = free_port()
    proc = harness.Proc(
        "server",
        [harness.sys.executable, "manage.py", "serve", "--port", str(port)],
        tmp_path / "server.log",
        harness.process_env(
            QUORUM_MAX_FRAME_BYTES=str(FRAME_LIMIT),
            QUORUM_HELLO_TIMEOUT_SECONDS="1",
            QUORUM_AGENT_AUTH_FAILURE_LIMIT="5",
        ),
    )
    proc.start()
    try:
        harness.wait_until(
            lambda: harness.port_open(port),
            timeout=60,
            what="the server to listen",
            procs=[proc],
        )
        yield proc, f"ws://127.0.0.1:{port}/ws/agent/"
    finally:
        proc.stop()


def silo_token() -> str:
    return silo_issue_token(silo=SiloFactory(organization__consortium=ConsortiumFactory()))


def rss_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


async def hello(url: str, token: str) -> Any:
    ws = await websockets.connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, max_size=None
    )
    await ws.send(protocol.encode_control("hello", agent_version="e2e"))
    while True:
        message = protocol.decode_control(await asyncio.wait_for(ws.recv(), 10))
        if message["type"] == "welcome":
            return ws


async def next_error(ws: Any) -> dict[str, Any]:
    while True:
        raw = await asyncio.wait_for(ws.recv(), 10)
        if isinstance(raw, str) and (message := protocol.decode_control(raw))["type"] == "error":
            return message


def test_an_oversized_frame_is_cut_off_without_being_buffered(server: Any) -> None:
    proc, url = server
    token = silo_token()

    async def scenario() -> int | None:
        ws = await hello(url, token)
        with pytest.raises(ConnectionClosed):
            await ws.send(b"\0" * BIG_FRAME)  # one binary frame, 64 times the limit
            while True:
                await asyncio.wait_for(ws.recv(), 30)
        return ws.close_code

    asyncio.run(hello_then_close(url, token))  # warm up: imports and first-request caches
    peak_before = rss_kib(proc.popen.pid, "VmHWM")
    close_code = asyncio.run(scenario())
    peak_after = rss_kib(proc.popen.pid, "VmHWM")

    assert close_code == 1009  # "message too big", at the frame's header
    assert (peak_after - peak_before) * 1024 < BIG_FRAME // 4, (peak_before, peak_after)
    assert proc.popen.poll() is None  # and the server is still there for everyone else
    asyncio.run(hello_then_close(url, token))


async def hello_then_close(url: str, token: str) -> None:
    ws = await hello(url, token)
    await ws.close()


def test_a_declared_size_over_the_message_limit_is_refused_at_the_first_chunk(
    server: Any,
) -> None:
    _, url = server
    token = silo_token()
    header = {
        "type": "update",
        "transfer": "ab" * 16,
        "index": 0,
        "count": 1 << 20,
        "size": 1 << 40,  # a terabyte, far above QUORUM_MAX_MESSAGE_BYTES (256 MiB)
        "sha256": "00" * 32,
        "fields": {"run": 1, "round": 1, "nonce": "ab" * 16, "num_examples": 1, "metrics": {}},
    }
    raw = json.dumps(header).encode()
    frame = protocol.FRAME_MAGIC + struct.pack(">BI", 1, len(raw)) + raw + b"\0" * 1000

    async def scenario() -> tuple[dict[str, Any], dict[str, Any]]:
        ws = await hello(url, token)
        await ws.send(frame)
        error = await next_error(ws)
        # Nothing was opened: the connection goes on, and the next chunk has no transfer.
        await ws.send(protocol.encode_control("heartbeat", ts=1.0))
        while protocol.decode_control(await ws.recv())["type"] != "heartbeat_ack":
            pass
        header.update(index=1, fields=None)
        del header["fields"]
        raw2 = json.dumps(header).encode()
        await ws.send(protocol.FRAME_MAGIC + struct.pack(">BI", 1, len(raw2)) + raw2 + b"x")
        second = await next_error(ws)
        await ws.close()
        return error, second

    error, second = asyncio.run(scenario())
    assert error["code"] == "oversized" and "declared size" in error["reason"]
    assert second["code"] in {"oversized", "chunk_sequence"}


def test_a_connection_that_never_says_hello_is_closed(server: Any) -> None:
    _, url = server
    token = silo_token()

    async def scenario() -> tuple[dict[str, Any], int | None]:
        async with websockets.connect(
            url, additional_headers={"Authorization": f"Bearer {token}"}
        ) as ws:
            error = await next_error(ws)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            return error, ws.close_code

    error, code = asyncio.run(scenario())
    assert error["code"] == "timeout" and code == 4408


def test_a_flood_of_bad_tokens_leaves_a_valid_agent_connected_and_answered(server: Any) -> None:
    _, url = server
    token = silo_token()

    result = asyncio.run(measure(url, token, attackers=15, seconds=3))

    assert result.valid_open
    assert result.heartbeats_sent > 0 and result.acks == result.heartbeats_sent
    assert result.bad_attempts > 5
    assert set(result.bad_closes) <= {"4401", "1013"}, result.bad_closes
    assert result.bad_closes["1013"] > 0  # the address went over the limit: no more look-ups
    # Refusals are audited in aggregate: one event for the interval, not one per attempt.
    assert AuditEvent.objects.filter(action="agent.auth_failures").count() == 1
