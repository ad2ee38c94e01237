"""An agent that vanishes while the server is still answering it is disconnected all the same.

Through the real server (uvicorn in this process) and a real socket: the agent says hello and
dies (its socket closes, as when its process is killed) while the server waits for the database
to register the hello. The welcome then has nowhere to go: uvicorn refuses the send
(ClientDisconnected). That used to end the consumer on the spot, without its disconnect
handler: the silo stayed "online" on a dead connection until the stale-heartbeat sweep (60 s),
and the services fault test waiting for it to go offline timed out under load.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest
from django.db import transaction
from websockets.sync.client import connect

from fedcore import protocol
from federation.models import Silo
from federation.server import ServerThread, free_port
from federation.services.silos import silo_issue_token
from tests.e2e.harness import wait_until
from tests.factories import SiloFactory

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    """The consumer alone: no in-process orchestration thread sweeping stale connections."""
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


@pytest.fixture
def server() -> Any:
    server = ServerThread("127.0.0.1", free_port())
    server.start()
    yield server
    server.stop()


def open_connections(server: ServerThread) -> int:
    """Connections uvicorn still holds (a lost one leaves the set when uvicorn notices)."""
    return len(server.server.server_state.connections)


def test_an_agent_gone_before_its_welcome_is_sent_is_disconnected(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="quorum.agent_ws")
    silo = SiloFactory()
    token = silo_issue_token(silo=silo)
    # SQLite's write lock, held by this test: the server's hello (silo_connect) waits for it.
    with transaction.atomic():
        Silo.objects.filter(pk=silo.pk).update(agent_version="held by the test")
        with connect(server.ws_url, additional_headers={"Authorization": f"Bearer {token}"}) as ws:
            ws.send(protocol.encode_control("hello", agent_version="test"))
            ws.socket.close()  # the agent dies: no closing handshake, the socket just goes
        deadline = time.monotonic() + 10
        while open_connections(server) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert open_connections(server) == 0, "uvicorn did not notice the closed socket"
    # The hello registers the connection now; its welcome goes to a connection known gone.
    wait_until(
        lambda: Silo.objects.get(pk=silo.pk).agent_version == "test",
        timeout=10,
        what="the hello to be registered",
        procs=[],
    )
    wait_until(
        lambda: f"silo {silo.name} disconnected" in caplog.text,
        timeout=10,
        what="the server to run its disconnect handler",
        procs=[],
    )
    assert Silo.objects.get(pk=silo.pk).connection_id is None  # not "online" on a dead socket
