"""The smaller holes of issue 13, replayed against the agent websocket: a flood of error frames,
a JSON number out of range, a reason that forges a log line."""

from __future__ import annotations

import asyncio
import io
import logging
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from config.asgi import application
from config.security import forwarded_client
from fedcore import protocol
from federation import consumers
from federation.models import AuditEvent
from tests.integration.test_security_agent_ws import connect, control, make_silo

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


async def greeted(token: str) -> Any:
    comm = await connect(token)
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"
    return comm


@database_sync_to_async
def audit_rows(prefix: str) -> list[AuditEvent]:
    return list(AuditEvent.objects.filter(action__startswith=prefix).order_by("pk"))


async def test_a_flood_of_error_frames_writes_a_bounded_number_of_audit_rows(
    settings: Any,
) -> None:
    settings.QUORUM_AGENT_REPORT_AUDIT_BURST = 5
    settings.QUORUM_AGENT_REPORT_AUDIT_PER_MINUTE = 0.0  # no refill during the test
    settings.QUORUM_AGENT_REPORT_AUDIT_WINDOW_SECONDS = 3600.0
    _, token = await make_silo()
    comm = await greeted(token)
    for i in range(300):
        frame = protocol.encode_control("error", code="internal", reason=f"flood {i}")
        await comm.send_to(text_data=frame)
    # A heartbeat answered after the flood: every error frame before it was handled.
    await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
    assert (await control(comm))["type"] == "heartbeat_ack"

    assert [row.data["reason"] for row in await audit_rows("agent.error")] == [
        f"flood {i}" for i in range(5)
    ]
    assert await audit_rows("agent.reports_suppressed") == []  # its window has not passed
    await comm.disconnect()

    (summary,) = await audit_rows("agent.reports_suppressed")
    assert summary.data["suppressed"] == 295
    assert summary.data["codes"] == {"internal": 295}


async def test_an_integer_beyond_64_bits_is_refused_with_an_error_frame_and_audited() -> None:
    _, token = await make_silo()
    comm = await greeted(token)
    await comm.send_to(text_data='{"v":1,"type":"heartbeat","ts":1' + "0" * 400 + "}")

    error = await control(comm)
    assert error["type"] == "error" and error["code"] == "malformed"
    assert "401 digits" in error["reason"] and "64-bit" in error["reason"]
    (row,) = await audit_rows("agent.frame_refused")
    assert row.data["code"] == "malformed" and "64-bit" in row.data["reason"]
    # The connection is kept and works.
    await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=2.0))
    assert (await control(comm))["ts"] == 2.0
    await comm.disconnect()


async def test_a_reason_with_a_newline_cannot_forge_a_server_log_line() -> None:
    (configured,) = logging.getLogger("quorum").handlers  # settings.LOGGING's console handler
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(configured.formatter)
    logging.getLogger("quorum").addHandler(handler)
    try:
        _, token = await make_silo()
        comm = await greeted(token)
        forged = "disk full\n2026-12-05 19:00:00,000 CRITICAL quorum.audit: forged\r\x1b[2J"
        await comm.send_to(
            text_data=protocol.encode_control("error", code="internal", reason=forged)
        )
        await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
        assert (await control(comm))["type"] == "heartbeat_ack"
        await comm.disconnect()
    finally:
        logging.getLogger("quorum").removeHandler(handler)

    lines = stream.getvalue().splitlines()
    (reported,) = [line for line in lines if "reports internal" in line]
    assert reported.endswith(
        "disk full\\n2026-12-05 19:00:00,000 CRITICAL quorum.audit: forged\\r\\x1b[2J"
    )
    assert not any(line.startswith("2026-12-05 19:00:00,000") for line in lines)


async def spoofed(token: str, peer: str, forwarded_for: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application,
        "/ws/agent/",
        headers=[
            (b"authorization", f"Bearer {token}".encode()),
            (b"x-forwarded-for", forwarded_for.encode()),
        ],
    )
    comm.scope["client"] = (peer, 40000)
    connected, _ = await comm.connect()
    assert connected
    return comm


async def test_a_spoofed_forwarded_for_does_not_escape_the_token_limiter(settings: Any) -> None:
    """With no trusted proxy (the default) a client on the server's own host cannot rotate the
    address it is counted under by writing X-Forwarded-For."""
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 3
    for i in range(3):
        comm = await spoofed("bad", "127.0.0.1", f"198.51.100.{i}")
        assert (await control(comm))["code"] == "auth_failed"
        await comm.receive_output(timeout=5)
    comm = await spoofed("bad", "127.0.0.1", "198.51.100.99")
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1013}


