"""The agent's side of secure aggregation (clientagent.secagg_session), against a real
fedcore.secagg server: in-process, and through the real Agent over a websocket."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from websockets.asyncio.server import ServerConnection

from clientagent.secagg_session import SECAGG_ABORTED, SecAggSession
from fedcore import models, protocol, secure_updates, tabular, tensors
from fedcore.aggregation import ClientUpdate, make_strategy
from fedcore.secagg import (
    NotEnoughSurvivorsError,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
    session_id,
)
from fedcore.secagg import wire as secagg_wire
from fedcore.secagg.quantize import Quantizer
from tests.unit.test_agent_session import (
    PLAN,
    SCHEMA,
    FakeServer,
    hello_welcome,
    make_agent,
    send_frames,
    stats_round,
    task_frames,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)

NOW = 1000.0
RUN, ROUND = 5, 1


class Site:
    """A SecAggSession with its outgoing messages captured."""

    def __init__(self) -> None:
        self.controls: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.binaries: list[protocol.BinaryMessage] = []
        self.session = SecAggSession(
            send_control=self._control, send_error=self._error, send_masked=self._masked
        )

    async def _control(self, msg_type: str, **fields: Any) -> None:
        assert msg_type == "secagg"
        protocol.encode_control(msg_type, **fields)  # valid on the wire
        self.controls.append(fields)

    async def _error(self, fields: dict[str, Any], plan_hash: str | None) -> None:
        protocol.encode_control("error", **fields)
        self.errors.append(fields)

    async def _masked(self, message: protocol.BinaryMessage, plan_hash: str, _: Any) -> None:
        protocol.encode_binary(message)  # valid on the wire
        self.binaries.append(message)

    def reply(self) -> dict[str, Any]:
        """The last stage reply, as the server's coordinator reads it."""
        return secagg_wire.from_json(self.controls.pop()["payload"])


def request(stage_message: dict[str, Any], *, attempt: int = 1, client: int | None = None):
    fields = {
        "run": RUN,
        "round": ROUND,
        "attempt": attempt,
        "stage": stage_message["stage"],
        "payload": secagg_wire.to_json(stage_message),
    }
    if client is not None:
        fields["client"] = client
    protocol.encode_control("secagg", **fields)
    return fields


def global_state() -> dict[str, torch.Tensor]:
    return {
        "w": torch.linspace(-1, 1, 12).reshape(3, 4),
        "b": torch.zeros(3),
        "steps": torch.tensor(7),  # an integer buffer: not in the vector
    }


def task_and_update(
    local: dict[str, torch.Tensor], examples: int, plan: dict[str, Any] | None = None
) -> tuple[protocol.BinaryMessage, protocol.BinaryMessage]:
    plan = plan or {**PLAN, "secure_aggregation": True}
    task = protocol.BinaryMessage(
        "task",
        {"run": RUN, "round": ROUND, "plan": plan, "plan_hash": "ab" * 32},
        tensors.encode_state_dict(global_state()),
    )
    update = protocol.BinaryMessage(
        "update",
        {
            "run": RUN,
            "round": ROUND,
            "nonce": secrets.token_hex(16),
            "num_examples": examples,
            "metrics": {"train_loss": 0.3},
            "silo": "site",
        },
        tensors.encode_state_dict(local),
    )
    return task, update


def local_state(seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    g = global_state()
    return {
        "w": g["w"] + (torch.rand(3, 4, generator=gen) - 0.5) * scale,
        "b": g["b"] + (torch.rand(3, generator=gen) - 0.5) * scale,
        "steps": g["steps"] + seed,  # whatever a site reports, the server keeps the global's
    }


async def run_round(
    sites: list[Site],
    *,
    threshold: int,
    clip: float = 1.0,
    offers: list[tuple[Any, Any, Any]] | None = None,
    offer_after_masking_request: bool = False,
    counts: int = 0,
) -> SecAggServer:
    """Drive the four stages with a real SecAggServer, delivering as the consumer does."""
    config = SecAggConfig(
        f"{RUN}:{ROUND}:1",
        tuple(range(1, len(sites) + 1)),
        threshold,
        secure_updates.vector_length(global_state()) + counts,
        clip,
        count_length=counts,
    )
    server = SecAggServer(config, stage_timeout=60)
    if offers and not offer_after_masking_request:
        for site, offer in zip(sites, offers, strict=True):
            await site.session.offer(offer[0], offer[1], privacy=offer[2])
    messages = server.start(NOW)
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING):
        for cid, message in messages.items():
            site = sites[cid - 1]
            first = stage is Stage.ADVERTISE_KEYS
            await site.session.on_message(request(message, client=cid if first else None))
        if stage is Stage.MASKED_INPUT and offers and offer_after_masking_request:
            assert all(not site.binaries for site in sites)  # nothing before training ends
            for site, offer in zip(sites, offers, strict=True):
                await site.session.offer(offer[0], offer[1], privacy=offer[2])
        for cid in messages:
            site = sites[cid - 1]
            if stage is Stage.MASKED_INPUT:
                if not site.binaries:
                    continue
                masked = site.binaries[-1]
                server.collect(cid, {"stage": stage.value, "masked_vector": masked.payload}, NOW)
            elif site.controls:
                server.collect(cid, site.reply(), NOW)
        now = NOW if server.ready(NOW) else server.deadline
        messages = server.advance(now)
    return server


