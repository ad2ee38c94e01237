"""Hostile input on the agent websocket: slow peers time out, a partial upload is freed, a flood
of bad tokens from one address is cut off without database look-ups and audited in aggregate."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from config.asgi import application
from fedcore import protocol
from federation import consumers
from federation.models import AuditEvent, Silo
from federation.services.silos import silo_issue_token
from federation.throttle import AuthFailureAudit, AuthFailureLimiter
from tests.factories import ConsortiumFactory, SiloFactory

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


@database_sync_to_async
def make_silo() -> tuple[Silo, str]:
    silo = SiloFactory(organization__consortium=ConsortiumFactory())
    return silo, silo_issue_token(silo=silo)


async def connect(token: str, address: str = "203.0.113.7") -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    comm.scope["client"] = (address, 40000)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def control(comm: WebsocketCommunicator, timeout: float = 5) -> dict[str, Any]:
    while True:
        message = protocol.decode_control(await comm.receive_from(timeout=timeout))
        if message["type"] != "plan_offer":
            return message


async def test_a_connection_that_never_says_hello_is_closed(settings: Any) -> None:
    settings.QUORUM_HELLO_TIMEOUT_SECONDS = 0.3
    _, token = await make_silo()
    comm = await connect(token)

    error = await control(comm)
    assert error["code"] == "timeout" and "hello" in error["reason"]
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4408}


async def test_a_hello_waiting_for_a_busy_database_is_not_timed_out(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUORUM_HELLO_TIMEOUT_SECONDS = 0.3
    _, token = await make_silo()
    real_connect = consumers.silo_services.silo_connect

    def busy_connect(**kwargs: Any) -> Any:
        time.sleep(0.6)  # the hello arrived in time; the database answers after the deadline
        return real_connect(**kwargs)

    monkeypatch.setattr(consumers.silo_services, "silo_connect", busy_connect)
    comm = await connect(token)
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"
    await comm.disconnect()


async def test_hello_in_time_cancels_the_deadline(settings: Any) -> None:
    settings.QUORUM_HELLO_TIMEOUT_SECONDS = 0.3
    _, token = await make_silo()
    comm = await connect(token)
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"

    assert await comm.receive_nothing(timeout=0.6)  # no timeout error, no close
    await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
    assert (await control(comm))["type"] == "heartbeat_ack"
    await comm.disconnect()


def chunked_update(size: int = 5000) -> list[bytes]:
    message = protocol.BinaryMessage(
        type="update",
        fields={
            "run": 1,
            "round": 1,
            "nonce": secrets.token_hex(16),
            "num_examples": 4,
            "metrics": {},
        },
        payload=secrets.token_bytes(size),
    )
    return protocol.encode_binary(message, max_frame_bytes=1000)


async def test_a_stalled_upload_is_dropped_and_the_next_one_starts_clean(settings: Any) -> None:
    settings.QUORUM_UPLOAD_STALL_SECONDS = 0.3
    _, token = await make_silo()
    comm = await connect(token)
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"
    frames = chunked_update()
    assert len(frames) > 3
    for frame in frames[:2]:
        await comm.send_to(bytes_data=frame)

    error = await control(comm)
    assert error["code"] == "timeout" and "stalled" in error["reason"]
    # The partial transfer is gone: its next chunk is out of sequence, and a whole new message
    # is reassembled (and then judged by the update service: run 1 does not exist here).
    await comm.send_to(bytes_data=frames[2])
    assert (await control(comm))["code"] == "chunk_sequence"
    for frame in chunked_update():
        await comm.send_to(bytes_data=frame)
    assert (await control(comm))["code"] == "wrong_run"
    await comm.disconnect()


async def test_steady_chunks_are_not_cut_off(settings: Any) -> None:
    settings.QUORUM_UPLOAD_STALL_SECONDS = 0.5
    _, token = await make_silo()
    comm = await connect(token)
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"
    *first, last = chunked_update()
    for frame in first:
        await comm.send_to(bytes_data=frame)
        assert await comm.receive_nothing(timeout=0.2)  # each gap is under the deadline
    await comm.send_to(bytes_data=last)
    # The whole message arrived and went to the update service (run 1 does not exist).
    assert (await control(comm))["code"] == "wrong_run"
    await comm.disconnect()


async def test_an_address_with_too_many_bad_tokens_is_cut_off_without_queries(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 3
    consumers.reset_auth_failure_tracking()
    _, token = await make_silo()
    for _ in range(3):
        comm = await connect("bad-" + secrets.token_urlsafe(8))
        assert (await control(comm))["code"] == "auth_failed"
        assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4401}

    looked_up: list[str] = []
    real_authenticate = consumers.silo_services.silo_authenticate

    def counting_authenticate(*, token: str) -> Any:
        looked_up.append(token)
        return real_authenticate(token=token)

    monkeypatch.setattr(consumers.silo_services, "silo_authenticate", counting_authenticate)
    comm = await connect("bad-again")
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1013}
    assert looked_up == []  # refused without a token look-up (no database query)
    # Even a valid token from that address waits (an agent retries 1013; it stops on 4401) ...
    comm = await connect(token)
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1013}
    # ... while other addresses are served as usual.
    comm = await connect(token, address="198.51.100.9")
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"
    assert looked_up == [token]
    await comm.disconnect()


async def test_bad_tokens_are_audited_in_aggregate_not_one_row_each(settings: Any) -> None:
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 1000
    settings.QUORUM_AGENT_AUTH_AUDIT_INTERVAL_SECONDS = 3600
    consumers.reset_auth_failure_tracking()
    for i in range(12):
        comm = await connect("nope", address=f"192.0.2.{i % 3}")
        assert (await control(comm))["code"] == "auth_failed"
        await comm.receive_output(timeout=5)

    events = await database_sync_to_async(
        lambda: list(AuditEvent.objects.filter(action="agent.auth_failures"))
    )()
    assert len(events) == 1  # the first failure is reported at once; the rest wait an interval
    assert events[0].data["failures"] == 1


def test_the_audit_aggregate_counts_every_failure_of_its_interval() -> None:
    now = [0.0]
    audit = AuthFailureAudit(interval=60, clock=lambda: now[0])
    assert audit.failed("a") == {
        "failures": 1,
        "refused_blocked": 0,
        "addresses": 1,
        "top_addresses": {"a": 1},
        "interval_seconds": 60,
    }
    for address in ["a", "b", "a"]:
        assert audit.failed(address) is None
    assert audit.failed("c", blocked=True) is None
    now[0] = 61.0
    report = audit.failed("b")
    assert report is not None
    assert report["failures"] == 4 and report["refused_blocked"] == 1
    assert report["top_addresses"] == {"a": 2, "b": 2}


async def test_a_burst_of_bad_tokens_costs_at_most_max_pending_look_ups(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 3
    settings.QUORUM_AGENT_AUTH_MAX_PENDING = 4
    consumers.reset_auth_failure_tracking()
    looked_up: list[str] = []

    def slow_authenticate(*, token: str) -> None:
        looked_up.append(token)
        time.sleep(0.2)  # every connection is waiting for its look-up at the same time

    monkeypatch.setattr(consumers.silo_services, "silo_authenticate", slow_authenticate)
    comms = await asyncio.gather(*(connect(f"bad-{i}") for i in range(8)))
    closes = [await c.receive_output(timeout=5) for c in comms]

    assert len(looked_up) == 4  # max_pending in flight; the other 4 refused without a query
    codes = sorted(c.get("code") for c in closes if c["type"] == "websocket.close")
    assert codes.count(1013) == 4
    # The 4 confirmed failures passed the limit: the address is now blocked outright.
    comm = await connect("bad-later")
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1013}
    assert len(looked_up) == 4


async def test_many_valid_agents_behind_one_address_all_get_in(settings: Any) -> None:
    # A restart: every agent behind one NAT reconnects at once. Pending look-ups are not
    # failures, so a low failure limit refuses none of them.
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 2
    consumers.reset_auth_failure_tracking()
    tokens = [(await make_silo())[1] for _ in range(12)]
    comms = await asyncio.gather(*(connect(token) for token in tokens))
    for comm in comms:
        await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    for comm in comms:
        assert (await control(comm))["type"] == "welcome"
        await comm.disconnect()


async def test_valid_tokens_do_not_count_towards_the_limit(settings: Any) -> None:
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 2
    consumers.reset_auth_failure_tracking()
    _, token = await make_silo()
    for _ in range(3):
        comm = await connect(token)
        await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
        assert (await control(comm))["type"] == "welcome"
        await comm.disconnect()


def test_the_limiter_bounds_look_ups_in_flight_per_address() -> None:
    limiter = AuthFailureLimiter(limit=5, window=10, max_pending=2)
    assert limiter.begin("x") and limiter.begin("x") and not limiter.begin("x")
    assert limiter.begin("y")  # other addresses are not affected
    limiter.end("x")
    assert limiter.begin("x")
    assert not limiter.blocked("x")  # looking up is not failing


def test_the_limiter_blocks_for_its_window_then_forgets() -> None:
    now = [0.0]
    limiter = AuthFailureLimiter(limit=2, window=10, clock=lambda: now[0])
    assert not limiter.failed("x") and not limiter.blocked("x")
    assert limiter.failed("x") and limiter.blocked("x") and not limiter.blocked("y")
    now[0] = 10.0
    assert not limiter.blocked("x")
