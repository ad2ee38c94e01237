"""Secure rounds in one process: the real orchestrator, coordinator and consumer, and agents.

Each site is a WebsocketCommunicator on the real AgentConsumer driven by the agent's own
secure-aggregation code (clientagent.secagg_session) with a known "trained" model, so the
round's result can be checked against plain FedAvg. Orchestration steps and stage timers run on
the embedded backend's orchestration thread, as in the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from clientagent.secagg_session import SecAggSession
from config.asgi import application
from fedcore import evaluation, fairness, protocol, tensors
from fedcore.aggregation import ClientUpdate, make_strategy
from fedcore.models import build_model
from fedcore.secagg import Quantizer, SecAggServer
from federation import dispatch, ledger, orchestrator, secagg_rounds
from federation.models import (
    AuditEvent,
    FairnessReport,
    ModelVersion,
    PrivacyLedgerEntry,
    Round,
    Run,
    SecAggAttempt,
    Silo,
    Update,
)
from federation.services.rounds import _signature_json
from federation.services.silos import silo_issue_token
from federation.storage import blob_store, model_key
from tests.factories import (
    SCHEMA,
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    plan_spec,
    start_run,
)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]

WAIT = 15.0


@pytest.fixture(autouse=True)
def _orchestration_thread(settings: Any) -> Iterator[None]:
    """Steps and timers on the embedded orchestration thread; no sweeper behind the test."""
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False
    yield
    dispatch.embedded.loop = None


@pytest.fixture
def held_vectors(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, np.ndarray]]:
    """Everything any coordinator holds after each message it collects."""
    seen: list[dict[str, np.ndarray]] = []
    original = SecAggServer.collect

    def collect(self: SecAggServer, client_id: int, message: Any, now: float) -> None:
        try:
            original(self, client_id, message, now)
        finally:
            seen.append(self.stored_vectors())

    monkeypatch.setattr(SecAggServer, "collect", collect)
    return seen


def secure_run(silos: list[Silo], **spec: Any) -> Run:
    """A run in training whose model v0 is stored; the orchestrator opens round 1."""
    spec = plan_spec(secure_aggregation=True, **{"round_retries": 0, **spec})
    plan = PlanFactory(consortium=silos[0].consortium, spec=spec, silos=silos)
    run = start_run(plan, status=Run.Status.RUNNING, preprocessing={}, started_at=timezone.now())
    state = build_model(spec["model"], 3, seed=0).state_dict()
    data = tensors.encode_state_dict(state)
    key = model_key(run_id=run.pk, number=0)
    blob_store().put(key, data)
    ModelVersion.objects.create(
        run=run,
        number=0,
        checksum=tensors.sha256_hex(data),
        size_bytes=len(data),
        blob_key=key,
        signature=_signature_json(state),
    )
    return run


def trained(global_state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """What a site "trains": the global model moved by a seeded delta within [-0.3, 0.3]."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: value + (torch.rand(value.shape, generator=gen) - 0.5) * 0.6
        for name, value in global_state.items()
    }