async def test_sites_send_only_masked_vectors_and_the_sum_gives_fedavg() -> None:
    sites = [Site() for _ in range(3)]
    examples = [30, 50, 120]
    locals_ = [local_state(i + 1) for i in range(3)]
    offers = [(*task_and_update(loc, n), None) for loc, n in zip(locals_, examples, strict=True)]

    server = await run_round(sites, threshold=2, offers=offers)

    weights = [
        secure_updates.example_weight(n, secure_updates.DEFAULT_MAX_EXAMPLES) for n in examples
    ]
    assert server.result[-1] == pytest.approx(sum(weights), abs=1e-7)
    mean = secure_updates.mean_state(server.result, global_state(), denominator=sum(weights))
    expected = make_strategy({"strategy": "fedavg"}).aggregate(
        global_state(),
        [ClientUpdate(state=s, weight=float(n)) for s, n in zip(locals_, examples, strict=True)],
        round=1,
    )
    for name in ("w", "b"):
        assert torch.allclose(mean[name], expected.state[name], atol=1e-5)
    assert mean["steps"] == global_state()["steps"]
    for site, n in zip(sites, examples, strict=True):
        [message] = site.binaries  # one binary message: the masked vector, never an update
        assert message.type == "masked_update"
        assert message.fields["num_examples"] == n and message.fields["attempt"] == 1
        assert message.fields["metrics"] == {"train_loss": 0.3} and message.fields["silo"] == "site"
        assert len(message.payload) == 4 * secure_updates.vector_length(global_state())
        assert not site.errors and site.session.active == []
    # The masked vectors look nothing like the quantised updates they hide.
    quantizer = Quantizer(1.0, 3)
    for site, loc, n in zip(sites, locals_, examples, strict=True):
        plain = quantizer.quantize(
            secure_updates.weighted_vector(
                loc, global_state(), num_examples=n, clip=1.0, max_examples=1_000_000
            ).vector
        )
        masked = np.frombuffer(site.binaries[0].payload, dtype="<u4")
        assert np.mean(masked == plain) < 0.2


async def test_fairness_counts_ride_masked_and_a_site_with_other_groups_drops_out() -> None:
    sites = [Site() for _ in range(3)]
    offers = [(*task_and_update(local_state(i + 1), 40), None) for i in range(3)]
    tables = [
        {"sex": {g: {"tp": i + 1, "fp": 2, "tn": 3 * i, "fn": 0} for g in ("F", "M")}}
        for i in range(3)
    ]
    tables[2]["sex"]["X"] = {"tp": 0, "fp": 0, "tn": 0, "fn": 0}  # another public group list
    for (_, update, _), table in zip(offers, tables, strict=True):
        update.fields["fairness"] = table

    server = await run_round(sites, threshold=2, offers=offers, counts=8)

    assert server.contributors == (1, 2)
    layout = secure_updates.count_layout({"sex": ["F", "M"]})
    merged = secure_updates.counts_from_tail(server.counts.tolist(), layout)
    assert merged["sex"]["M"] == {"tp": 1 + 2, "fp": 4, "tn": 0 + 3, "fn": 0}
    for site in sites[:2]:
        [message] = site.binaries
        assert "fairness" not in message.fields  # the tables never leave in clear
        assert len(message.payload) == 4 * (secure_updates.vector_length(global_state()) + 8)
    [error] = sites[2].errors
    assert error["code"] == SECAGG_ABORTED and "expects 8 fairness counts" in error["reason"]
    assert sites[2].binaries == []


async def test_the_masked_vector_waits_for_local_training_to_finish() -> None:
    sites = [Site() for _ in range(2)]
    offers = [(*task_and_update(local_state(i + 1), 40), None) for i in range(2)]

    server = await run_round(sites, threshold=2, offers=offers, offer_after_masking_request=True)

    assert server.stage is Stage.DONE and server.contributors == (1, 2)
    assert all(len(site.binaries) == 1 for site in sites)


