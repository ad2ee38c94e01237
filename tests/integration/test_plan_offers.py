"""Plan offers reach connected agents as the plan changes, over the real agent websocket.

The services push ``plan.offer`` to the silo's channel group after commit (federation.dispatch);
the consumer builds and signs the offer. Checked with Channels' WebsocketCommunicator against
the real consumer, and the offers verified as an agent verifies them (fedcore.signing).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from config.asgi import application
from fedcore import protocol, signing
from federation import dispatch
from federation.models import Silo, TrainingPlan
from federation.services import plans as plan_services
from federation.services.silos import silo_issue_token
from federation.signing import server_public_key_text
from tests.factories import plan_spec
from tests.governance_factories import Governed, governed_consortium

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _server_loop(settings: Any) -> Any:
    """The embedded profile sends events on the server's loop: this test's loop is the server's.
    No orchestration thread acts behind the consumer's back."""
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False
    yield
    dispatch.embedded.loop = None


async def connect(silo: Silo) -> WebsocketCommunicator:
    token = await database_sync_to_async(silo_issue_token)(silo=silo)
    comm = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    connected, _ = await comm.connect()
    assert connected
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    welcome = protocol.decode_control(await comm.receive_from(timeout=5))
    assert welcome["type"] == "welcome"
    dispatch.embedded.loop = asyncio.get_running_loop()
    return comm


async def next_offer(comm: WebsocketCommunicator, silo: Silo) -> dict[str, Any]:
    """The next message, which must be a plan offer signed for this silo."""
    message = protocol.decode_control(await comm.receive_from(timeout=5))
    assert message["type"] == "plan_offer", message
    signing.verify_offer(
        message["authorization"],
        public_key=await database_sync_to_async(server_public_key_text)(),
        offer=message,
        silo=silo.name,
    )
    return message


def act(fn: Callable[..., Any], **kwargs: Any) -> Any:
    return database_sync_to_async(fn)(**kwargs)


async def test_a_connected_agent_is_offered_each_change_of_a_plan_at_once() -> None:
    g: Governed = await database_sync_to_async(governed_consortium)(3)
    first, second, third = g.silos
    comms = {silo.pk: await connect(silo) for silo in g.silos}
    for comm in comms.values():  # nothing to offer yet
        assert await comm.receive_nothing(timeout=0.1)

    plan = await act(
        plan_services.plan_propose,
        actor=g.scientists[0],
        consortium=g.consortium,
        name="Thyroid risk",
        description="",
        spec=plan_spec(),
        silos=[first, second],
    )
    v1 = plan.current_version
    for silo in (first, second):
        offer = await next_offer(comms[silo.pk], silo)
        assert (offer["name"], offer["version"], offer["status"]) == (
            "Thyroid risk",
            1,
            "submitted",
        )
        assert offer["plan_hash"] == v1.spec_hash and offer["plan"] == v1.spec
    assert await comms[third.pk].receive_nothing(timeout=0.1)  # not named by the plan

    # An edit: the old version's sites learn it is superseded, the new version's get its offer.
    v2 = await act(
        plan_services.plan_edit,
        actor=g.scientists[0],
        plan=plan,
        spec=plan_spec(seed=3),
        silos=[second, third],
    )
    old_first = await next_offer(comms[first.pk], first)
    assert (old_first["plan_hash"], old_first["status"]) == (v1.spec_hash, "superseded")
    old_second, new_second = [await next_offer(comms[second.pk], second) for _ in range(2)]
    assert (old_second["plan_hash"], old_second["status"]) == (v1.spec_hash, "superseded")
    assert (new_second["plan_hash"], new_second["version"]) == (v2.spec_hash, 2)
    new_third = await next_offer(comms[third.pk], third)
    assert (new_third["plan_hash"], new_third["status"]) == (v2.spec_hash, "submitted")

    # Fully approved, then withdrawn: the status follows.
    for steward in (g.stewards[1], g.stewards[2]):
        await act(plan_services.plan_approve, actor=steward, plan=plan, plan_hash=v2.spec_hash)
    for silo in (second, third):
        approved = await next_offer(comms[silo.pk], silo)
        assert (approved["plan_hash"], approved["status"]) == (v2.spec_hash, "approved")
    await act(plan_services.plan_withdraw, actor=g.scientists[0], plan=plan)
    for silo in (second, third):
        withdrawn = await next_offer(comms[silo.pk], silo)
        assert (withdrawn["plan_hash"], withdrawn["status"]) == (v2.spec_hash, "withdrawn")
    assert await comms[first.pk].receive_nothing(timeout=0.1)
    for comm in comms.values():
        await comm.disconnect()


async def test_a_draft_is_offered_when_submitted_and_a_rejection_updates_the_offer() -> None:
    g: Governed = await database_sync_to_async(governed_consortium)(2)
    silo = g.silos[0]
    comm = await connect(silo)

    plan = await act(
        plan_services.plan_propose,
        actor=g.scientists[0],
        consortium=g.consortium,
        name="Draft first",
        description="",
        spec=plan_spec(),
        silos=[silo],
        submit=False,
    )
    assert await comm.receive_nothing(timeout=0.1)  # a draft is not offered
    await act(plan_services.plan_submit, actor=g.scientists[0], plan=plan)
    offer = await next_offer(comm, silo)
    assert (offer["name"], offer["status"]) == ("Draft first", "submitted")

    await act(
        plan_services.plan_reject,
        actor=g.stewards[0],
        plan=plan,
        plan_hash=offer["plan_hash"],
        reason="not this year",
    )
    rejected = await next_offer(comm, silo)
    assert rejected["status"] == TrainingPlan.Status.REJECTED
    await comm.disconnect()