class Site:
    """One agent: the real consumer on one side, clientagent.secagg_session on the other."""

    def __init__(
        self,
        silo: Silo,
        token: str,
        *,
        examples: int,
        train: bool = True,
        quit_after: str | None = None,
        fairness: dict[str, Any] | None = None,
    ) -> None:
        self.silo, self.token, self.examples = silo, token, examples
        self.fairness = fairness  # the count tables its trainer would have computed
        self.train, self.quit_after = train, quit_after
        self.comm: WebsocketCommunicator | None = None
        self.sent: list[str] = []  # types of the binary messages this site sent
        self.errors: list[dict[str, Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.locals: dict[int, dict[str, torch.Tensor]] = {}  # round -> trained weights
        self.quit = asyncio.Event()
        self.session = SecAggSession(
            send_control=self._send_control,
            send_error=self._send_error,
            send_masked=self._send_masked,
        )

    async def connect(self) -> None:
        self.comm = WebsocketCommunicator(
            application, "/ws/agent/", headers=[(b"authorization", f"Bearer {self.token}".encode())]
        )
        connected, _ = await self.comm.connect()
        assert connected
        await self.comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))

    async def _send_control(self, msg_type: str, **fields: Any) -> None:
        assert self.comm is not None
        await self.comm.send_to(text_data=protocol.encode_control(msg_type, **fields))
        if fields.get("stage") == self.quit_after:
            self.quit.set()

    async def _send_error(self, fields: dict[str, Any], plan_hash: str | None) -> None:
        assert self.comm is not None
        await self.comm.send_to(text_data=protocol.encode_control("error", **fields))

    async def _send_masked(self, message: protocol.BinaryMessage, plan_hash: str, _: Any) -> None:
        assert self.comm is not None
        for frame in protocol.encode_binary(message, max_frame_bytes=4096):
            await self.comm.send_to(bytes_data=frame)
        self.sent.append(message.type)

    async def serve(self) -> None:
        """Answer the server until told to quit (or, with quit_after, after that stage)."""
        assert self.comm is not None
        reassembler = protocol.Reassembler()
        while not self.quit.is_set():
            try:
                # Not receive_from(timeout=...): its timeout cancels the application.
                output = await asyncio.wait_for(self.comm.output_queue.get(), 0.05)
            except TimeoutError:
                continue
            if output["type"] == "websocket.close":
                break
            frame = output.get("text") or output.get("bytes")
            if isinstance(frame, bytes):
                message = reassembler.feed(frame)
                if message is not None and message.type == "task":
                    await self.on_task(message)
                elif message is not None and message.type == "evaluate":
                    await self.on_evaluate(message)
                continue
            fields = protocol.decode_control(frame)
            if fields["type"] == "secagg":
                await self.session.on_message(fields)
            elif fields["type"] == "error":
                self.errors.append(fields)
            elif fields["type"] == "update_ack":
                self.acks.append(fields)
        self.session.close()
        await self.comm.disconnect()

    async def on_evaluate(self, message: protocol.BinaryMessage) -> None:
        """The final evaluation: a histogram of made-up held-out scores (no group counts: a
        secure plan's only travel masked)."""
        if not self.train:
            return
        rng = np.random.default_rng(self.silo.pk)
        y = rng.integers(0, 2, size=20)
        histogram = evaluation.site_histogram(
            y, np.clip(0.3 + 0.4 * y + 0.1 * rng.random(20), 0, 1)
        )
        await self._send_control(
            "evaluation",
            run=message.fields["run"],
            model_version=message.fields["model_version"],
            evaluation=histogram.to_wire(),
        )

    async def on_task(self, task: protocol.BinaryMessage) -> None:
        if not self.train:
            return
        rnd = task.fields["round"]
        local = trained(tensors.decode_state_dict(task.payload), seed=self.silo.pk * 100 + rnd)
        self.locals[rnd] = local
        update = protocol.BinaryMessage(
            "update",
            {
                "run": task.fields["run"],
                "round": rnd,
                "nonce": secrets.token_hex(16),
                "num_examples": self.examples,
                "metrics": {"train_loss": 0.5, "local": {"auc": 0.7}},
            },
            tensors.encode_state_dict(local),
        )
        if self.fairness is not None:
            update.fields["fairness"] = self.fairness
        await self.session.offer(task, update, privacy=None)


async def run_sites(run: Run, sites: list[Site], *, until: str = "completed") -> Run:
    """Connect the sites, open the round and serve until the run ends."""
    dispatch.embedded.loop = asyncio.get_running_loop()
    for site in sites:
        await site.connect()
    serving = [asyncio.create_task(site.serve()) for site in sites]
    ids = [s.silo.pk for s in sites]
    online = database_sync_to_async(
        lambda: Silo.objects.filter(pk__in=ids, connection_id__isnull=False).count()
    )
    deadline = time.monotonic() + WAIT
    while await online() < len(sites):
        assert time.monotonic() < deadline, "sites did not come online"
        await asyncio.sleep(0.02)
    await database_sync_to_async(orchestrator.run_advance)(run.pk)
    refresh = database_sync_to_async(lambda: Run.objects.get(pk=run.pk))
    try:
        while (current := await refresh()).active:
            assert time.monotonic() < deadline, f"the run is still {current.status}"
            await asyncio.sleep(0.05)
    finally:
        for site in sites:
            site.quit.set()
        await asyncio.gather(*serving)
    assert current.status == until, current.error
    return current


def make_sites(n: int, **kwargs: Any) -> tuple[list[Silo], list[Site]]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n, organization__consortium=consortium)
    sites = [
        Site(silo, silo_issue_token(silo=silo), examples=40 + 30 * i, **kwargs.get(silo.name, {}))
        for i, silo in enumerate(silos)
    ]
    return silos, sites