async def test_a_site_with_nothing_trained_is_a_dropout_and_the_others_finish() -> None:
    sites = [Site() for _ in range(4)]
    offers = [(*task_and_update(local_state(i + 1), 40), None) for i in range(3)]
    for site, offer in zip(sites, offers, strict=False):  # the fourth never trains
        await site.session.offer(offer[0], offer[1], privacy=offer[2])

    server = await run_round(sites, threshold=3)

    assert server.contributors == (1, 2, 3)
    assert sites[3].binaries == [] and sites[3].session.active == [(RUN, ROUND, 1)]


async def test_a_threshold_below_a_majority_is_refused_and_the_client_aborted(caplog) -> None:
    site = Site()
    config = SecAggConfig(f"{RUN}:{ROUND}:1", (1, 2, 3, 4), 2, 16, 1.0)

    await site.session.on_message(request(config.to_message(), client=1))

    assert site.controls == []
    [error] = site.errors
    assert error["code"] == SECAGG_ABORTED and "strict majority" in error["reason"]
    assert (error["run"], error["round"]) == (RUN, ROUND)
    assert site.session.active == []


async def test_a_round_id_of_another_round_is_refused() -> None:
    site = Site()
    config = SecAggConfig("other:1:1", (1, 2), 2, 16, 1.0)

    await site.session.on_message(request(config.to_message(), client=1))

    assert site.errors and "round id" in site.errors[0]["reason"] and site.controls == []


async def test_a_request_for_an_attempt_without_keys_is_refused() -> None:
    site = Site()

    await site.session.on_message(
        request({"stage": "share_keys", "clients": [1, 2], "public_keys": []})
    )

    assert (
        site.errors[0]["code"] == SECAGG_ABORTED
        and "advertised no keys" in (site.errors[0]["reason"])
    )


async def test_an_unmasking_request_for_both_shares_of_a_site_is_refused() -> None:
    sites = [Site() for _ in range(3)]
    offers = [(*task_and_update(local_state(i + 1), 40), None) for i in range(3)]
    config = SecAggConfig(f"{RUN}:{ROUND}:1", (1, 2, 3), 2, 16, 1.0)
    server = SecAggServer(config, stage_timeout=60)
    for site, offer in zip(sites, offers, strict=True):
        await site.session.offer(offer[0], offer[1], privacy=None)
    messages = server.start(NOW)
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT):
        for cid, message in messages.items():
            await sites[cid - 1].session.on_message(
                request(message, client=cid if stage is Stage.ADVERTISE_KEYS else None)
            )
            if stage is Stage.MASKED_INPUT:
                masked = sites[cid - 1].binaries[-1].payload
                server.collect(cid, {"stage": stage.value, "masked_vector": masked}, NOW)
            else:
                server.collect(cid, sites[cid - 1].reply(), NOW)
        messages = server.advance(NOW)

    # A curious server asks site 1 for both shares of site 2: that would unmask site 2.
    await sites[0].session.on_message(
        request({"stage": "unmasking", "survivors": [1, 2, 3], "dropped": [2]})
    )

    assert sites[0].controls == []
    assert sites[0].errors[0]["code"] == SECAGG_ABORTED
    assert "refusing to reveal both" in sites[0].errors[0]["reason"]
    assert sites[0].session.active == []


async def test_closing_the_session_aborts_its_clients_and_ignores_later_requests() -> None:
    site = Site()
    config = SecAggConfig(f"{RUN}:{ROUND}:1", (1, 2), 2, 16, 1.0)
    await site.session.on_message(request(config.to_message(), client=1))
    client = site.session._attempts[(RUN, ROUND)].client
    assert client.stage is Stage.SHARE_KEYS

    site.session.close()

    assert client.stage is Stage.ABORTED and site.session.active == []
    await site.session.on_message(request(config.to_message(), client=1))
    assert site.session.active == [] and len(site.controls) == 1  # the first reply only


async def test_a_retried_attempt_replaces_the_old_client() -> None:
    site = Site()
    first = SecAggConfig(f"{RUN}:{ROUND}:1", (1, 2), 2, 16, 1.0)
    second = SecAggConfig(f"{RUN}:{ROUND}:2", (1, 2, 3), 2, 16, 1.0)
    await site.session.on_message(request(first.to_message(), client=1))
    old = site.session._attempts[(RUN, ROUND)].client

    await site.session.on_message(request(second.to_message(), attempt=2, client=3))

    assert old.stage is Stage.ABORTED
    assert site.session.active == [(RUN, ROUND, 2)] and len(site.controls) == 2
    # A stale request of the first attempt is refused.
    await site.session.on_message(request(first.to_message(), client=1))
    assert site.errors and "already started" in site.errors[0]["reason"]


