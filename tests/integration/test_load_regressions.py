"""What bench/load.py found: per-silo work the server must not repeat as silos add up."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from config.asgi import application
from fedcore import protocol
from federation import dispatch, selectors
from federation.models import Silo
from federation.services.silos import silo_issue_token
from tests.factories import ConsortiumFactory, SiloFactory, running_round

pytestmark = [pytest.mark.django_db(transaction=True)]

LONG_AGO = timezone.now() - timedelta(days=1)


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


@database_sync_to_async
def silos_with_tokens(n: int) -> list[tuple[Silo, str]]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n, organization__consortium=consortium)
    return [(s, silo_issue_token(silo=s)) for s in silos]


async def connected(token: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    ok, _ = await comm.connect()
    assert ok
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    assert protocol.decode_control(await comm.receive_from(timeout=5))["type"] == "welcome"
    return comm


async def test_heartbeats_of_many_silos_are_one_database_job(monkeypatch: Any) -> None:
    """Every heartbeat is acknowledged at once; the database records them in one batch."""
    jobs: list[dict[int, str]] = []
    real = dispatch.steps.function(dispatch.SILO_HEARTBEATS)
    monkeypatch.setitem(
        dispatch.steps.functions,
        dispatch.SILO_HEARTBEATS,
        lambda *, beats: (jobs.append(beats), real(beats=beats)),
    )
    pairs = await silos_with_tokens(4)
    comms = [await connected(token) for _, token in pairs]
    ids = [silo.pk for silo, _ in pairs]
    await database_sync_to_async(
        lambda: Silo.objects.filter(pk__in=ids).update(last_heartbeat=LONG_AGO)
    )()
    await dispatch.heartbeats.flush()  # nothing pending from the hellos' side
    jobs.clear()

    for _ in range(3):
        for comm in comms:
            await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
            reply = protocol.decode_control(await comm.receive_from(timeout=5))
            assert reply["type"] == "heartbeat_ack"
    await dispatch.heartbeats.flush()

    assert len(jobs) == 1 and sorted(jobs[0]) == sorted(ids)
    beats = await database_sync_to_async(
        lambda: list(Silo.objects.filter(pk__in=ids).values_list("last_heartbeat", flat=True))
    )()
    assert all(beat > LONG_AGO for beat in beats)
    for comm in comms:
        await comm.disconnect()


async def test_a_replaced_connections_heartbeat_does_not_mark_the_silo_alive() -> None:
    """A batched heartbeat still names its connection: a replaced one changes nothing."""
    [(silo, token)] = await silos_with_tokens(1)
    comm = await connected(token)
    await database_sync_to_async(
        lambda: Silo.objects.filter(pk=silo.pk).update(
            connection_id="specific.newer", last_heartbeat=LONG_AGO
        )
    )()
    dispatch.heartbeats.record(silo.pk, "specific.older")
    await dispatch.heartbeats.flush()
    row = await database_sync_to_async(lambda: Silo.objects.get(pk=silo.pk))()
    assert row.last_heartbeat == LONG_AGO and row.connection_id == "specific.newer"
    await comm.disconnect()


def test_a_rounds_model_is_read_from_storage_once_for_all_its_silos(monkeypatch: Any) -> None:
    """200 selected silos used to mean 200 reads of the same model blob."""
    silos = SiloFactory.create_batch(6, organization__consortium=ConsortiumFactory())
    round_ = running_round(silos)
    reads: list[str] = []
    store = selectors.blob_store()

    class Counting:
        def get(self, key: str) -> bytes:
            reads.append(key)
            return store.get(key)

    monkeypatch.setattr(selectors, "blob_store", Counting)
    selectors._MODEL_CACHE.clear()

    messages = [selectors.task_message(round_id=round_.pk, silo_id=s.pk) for s in silos]

    assert all(m is not None for m in messages)
    assert len({m.payload for m in messages if m is not None}) == 1
    assert len(reads) == 1