def fedavg(
    global_state: dict[str, torch.Tensor], sites: list[Site], rnd: int
) -> dict[str, torch.Tensor]:
    updates = [
        ClientUpdate(state=s.locals[rnd], weight=float(s.examples)) for s in sites if s.train
    ]
    return make_strategy({"strategy": "fedavg"}).aggregate(global_state, updates, round=rnd).state


def model(run: Run, number: int) -> dict[str, torch.Tensor]:
    version = ModelVersion.objects.get(run=run, number=number)
    return tensors.decode_state_dict(blob_store().get(version.blob_key))


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def quantised_inputs(run: Run, sites: list[Site], rnd: int, n: int) -> list[np.ndarray]:
    """Each site's vector before masking, as the round's quantiser maps it."""
    from fedcore.secure_updates import weighted_vector

    global_state = model(run, rnd - 1)
    quantizer = Quantizer(1.0, n)
    return [
        quantizer.quantize(
            weighted_vector(
                s.locals[rnd],
                global_state,
                num_examples=s.examples,
                clip=1.0,
                max_examples=1_000_000,
            ).vector
        )
        for s in sites
        if rnd in s.locals
    ]


async def test_a_secure_round_gives_fedavg_and_stores_no_individual_update(
    held_vectors: list[dict[str, np.ndarray]],
) -> None:
    silos, sites = await database_sync_to_async(make_sites)(3)
    run = await database_sync_to_async(secure_run)(silos, min_silos=3)

    run = await run_sites(run, sites)

    @database_sync_to_async
    def check() -> None:
        rounds = list(Round.objects.filter(run=run).order_by("number"))
        assert [(r.number, r.attempt, r.status) for r in rounds] == [
            (1, 1, "completed"),
            (2, 1, "completed"),
        ]
        for rnd in (1, 2):
            expected = fedavg(model(run, rnd - 1), sites, rnd)
            # m * c * max_examples / (L * sum n): well below 1e-4 here
            assert max_difference(model(run, rnd), expected) < 1e-4
        # What the server stored: no update blob, rows without blob keys, masked audit events.
        stored = sorted(
            str(p.relative_to(blob_store().root)) for p in blob_store().root.rglob("*.*")
        )
        assert stored == [f"runs/{run.pk}/models/v{n}.safetensors" for n in (0, 1, 2)], stored
        updates = list(Update.objects.filter(round__run=run))
        assert len(updates) == 6 and all(u.blob_key == "" for u in updates)
        assert all(u.size_bytes == 4 * 5 for u in updates)  # 3 weights + bias + the weight
        accepted = AuditEvent.objects.filter(action="update.accepted", object_id=str(run.pk))
        assert accepted.count() == 6 and all(e.data["masked"] is True for e in accepted)
        assert not AuditEvent.objects.filter(action="update.refused").exists()
        # Round metrics still come from the clear metrics.
        assert rounds[0].metrics.filter(silo__isnull=True, name="train_loss").exists()
        # Every vector any coordinator ever held: the masked running sum, then the aggregate.
        inputs = [q for rnd in (1, 2) for q in quantised_inputs(run, sites, rnd, 3)]
        assert held_vectors
        for held in held_vectors:
            assert set(held) <= {"masked_sum", "aggregate", "result"}
            for vector in held.values():
                for individual in inputs:
                    assert not np.array_equal(vector.astype(np.uint32), individual)
        assert secagg_rounds.coordinator(rounds[0].pk) is None  # forgotten after aggregation

    await check()
    for site in sites:
        assert site.sent == ["masked_update", "masked_update"]  # never an "update"
        assert [a["round"] for a in site.acks] == [1, 2] and not site.errors
        assert site.session.active == []