async def test_behind_a_trusted_proxy_the_right_most_untrusted_address_is_counted(
    settings: Any,
) -> None:
    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 3
    settings.QUORUM_TRUSTED_PROXIES = ["10.0.0.0/8"]
    # The client prepends made-up addresses; the proxies append what they saw: 203.0.113.50.
    for i in range(3):
        comm = await spoofed("bad", "10.0.0.2", f"192.0.2.{i}, 203.0.113.50, 10.0.0.7")
        assert (await control(comm))["code"] == "auth_failed"
        await comm.receive_output(timeout=5)
    comm = await spoofed("bad", "10.0.0.2", "192.0.2.77, 203.0.113.50")
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 1013}
    # Another client behind the same proxy is not blocked.
    _, token = await make_silo()
    comm = await spoofed(token, "10.0.0.2", "203.0.113.51")
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert (await control(comm))["type"] == "welcome"
    await comm.disconnect()
    limiter, _ = consumers.auth_failure_tracking()
    assert limiter.blocked("203.0.113.50") and not limiter.blocked("10.0.0.2")


@pytest.mark.parametrize(
    ("peer", "header", "proxies", "client"),
    [
        ("127.0.0.1", ["6.6.6.6"], [], "127.0.0.1"),  # no proxy configured: header ignored
        ("192.0.2.1", ["6.6.6.6"], ["10.0.0.1"], "192.0.2.1"),  # peer is not a proxy
        ("10.0.0.1", ["6.6.6.6, 203.0.113.5"], ["10.0.0.1"], "203.0.113.5"),
        ("10.0.0.1", ["6.6.6.6", "203.0.113.5, 10.0.0.9"], ["10.0.0.0/24"], "203.0.113.5"),
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], ["10.0.0.0/24"], "10.0.0.3"),  # all proxies
        ("10.0.0.1", [], ["10.0.0.1"], "10.0.0.1"),  # a proxy's own request
        ("::1", ["2001:db8::7"], ["::1"], "2001:db8::7"),
    ],
)
def test_forwarded_client_trusts_only_the_configured_proxies(
    peer: str, header: list[str], proxies: list[str], client: str
) -> None:
    assert forwarded_client(peer, header, proxies) == client


async def test_through_the_real_server_a_local_client_cannot_choose_its_counted_address(
    settings: Any,
) -> None:
    """uvicorn itself used to take X-Forwarded-For from 127.0.0.1: replayed over a socket."""
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    from federation.server import ServerThread, free_port

    settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT = 2
    server = ServerThread("127.0.0.1", free_port())
    await asyncio.to_thread(server.start)
    codes = []
    try:
        for i in range(4):
            headers = {"Authorization": "Bearer bad", "X-Forwarded-For": f"198.51.100.{i}"}
            async with ws_connect(server.ws_url, additional_headers=headers) as ws:
                try:
                    while True:
                        await asyncio.wait_for(ws.recv(), timeout=10)
                except ConnectionClosed as closed:
                    codes.append(closed.rcvd.code if closed.rcvd else None)
    finally:
        await asyncio.to_thread(server.stop)
    assert codes == [4401, 4401, 1013, 1013]  # counted as 127.0.0.1 whatever the header said


def test_the_server_signs_the_plan_offers_it_sends(settings: Any, tmp_path: Any) -> None:
    """What the consumer sends as a plan_offer verifies with the key sites pin, for that silo
    only; with the plan altered in transit it does not."""
    from fedcore.signing import AuthorizationError, verify_offer
    from federation import selectors
    from federation.signing import server_public_key_text
    from tests.factories import PlanFactory, SiloFactory

    settings.QUORUM_SIGNING_KEY_FILE = tmp_path / "keys" / "server.pem"
    silo = SiloFactory()
    plan = PlanFactory(consortium=silo.consortium, silos=[silo])
    fields = selectors.plan_offer_fields(version_id=plan.current_version.pk, silo_id=silo.pk)
    assert fields is not None
    protocol.encode_control("plan_offer", **fields)  # a valid frame
    key = server_public_key_text()

    payload = verify_offer(fields["authorization"], public_key=key, offer=fields, silo=silo.name)
    assert payload["plan_hash"] == plan.current_version.spec_hash
    with pytest.raises(AuthorizationError, match="not 'another-silo'"):
        verify_offer(fields["authorization"], public_key=key, offer=fields, silo="another-silo")
    altered = {**fields, "plan": {**fields["plan"], "rounds": 99}}
    with pytest.raises(AuthorizationError, match="hashes to"):
        verify_offer(fields["authorization"], public_key=key, offer=altered, silo=silo.name)
