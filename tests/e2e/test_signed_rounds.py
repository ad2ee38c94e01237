"""End to end, issue 13's network attack: a proxy between real agents and the real server (plain
ws:// on loopback) changes each site's first task after the server signed it -- global weights
zeroed, a preprocessing mean moved, the round renumbered to 99. Every agent refuses before it
trains, logs why, reports the refusal, and the server audits it; no update arrives."""

from __future__ import annotations

import asyncio
import copy
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve

from clientagent.connection import MAX_WS_MESSAGE_BYTES
from fedcore import protocol, tensors
from federation.models import AuditEvent, Round, Run, Update
from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.e2e import harness
from tests.e2e.test_federation import online_count, write_site_csv
from tests.factories import (
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
    start_run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Tamper = Callable[[protocol.BinaryMessage], protocol.BinaryMessage]


def zero_weights(task: protocol.BinaryMessage) -> protocol.BinaryMessage:
    state = tensors.decode_state_dict(bytes(task.payload))
    zeros = {name: value * 0 for name, value in state.items()}
    return protocol.BinaryMessage(task.type, task.fields, tensors.encode_state_dict(zeros))


def move_a_mean(task: protocol.BinaryMessage) -> protocol.BinaryMessage:
    fields = copy.deepcopy(task.fields)
    column = next(iter(fields["preprocessing"]["numeric"].values()))
    column["mean"] = column["mean"] + 1000.0
    return protocol.BinaryMessage(task.type, fields, task.payload)


def renumber(task: protocol.BinaryMessage) -> protocol.BinaryMessage:
    return protocol.BinaryMessage(task.type, {**task.fields, "round": 99}, task.payload)


class MitmProxy:
    """A websocket proxy on 127.0.0.1 in its own thread; each agent's tasks (by its token) go
    through that agent's tamper function."""

    def __init__(self, backend: str, tampers: dict[str, Tamper]):
        self.backend = backend
        self.tampers = tampers
        self.tampered: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/agent/"

    def start(self) -> MitmProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(self._serve())
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _serve(self) -> Server:
        return await serve(
            self._handle, "127.0.0.1", 0, max_size=MAX_WS_MESSAGE_BYTES, compression=None
        )

    async def _handle(self, agent: ServerConnection) -> None:
        authorization = agent.request.headers["Authorization"]
        tamper = self.tampers[authorization.removeprefix("Bearer ")]
        async with connect(
            self.backend,
            additional_headers={"Authorization": authorization},
            max_size=MAX_WS_MESSAGE_BYTES,
            compression=None,
        ) as server:

            async def up() -> None:
                async for message in agent:
                    await server.send(message)

            async def down() -> None:
                reassembler = protocol.Reassembler()
                async for message in server:
                    if isinstance(message, str):
                        await agent.send(message)
                        continue
                    task = reassembler.feed(message)
                    if task is None:
                        continue
                    if task.type == "task":
                        task = tamper(task)
                        self.tampered.append(tamper.__name__)
                    for frame in protocol.encode_binary(task):
                        await agent.send(frame)

            pumps = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)


ATTACKS: list[tuple[Tamper, str]] = [
    (zero_weights, "the global weights received hash to"),
    (move_a_mean, "the preprocessing received hashes to"),
    (renumber, "the task says round 99, but the authorization is for round 1"),
]


def test_tasks_changed_in_transit_are_refused_logged_and_audited(tmp_path: Path) -> None:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(len(ATTACKS), organization__consortium=consortium)
    plan = PlanFactory(consortium=consortium, spec=plan_spec(min_silos=len(ATTACKS)), silos=silos)
    approve_by_stewards(plan)
    port = free_port()
    server = harness.server(tmp_path, port)
    tampers: dict[str, Tamper] = {}
    proxy = MitmProxy(f"ws://127.0.0.1:{port}/ws/agent/", tampers).start()
    agents: list[harness.Proc] = []
    for i, (silo, (tamper, _)) in enumerate(zip(silos, ATTACKS, strict=True)):
        token = silo_issue_token(silo=silo)
        tampers[token] = tamper
        csv = write_site_csv(tmp_path / f"{silo.name}.csv", seed=i)
        agents.append(harness.agent(tmp_path, silo.name, url=proxy.url, token=token, data_csv=csv))
    procs = [server, *agents]
    try:
        server.start()
        harness.wait_until(
            lambda: harness.port_open(port), timeout=60, what="the server", procs=procs
        )
        for agent in agents:
            agent.start()
        harness.wait_until(
            lambda: online_count(silos) == len(silos),
            timeout=120,
            what="agents online",
            procs=procs,
        )
        run = start_run(plan)
        refusals = AuditEvent.objects.filter(action="agent.refused", object_id=run.pk)
        harness.wait_until(
            lambda: refusals.count() >= len(ATTACKS),
            timeout=120,
            what="every agent to refuse its tampered task",
            procs=procs,
        )
        by_silo = {event.actor.removeprefix("silo:"): event.data for event in refusals}
        for silo, agent, (_, reason) in zip(silos, agents, ATTACKS, strict=True):
            audited = by_silo[silo.name]
            assert audited["code"] == "not_authorized" and audited["round"] in (1, 99)
            assert reason in audited["reason"], audited
            log = agent.log.read_text()
            assert "ERROR" in log and reason in log and "refused before reading any local" in log
            assert "sent update" not in log
        assert not Update.objects.filter(round__run=run).exists()
        assert Round.objects.filter(run=run, number=1).exists()
        assert Run.objects.get(pk=run.pk).status in (Run.Status.RUNNING, Run.Status.FAILED)
    finally:
        harness.stop_all(procs)
        proxy.stop()