async def test_an_analysis_step_session_runs_beside_the_rounds_of_its_run() -> None:
    site = Site()
    site.session.offer_analysis(RUN, "summary", [3, 4])
    step = SecAggConfig(session_id(RUN, 0, 1, "summary"), (1, 2), 2, 3, 1.0, count_length=2)
    advertise = {**request(step.to_message(), client=1), "round": 0, "step": "summary"}

    await site.session.on_message(advertise)

    client = site.session._attempts[(RUN, "summary")].client
    assert client.stage is Stage.SHARE_KEYS
    assert {k: site.controls[-1][k] for k in ("run", "round", "step", "attempt")} == {
        "run": RUN,
        "round": 0,
        "step": "summary",
        "attempt": 1,
    }
    # A later round of the run leaves the step's session alone.
    later = SecAggConfig(session_id(RUN, ROUND + 1, 1), (1, 2), 2, 16, 1.0)
    await site.session.on_message({**request(later.to_message(), client=2), "round": ROUND + 1})
    assert client.stage is Stage.SHARE_KEYS and site.session.active == [(RUN, ROUND + 1, 1)]
    # A replayed advertise-keys of the step is refused, and the step's client drops its secrets.
    await site.session.on_message(advertise)
    assert client.stage is Stage.ABORTED and (RUN, "summary") not in site.session._attempts
    error = site.errors[-1]
    assert error["code"] == SECAGG_ABORTED and "round" not in error
    assert error["reason"].startswith("secure aggregation of analysis step 'summary' aborted")
    assert "step 'summary' attempt 1 was already started" in error["reason"]


async def test_a_later_round_drops_what_was_kept_for_earlier_ones() -> None:
    site = Site()
    first = SecAggConfig(f"{RUN}:{ROUND}:1", (1, 2), 2, 16, 1.0)
    await site.session.on_message(request(first.to_message(), client=1))
    old = site.session._attempts[(RUN, ROUND)].client
    later = SecAggConfig(f"{RUN}:{ROUND + 1}:1", (1, 2), 2, 16, 1.0)
    fields = {**request(later.to_message(), client=2), "round": ROUND + 1}

    await site.session.on_message(fields)

    assert old.stage is Stage.ABORTED and site.session.active == [(RUN, ROUND + 1, 1)]
    site.session.forget_run(RUN)
    assert site.session.active == []


async def test_client_dp_sites_clip_and_add_noise_shares_the_server_never_adds() -> None:
    # Client-level DP with secure aggregation: each site clips its delta to L2 norm C and adds
    # N(0, (zC)^2 / t); the sum of m shares carries std zC sqrt(m / t).
    clip, z, threshold, m = 0.5, 2.0, 2, 3
    plan = {
        **PLAN,
        "secure_aggregation": True,
        "privacy": {"mode": "client", "noise_multiplier": z, "clip": clip, "delta": 1e-5},
    }
    big = {"w": torch.zeros(4000)}

    def dp_task(seed: int) -> tuple[Any, Any, Any]:
        local = {"w": torch.full((4000,), 0.05 * seed)}  # norm 3.2 * seed: clipped to 0.5
        task = protocol.BinaryMessage(
            "task",
            {"run": RUN, "round": ROUND, "plan": plan, "plan_hash": "ab" * 32},
            tensors.encode_state_dict(big),
        )
        update = protocol.BinaryMessage(
            "update",
            {"run": RUN, "round": ROUND, "nonce": "n", "num_examples": 10, "metrics": {}},
            tensors.encode_state_dict(local),
        )
        return task, update, SimpleNamespace(noise_multiplier=z)

    sites = [Site() for _ in range(m)]
    quantiser_clip = secure_updates.dp_quantiser_clip(clip, z, threshold)
    config = SecAggConfig(f"{RUN}:{ROUND}:1", (1, 2, 3), threshold, 4001, quantiser_clip)
    server = SecAggServer(config, stage_timeout=60)
    for i, site in enumerate(sites):
        task, update, privacy = dp_task(i + 1)
        await site.session.offer(task, update, privacy=privacy)
    messages = server.start(NOW)
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING):
        for cid, message in messages.items():
            site = sites[cid - 1]
            await site.session.on_message(
                request(message, client=cid if stage is Stage.ADVERTISE_KEYS else None)
            )
            if stage is Stage.MASKED_INPUT:
                payload = site.binaries[-1].payload
                server.collect(cid, {"stage": stage.value, "masked_vector": payload}, NOW)
            else:
                server.collect(cid, site.reply(), NOW)
        messages = server.advance(NOW)

    total = server.result
    assert total[-1] == pytest.approx(m * quantiser_clip, rel=1e-6)  # contributors, counted
    clipped_sum = m * clip / np.sqrt(4000)  # every delta is a constant vector, clipped to C
    noise = total[:-1] - clipped_sum
    assert abs(np.mean(noise)) < 0.1
    assert np.std(noise) == pytest.approx(z * clip * np.sqrt(m / threshold), rel=0.05)


