"""/ws/live/: the dashboard's websocket forwards a member the events of their consortium's runs."""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.test import Client

from config.asgi import application
from federation import dispatch
from tests.dashboard_factories import finished_run
from tests.governance_factories import governed_consortium

pytestmark = [pytest.mark.django_db(transaction=True)]

ORIGIN = (b"origin", b"http://127.0.0.1:8000")


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    """The consumer alone: no in-process orchestration thread acting behind the test's back."""
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


@database_sync_to_async
def two_consortia() -> dict[str, Any]:
    mine, theirs = governed_consortium(2), governed_consortium(2)
    return {
        "user": mine.auditors[0],
        "my_run": finished_run(mine, rounds=1).pk,
        "their_run": finished_run(theirs, rounds=1).pk,
    }


@database_sync_to_async
def session_cookie(user: Any) -> bytes:
    client = Client()
    client.force_login(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def connect(*headers: tuple[bytes, bytes]) -> tuple[WebsocketCommunicator, bool, Any]:
    comm = WebsocketCommunicator(application, "/ws/live/", headers=list(headers))
    connected, code = await comm.connect(timeout=5)
    return comm, connected, code


async def publish(**event: Any) -> None:
    await get_channel_layer().group_send(dispatch.LIVE_GROUP, {"type": "live.event", **event})


async def test_a_member_receives_events_of_their_runs_only() -> None:
    data = await two_consortia()
    comm, connected, _ = await connect(ORIGIN, (b"cookie", await session_cookie(data["user"])))
    assert connected
    try:
        await publish(event="round.completed", run=data["their_run"], round=1)
        await publish(event="round.completed", run=data["my_run"], round=2, updates=2)
        received = await comm.receive_json_from(timeout=5)
        assert received == {
            "event": "round.completed",
            "run": data["my_run"],
            "round": 2,
            "updates": 2,
        }
        await publish(event="run.finished", run=999_999, status="completed")  # no such run
        await publish(event="run.finished", run="1; drop", status="completed")  # not an id
        assert await comm.receive_nothing(timeout=0.3)
    finally:
        await comm.disconnect()


async def test_a_ping_gets_a_pong() -> None:
    data = await two_consortia()
    comm, connected, _ = await connect(ORIGIN, (b"cookie", await session_cookie(data["user"])))
    assert connected
    await comm.send_json_to({"type": "ping"})
    assert await comm.receive_json_from(timeout=5) == {"type": "pong"}
    await comm.disconnect()


async def test_anonymous_connections_are_refused() -> None:
    comm, connected, code = await connect(ORIGIN)
    assert not connected and code == 4401


async def test_a_page_of_another_site_cannot_open_the_socket_in_the_users_name() -> None:
    data = await two_consortia()
    cookie = (b"cookie", await session_cookie(data["user"]))
    comm, connected, _ = await connect((b"origin", b"https://evil.example"), cookie)
    assert not connected


async def test_removing_a_member_stops_their_events_at_once() -> None:
    data = await two_consortia()
    comm, connected, _ = await connect(ORIGIN, (b"cookie", await session_cookie(data["user"])))
    assert connected
    await database_sync_to_async(lambda: data["user"].memberships.all().delete())()
    await publish(event="round.opened", run=data["my_run"], round=2)
    assert await comm.receive_nothing(timeout=0.3)
    await comm.disconnect()