async def test_a_site_dropping_after_sharing_keys_leaves_the_round_to_the_others() -> None:
    # 4 sites, threshold 3: the last shares its keys, then disconnects before masking. The
    # others masked with it, so the server reconstructs its key from their shares.
    silos, sites = await database_sync_to_async(make_sites)(4)
    sites[3].train, sites[3].quit_after = False, "share_keys"
    run = await database_sync_to_async(secure_run)(
        silos, min_silos=3, training={**plan_spec()["training"], "rounds": 1}
    )
    started = time.monotonic()

    run = await run_sites(run, sites)

    # The dropout was seen at once: no stage waited for its deadline (30 s / 60 s).
    assert time.monotonic() - started < 10

    @database_sync_to_async
    def check() -> None:
        contributors = set(Update.objects.filter(round__run=run).values_list("silo", flat=True))
        assert contributors == {s.silo.pk for s in sites[:3]}
        assert max_difference(model(run, 1), fedavg(model(run, 0), sites[:3], 1)) < 1e-4

    await check()


async def test_a_silent_site_is_a_dropout_once_the_stage_deadline_passes() -> None:
    silos, sites = await database_sync_to_async(make_sites)(3)
    sites[2].train = False  # keeps its connection and its keys, never sends a masked vector
    run = await database_sync_to_async(secure_run)(
        silos,
        min_silos=2,
        round_deadline_seconds=1.0,
        training={**plan_spec()["training"], "rounds": 1},
        secagg={"stage_timeout_seconds": 1.0},
    )

    run = await run_sites(run, sites)

    @database_sync_to_async
    def check() -> None:
        assert Update.objects.filter(round__run=run).count() == 2
        assert max_difference(model(run, 1), fedavg(model(run, 0), sites[:2], 1)) < 1e-4

    await check()


async def test_too_many_dropouts_fail_the_round_with_the_reason() -> None:
    # 3 sites, threshold 2: two leave after sharing keys, one masked vector cannot be unmasked.
    silos, sites = await database_sync_to_async(make_sites)(3)
    for site in sites[1:]:
        site.train, site.quit_after = False, "share_keys"
    run = await database_sync_to_async(secure_run)(silos, min_silos=1)

    run = await run_sites(run, sites, until="failed")

    assert "secure aggregation stopped at stage masked_input" in run.error
    assert "threshold needs 2" in run.error

    @database_sync_to_async
    def check() -> None:
        round_ = Round.objects.get(run=run)
        assert (
            round_.status == Round.Status.FAILED
            and not ModelVersion.objects.filter(run=run, number=1).exists()
        )
        assert secagg_rounds.coordinator(round_.pk) is None

    await check()


async def test_a_clear_update_in_a_secure_round_is_refused_and_not_stored() -> None:
    silos, sites = await database_sync_to_async(make_sites)(2)
    run = await database_sync_to_async(secure_run)(silos, min_silos=2)
    dispatch.embedded.loop = asyncio.get_running_loop()
    site = sites[0]
    await site.connect()
    assert site.comm is not None
    with contextlib.suppress(asyncio.TimeoutError):
        while True:  # welcome and plan offers (receive_from's timeout would end the app)
            await asyncio.wait_for(site.comm.output_queue.get(), 0.2)
    round_ = await database_sync_to_async(
        lambda: Round.objects.create(run=run, number=1, deadline=timezone.now())
    )()
    await database_sync_to_async(round_.selected.set)([site.silo])
    state = build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()
    message = protocol.BinaryMessage(
        "update",
        {
            "run": run.pk,
            "round": 1,
            "nonce": secrets.token_hex(16),
            "num_examples": 10,
            "metrics": {},
        },
        tensors.encode_state_dict(state),
    )
    for frame in protocol.encode_binary(message):
        await site.comm.send_to(bytes_data=frame)
    error = protocol.decode_control(await site.comm.receive_from(timeout=5))
    assert error["code"] == "invalid_update" and "secure aggregation" in error["reason"]
    assert not await database_sync_to_async(Update.objects.exists)()
    assert not (blob_store().root / f"runs/{run.pk}/rounds").exists()
    await site.comm.disconnect()


