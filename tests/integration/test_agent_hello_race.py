"""Work sent to a silo while its agent's hello is being registered reaches the agent.

The orchestrator sends a silo its work (a stats request, a round's task) through the silo's
channel-layer group as soon as the silo looks online. The consumer used to register the
connection (the silo looks online from that commit) and join the group afterwards: an event sent
in between reached no one, and the hello's list of pending work had been read before it. The
run then waited for that silo until its deadline (60 s by default): under load, the browser
test's monitor saw no round within 90 s.

The race is made certain with a channel layer (Channels' own in-memory layer) that lets the
orchestrator act just before the consumer joins its silo's group: a round opens for the silo
and its task goes out to the group.
"""

from __future__ import annotations

from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.layers import InMemoryChannelLayer
from channels.testing import WebsocketCommunicator

from config.asgi import application
from fedcore import protocol
from federation import dispatch
from federation.models import Round, Silo
from federation.services.silos import silo_issue_token
from tests.factories import SiloFactory, running_round
from tests.integration.test_agent_consumer import receive_task

pytestmark = [pytest.mark.django_db(transaction=True)]


class OrchestratorActsBeforeJoin(InMemoryChannelLayer):
    """The in-memory layer, but a round opens for a silo right before its group gets a member."""

    opened: list[int] = []

    async def group_add(self, group: str, channel: str) -> None:
        silo_id = int(group.removeprefix("silo-")) if group.startswith("silo-") else None
        if silo_id is not None and not self.opened:
            round_ = await database_sync_to_async(_open_round)(silo_id)
            self.opened.append(round_.pk)
            await self.group_send(group, {"type": "round.task", "round_id": round_.pk})
        await super().group_add(group, channel)


def _open_round(silo_id: int) -> Round:
    return running_round([Silo.objects.get(pk=silo_id)])


@pytest.fixture(autouse=True)
def _racing_layer(settings: Any) -> None:
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False  # the layer plays the orchestrator
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": f"{__name__}.OrchestratorActsBeforeJoin"}
    }  # Channels rebuilds its layers on this change (setting_changed)
    OrchestratorActsBeforeJoin.opened = []


async def test_a_round_opened_while_the_hello_is_registered_sends_its_task() -> None:
    silo, token = await database_sync_to_async(_silo_and_token)()
    comm = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    connected, _ = await comm.connect()
    assert connected
    try:
        await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
        welcome = protocol.decode_control(await comm.receive_from(timeout=5))
        assert welcome["type"] == "welcome"
        task = await receive_task(comm)  # plan offers are skipped; none came before: timeout
        assert OrchestratorActsBeforeJoin.opened, "the round did not open during the hello"
        assert task.type == "task"
        round_ = await database_sync_to_async(Round.objects.get)(
            pk=OrchestratorActsBeforeJoin.opened[0]
        )
        assert (task.fields["run"], task.fields["round"]) == (round_.run_id, round_.number)
        assert dispatch.silo_group(silo.pk) == f"silo-{silo.pk}"
    finally:
        await comm.disconnect()


def _silo_and_token() -> tuple[Silo, str]:
    silo = SiloFactory()
    return silo, silo_issue_token(silo=silo)
