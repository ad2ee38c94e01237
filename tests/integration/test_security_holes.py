"""The smaller holes of issue 13, replayed against the agent websocket: a flood of error frames,
a JSON number out of range, a reason that forges a log line."""

from __future__ import annotations

import io
import logging
from typing import Any

import pytest
from channels.db import database_sync_to_async

from fedcore import protocol
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