async def test_client_dp_refuses_a_range_that_would_clip_its_noise() -> None:
    plan = {
        **PLAN,
        "secure_aggregation": True,
        "privacy": {"mode": "client", "noise_multiplier": 2.0, "clip": 0.5, "delta": 1e-5},
    }
    site, other = Site(), Site()
    task, update = task_and_update(local_state(1), 10, plan)
    await site.session.offer(task, update, privacy=SimpleNamespace(noise_multiplier=2.0))
    await other.session.offer(task, update, privacy=SimpleNamespace(noise_multiplier=2.0))

    with pytest.raises(NotEnoughSurvivorsError):  # both sites refused to mask
        await run_round([site, other], threshold=2, clip=0.5)

    assert site.errors and "would clip this site's noise" in site.errors[0]["reason"]
    assert site.binaries == []


# -- the real Agent over a websocket ----------------------------------------------------------


SECURE_PLAN = {**PLAN, "secure_aggregation": True}


async def test_the_agent_never_sends_a_secure_rounds_update_in_clear(tmp_path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="clientagent")
    received: list[protocol.BinaryMessage] = []

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        fitted = await stats_round(ws, server)
        schema = tabular.DatasetSchema.from_dict(SCHEMA)
        n_features = len(tabular.feature_names(schema, fitted))
        state = models.build_model(SECURE_PLAN["model"], n_features, seed=3).state_dict()
        p = secure_updates.vector_length(state)
        await send_frames(ws, task_frames(fitted, SECURE_PLAN))
        config = SecAggConfig("5:1:1", (1, 2), 2, p, 1.0)
        coordinator = SecAggServer(config, stage_timeout=60)
        other = SecAggClient(2)  # the other site, played here
        other_vector = np.full(p, 0.25)
        now = time.monotonic()
        messages = coordinator.start(now)
        for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT):
            await ws.send(
                protocol.encode_control(
                    "secagg",
                    **request(messages[1], client=1 if stage is Stage.ADVERTISE_KEYS else None),
                )
            )
            if stage is Stage.MASKED_INPUT:
                message = await server.recv_update(ws)  # the first binary message it sends
                received.append(message)
                coordinator.collect(
                    1, {"stage": stage.value, "masked_vector": bytes(message.payload)}, now
                )
                coordinator.collect(2, other.masked_input(messages[2], other_vector), now)
            else:
                reply = await server.expect(ws, "secagg")
                coordinator.collect(1, secagg_wire.from_json(reply["payload"]), now)
                coordinator.collect(
                    2,
                    other.advertise_keys(messages[2])
                    if stage is Stage.ADVERTISE_KEYS
                    else other.share_keys(messages[2]),
                    now,
                )
            messages = coordinator.advance(now)
        await ws.send(protocol.encode_control("update_ack", run=5, round=1, status="accepted"))
        await ws.send(protocol.encode_control("secagg", **request(messages[1])))
        reply = await server.expect(ws, "secagg")
        coordinator.collect(1, secagg_wire.from_json(reply["payload"]), now)
        coordinator.collect(2, other.unmask(messages[2]), now)
        coordinator.advance(now)
        await server.events.put(("result", coordinator.result))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    try:
        total = await server.next_event("result")
    finally:
        stop.set()
        await asyncio.wait_for(runner, 30)
        await server.stop()

    [message] = received
    assert message.type == "masked_update"
    assert set(message.fields) == {
        "run", "round", "attempt", "nonce", "num_examples", "metrics", "silo"
    }  # fmt: skip
    n = message.fields["num_examples"]
    agent_part = total - np.full(total.size, 0.25)
    assert agent_part[-1] == pytest.approx(n / secure_updates.DEFAULT_MAX_EXAMPLES, abs=1e-8)
    assert np.any(agent_part[:-1] != 0)  # the site's change of weights, weighted
    assert "sent the masked update" in caplog.text
    await wait_until(lambda: "secure aggregation done here" in caplog.text)
    sent = agent.records.sent()
    [line] = [r for r in sent if r["type"] == "update"]
    assert line["sha256"] == tensors.sha256_hex(message.payload)  # the masked bytes, logged