def site_counts(seed: int) -> dict[str, Any]:
    """A site's "sex" count table of the global model on its held-out rows."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 60))
    sex = rng.choice(["F", "M", "X"], size=n)  # "X" is outside the public list: "__other__"
    sex = np.where(np.isin(sex, ["F", "M"]), sex, fairness.OTHER_GROUP)
    y, y_pred = rng.integers(0, 2, size=n), rng.integers(0, 2, size=n)
    groups = ["F", "M", "__missing__", fairness.OTHER_GROUP]
    return {"sex": fairness.group_counts(y, y_pred, sex, groups=groups)}


@pytest.mark.parametrize("dp_epsilon", [None, 0.5])
async def test_fairness_counts_are_summed_under_the_masks_and_never_stored_per_site(
    held_vectors: list[dict[str, np.ndarray]], dp_epsilon: float | None
) -> None:
    silos, sites = await database_sync_to_async(make_sites)(3)
    for i, site in enumerate(sites):
        site.fairness = site_counts(seed=i)
    run = await database_sync_to_async(secure_run)(
        silos,
        min_silos=3,
        schema={**SCHEMA, "sensitive": ["sex"]},  # not a feature: its groups are declared
        fairness={
            "sensitive_attribute": "sex",
            "groups": {"sex": ["F", "M"]},
            **({} if dp_epsilon is None else {"dp_epsilon": dp_epsilon}),
        },
        training={**plan_spec()["training"], "rounds": 1},
    )

    run = await run_sites(run, sites)

    @database_sync_to_async
    def check() -> None:
        round_ = Round.objects.get(run=run)
        report = FairnessReport.objects.get(round=round_).report
        expected = fairness.merge_counts([site.fairness["sex"] for site in sites])
        assert report["attributes"]["sex"]["counts"] == expected
        assert report["attributes"]["sex"]["report"] == fairness.fairness_report(expected)
        assert report["secure"] is True
        # No site's own table: not on its update, not in the representation, not in the audit.
        assert report["attributes"]["sex"]["representation"]["by_silo"] == {}
        assert all(not u.fairness for u in Update.objects.filter(round=round_))
        events = AuditEvent.objects.filter(object_id=str(run.pk))
        assert not [e.action for e in events if {"fairness", "counts"} & set(e.data)]
        assert not SecAggAttempt.objects.exists()  # the attempt's row went with the round
        # A DP release costs each contributor what a clear one would: one table of epsilon.
        charged = PrivacyLedgerEntry.objects.filter(run=run, mechanism=ledger.PURE)
        if dp_epsilon is None:
            assert not charged.exists()
        else:
            assert sorted(e.silo_id for e in charged) == sorted(s.silo.pk for s in sites)
            assert all(e.epsilon_pure == pytest.approx(dp_epsilon) for e in charged)
        # The running sum held the 16 counts after the 5 model values: never one site's own.
        tables = [
            np.asarray(
                [
                    s.fairness["sex"][g][c]
                    for g in sorted(s.fairness["sex"])
                    for c in fairness.CELLS
                ],
                dtype=np.uint32,
            )
            for s in sites
        ]
        sums = [held["masked_sum"] for held in held_vectors if "masked_sum" in held]
        assert len(sums) >= 3
        for vector in sums:
            assert vector.size == 5 + 16  # 3 weights, the bias, the weight coordinate
            assert not any(np.array_equal(vector[-16:], own) for own in tables)

    await check()


def test_an_attempt_whose_state_is_gone_fails_with_the_reason_and_is_retried_afresh() -> None:
    # Two connected silos (no agents behind them: the requests go nowhere), round 1 opens; its
    # coordinator row disappears (as if deleted by hand); the next pass fails the attempt, audits
    # why and opens attempt 2 with a new coordinator: never plain aggregation.
    silos, _ = make_sites(2)
    Silo.objects.filter(pk__in=[s.pk for s in silos]).update(
        connection_id="gone", last_heartbeat=timezone.now()
    )
    run = secure_run(silos, min_silos=2, round_retries=1)
    orchestrator.run_advance(run.pk)
    first = Round.objects.get(run=run, number=1, attempt=1)
    row = SecAggAttempt.objects.get(round=first)
    assert row.params["round_id"] == f"{run.pk}:1:1" and row.vector is None
    first_id = row.params["round_id"]
    row.delete()

    orchestrator.run_advance(run.pk)

    first.refresh_from_db()
    assert first.status == Round.Status.FAILED
    assert first.error == "secure aggregation has no state for this attempt (it was lost)"
    aborted = AuditEvent.objects.get(action="secagg.aborted", object_id=str(run.pk))
    assert aborted.data == {"round": 1, "attempt": 1, "reason": first.error}
    retry = Round.objects.get(run=run, number=1, attempt=2)
    assert retry.status == Round.Status.COLLECTING
    assert SecAggAttempt.objects.get(round=retry).params["round_id"] == f"{run.pk}:1:2" != first_id
    assert not Update.objects.filter(round__run=run).exists()
