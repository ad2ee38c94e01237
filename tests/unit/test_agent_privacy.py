"""The agent's differential privacy, privacy budget and the strategies that need the agent.

Sample-level DP (DP-SGD at the site) and its accounting: the mechanism the update reports is the
one the server's ledger recomputes (fedcore.privacy.accounting.plan_mechanism for the real
training rows, steps split over the rounds), the reported epsilon is the run's cumulative one,
and the sent log holds increments that add up to it. The site's caps are checked with the real
numbers before a round trains. FedProx and q-FedAvg need the agent's help (the proximal term,
the global model's training loss).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from websockets.asyncio.server import ServerConnection

from clientagent import trainer
from clientagent.config import load_config
from clientagent.connection import EXIT_OK, Agent
from clientagent.data import LocalData
from clientagent.records import epsilon_by_run
from clientagent.trainer import INVALID_TASK, TaskError, handle_stats_request, handle_task
from fedcore import models, protocol, tabular, tensors, training
from fedcore.plan import plan_hash
from fedcore.privacy import accounting
from tests.unit.test_agent_policy import NOWHERE
from tests.unit.test_agent_session import (
    PLAN,
    SCHEMA,
    WAIT,
    FakeServer,
    fast_heartbeats_and_info_logs,  # noqa: F401 - autouse fixture, applies here too
    grant,
    hello_welcome,
    make_agent,
    send_frames,
    stats_request,
    write_site,
)
from tests.unit.test_agent_trainer import PLAN as MLP_PLAN
from tests.unit.test_agent_trainer import make_task, write_data

pytestmark = pytest.mark.timeout(120)

SAMPLE = {"mode": "sample", "noise_multiplier": None, "target_epsilon": 2.0, "delta": 1e-5}
DP_PLAN = {**PLAN, "privacy": SAMPLE}
ROUNDS = PLAN["training"]["rounds"]  # 3
BATCH = PLAN["training"]["batch_size"]  # 16
EPOCHS = PLAN["training"]["local_epochs"]  # 1


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small models: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def site_agent(tmp_path: Path, policy: str = "") -> Agent:
    """An agent (never connected) welcomed as silo site-a; 120 rows, 96 of them for training."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    agent = Agent(load_config(write_site(tmp_path, NOWHERE, policy=policy)), progress_tty=False)
    agent.on_welcome({"silo": "site-a", "consortium": "thyroid"})
    return agent


def fitted_for(data: LocalData, plan: dict[str, Any]) -> dict[str, Any]:
    stats = handle_stats_request({"run": 5, "plan_hash": plan_hash(plan), "plan": plan}, data)
    return tabular.merge_statistics([stats["stats"]], tabular.DatasetSchema.from_dict(SCHEMA))


def task(
    fitted: dict[str, Any],
    plan: dict[str, Any],
    *,
    round_: int = 1,
    state: dict[str, torch.Tensor] | None = None,
    run: int = 5,
) -> protocol.BinaryMessage:
    """A signed task of run 5 for the session tests' schema (2 features)."""
    if state is None:
        n_features = len(tabular.feature_names(tabular.DatasetSchema.from_dict(SCHEMA), fitted))
        state = models.build_model(plan["model"], n_features, seed=3).state_dict()
    fields = {
        "run": run,
        "round": round_,
        "rounds": plan["training"]["rounds"],
        "plan_hash": plan_hash(plan),
        "plan": plan,
        "preprocessing": fitted,
        "deadline": time.time() + 60,
    }
    payload = tensors.encode_state_dict(state)
    fields["authorization"] = grant(
        plan, run=run, round=round_, weights=payload, preprocessing=fitted
    )
    return protocol.BinaryMessage("task", fields, payload)


def send(agent: Agent, update: protocol.BinaryMessage, privacy: Any) -> dict[str, Any]:
    """Log the update as Session.send_update does just before its frames leave."""
    return agent.record_sent(
        "update",
        update.fields,
        plan_hash=plan_hash(DP_PLAN),
        size=len(update.payload),
        sha=hashlib.sha256(update.payload).hexdigest(),
        privacy=privacy,
    )


def eps(z: float, q: float, steps: int, delta: float = 1e-5) -> float:
    return accounting.epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=delta)


# -- sample-level DP ----------------------------------------------------------------------------


def test_dp_rounds_report_the_plans_mechanism_and_the_runs_cumulative_epsilon(tmp_path):
    agent = site_agent(tmp_path)
    fitted = fitted_for(agent.data, DP_PLAN)
    rows = len(agent.data.split(DP_PLAN).train)
    z = accounting.plan_noise_multiplier(
        SAMPLE, rows=rows, batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS
    )
    q, steps = BATCH / rows, EPOCHS * math.ceil(rows / BATCH)
    # What the server's ledger computes (ledger.round_mechanism with rows=num_examples).
    whole = accounting.plan_mechanism(
        SAMPLE, rows=rows, batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS
    )
    assert whole == (z, q, steps * ROUNDS)

    state = None
    reports = []
    for rnd in range(1, ROUNDS + 1):
        if rnd == 3:  # a restart: the count of rounds sent comes back from the sent log
            agent = site_agent(tmp_path)
        update, privacy = agent.train(task(fitted, DP_PLAN, round_=rnd, state=state))
        send(agent, update, privacy)
        state = tensors.decode_state_dict(update.payload)  # the next global model
        reports.append(update.fields["privacy"])

        assert update.fields["num_examples"] == rows
        assert "global_train_loss" not in update.fields["metrics"]  # not released under DP
        assert set(update.fields["metrics"]) == {"global", "local", "train_loss"}

    for rnd, report in enumerate(reports, start=1):
        assert report == {
            "noise_multiplier": z,
            "sample_rate": q,
            "steps": steps,
            "epsilon": eps(z, q, steps * rnd),
        }
    assert reports[0]["epsilon"] < reports[1]["epsilon"] < reports[2]["epsilon"]
    # After all the plan's rounds the run has spent at most its target epsilon.
    assert reports[-1]["epsilon"] <= SAMPLE["target_epsilon"]
    assert reports[-1]["epsilon"] == pytest.approx(
        accounting.project_plan_epsilon(
            SAMPLE, rows=rows, batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS
        )
    )
    # The sent log holds increments: summed over the run, the last cumulative report.
    lines = agent.records.sent()
    assert [line["round"] for line in lines] == [1, 2, 3]
    assert lines[0]["epsilon"] == reports[0]["epsilon"]
    assert lines[1]["epsilon"] == pytest.approx(reports[1]["epsilon"] - reports[0]["epsilon"])
    assert epsilon_by_run(lines)[5] == pytest.approx(reports[-1]["epsilon"], rel=1e-12)


def test_a_resent_update_adds_nothing_to_the_sent_log(tmp_path):
    agent = site_agent(tmp_path)
    update, privacy = agent.train(task(fitted_for(agent.data, DP_PLAN), DP_PLAN))

    first = send(agent, update, privacy)
    again = send(agent, update, privacy)  # the same weights after a reconnect

    assert first["epsilon"] == update.fields["privacy"]["epsilon"] > 0
    assert again["epsilon"] == 0.0 and again["sha256"] == first["sha256"]
    assert epsilon_by_run(agent.records.sent())[5] == first["epsilon"]


async def test_dp_updates_over_the_websocket(tmp_path):
    """The privacy report and the logged increments through the real send path, with a re-send."""
    received: list[protocol.BinaryMessage] = []
    fitted: dict[str, Any] = {}

    async def first(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await ws.send(stats_request(DP_PLAN))
        stats = await server.expect(ws, "stats")
        fitted.update(
            tabular.merge_statistics([stats["stats"]], tabular.DatasetSchema.from_dict(SCHEMA))
        )
        frames = protocol.encode_binary(task(fitted, DP_PLAN), max_frame_bytes=2048)
        await send_frames(ws, frames)
        received.append(await server.recv_update(ws))
        await ws.close(1011, "server restarting")  # before the ack: the task comes again

    async def second(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await send_frames(ws, protocol.encode_binary(task(fitted, DP_PLAN), max_frame_bytes=2048))
        received.append(await server.recv_update(ws))
        await ws.send(protocol.encode_control("update_ack", run=5, round=1, status="accepted"))
        state = tensors.decode_state_dict(received[0].payload)
        await send_frames(ws, protocol.encode_binary(task(fitted, DP_PLAN, round_=2, state=state)))
        received.append(await server.recv_update(ws))
        await server.events.put(("done", None))

    server = FakeServer([first, second])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await server.next_event("done")
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()

    one, resent, two = received
    assert resent.payload == one.payload and resent.fields["privacy"] == one.fields["privacy"]
    z, q, steps = (one.fields["privacy"][k] for k in ("noise_multiplier", "sample_rate", "steps"))
    assert one.fields["privacy"]["epsilon"] == eps(z, q, steps)
    assert two.fields["privacy"]["epsilon"] == eps(z, q, 2 * steps)
    updates = [line for line in agent.records.sent() if line["type"] == "update"]
    assert [(line["round"], line["epsilon"] > 0) for line in updates] == [
        (1, True),
        (1, False),  # the re-send
        (2, True),
    ]
    assert sum(line["epsilon"] for line in updates) == pytest.approx(
        two.fields["privacy"]["epsilon"], rel=1e-12
    )


def test_a_model_opacus_cannot_train_privately_is_invalid_task(tmp_path, monkeypatch):
    agent = site_agent(tmp_path)
    fitted = fitted_for(agent.data, DP_PLAN)
    n_features = len(tabular.feature_names(tabular.DatasetSchema.from_dict(SCHEMA), fitted))

    def with_batch_norm(spec: Any, features: int, **options: Any) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(features), nn.Linear(features, 1))

    monkeypatch.setattr(trainer.models, "build_model", with_batch_norm)
    state = with_batch_norm(None, n_features).state_dict()

    with pytest.raises(TaskError) as info:
        agent.train(task(fitted, DP_PLAN, state=state))

    assert info.value.code == INVALID_TASK
    assert "cannot be trained with DP-SGD" in info.value.reason
    assert "BatchNorm" in info.value.reason


def test_client_mode_adds_no_local_noise_but_counts_the_plans_rounds(tmp_path, monkeypatch):
    client = {"mode": "client", "noise_multiplier": 1.5, "target_epsilon": None}
    # In client mode the server's strategy (here FedAdam) steps with the DP mean.
    fedadam = {"strategy": "fedadam"}
    plan = {**PLAN, "privacy": client, "aggregation": fedadam}
    agent = site_agent(tmp_path)
    dp_sgd = []
    monkeypatch.setattr(trainer, "_train_dp", lambda *args: dp_sgd.append(args))

    update, privacy = agent.train(task(fitted_for(agent.data, plan), plan))
    line = agent.record_sent(
        "update",
        update.fields,
        plan_hash=plan_hash(plan),
        size=1,
        sha=hashlib.sha256(update.payload).hexdigest(),
        privacy=privacy,
    )

    assert dp_sgd == []  # trained without DP-SGD: the server noises the aggregate
    assert "privacy" not in update.fields
    assert "global_train_loss" not in update.fields["metrics"]  # no un-noised release
    # One round of client-level DP: the sampled Gaussian mechanism (z, 1, 1) at this silo.
    assert privacy is not None and (privacy.noise_multiplier, privacy.steps) == (1.5, 1)
    assert line["epsilon"] == eps(1.5, 1.0, 1)


# -- the site's caps with the real numbers ------------------------------------------------------


class Observer:
    """Records whether training started."""

    def __init__(self) -> None:
        self.trained = False

    def started(self, *, rows: int, epochs: int, steps: int) -> None:
        self.trained = True

    def step(self, step: int, total: int) -> None:
        pass

    def finished(self, *, train_loss: float) -> None:
        pass


def test_the_total_cap_refuses_a_round_that_would_exceed_it(tmp_path):
    agent = site_agent(tmp_path, "max_epsilon_total = 2.5")
    agent.records.record_sent(
        type="update", run=3, round=1, plan_hash="0" * 64, size=1, sha256="0" * 64, epsilon=2.0
    )
    fitted = fitted_for(agent.data, DP_PLAN)
    observer = Observer()

    with pytest.raises(TaskError) as info:
        agent.train(task(fitted, DP_PLAN), observer=observer)

    error = info.value
    assert error.code == "policy_refused"
    rows = len(agent.data.split(DP_PLAN).train)
    z = accounting.plan_noise_multiplier(
        SAMPLE, rows=rows, batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS
    )
    increment = eps(z, BATCH / rows, math.ceil(rows / BATCH))
    expected = (
        f"round 1 would bring the privacy budget spent at this site to {2.0 + increment:.4g} "
        f"(2 spent so far + {increment:.4g} for this round"
    )
    assert expected in error.shared_reason, error.shared_reason
    assert "above max_epsilon_total 2.5" in error.shared_reason
    assert not observer.trained  # refused before training
    assert [line["run"] for line in agent.records.sent()] == [3]

    # With room for the round, it trains.
    roomy = site_agent(tmp_path / "roomy", f"max_epsilon_total = {2.0 + increment + 1e-6}")
    roomy.records.record_sent(
        type="update", run=3, round=1, plan_hash="0" * 64, size=1, sha256="0" * 64, epsilon=2.0
    )
    update, _ = roomy.train(task(fitted, DP_PLAN))
    assert update.fields["privacy"]["epsilon"] == pytest.approx(increment)


def test_the_per_plan_cap_uses_the_projection_for_the_real_rows(tmp_path):
    noise_only = {"mode": "sample", "noise_multiplier": 1.0, "target_epsilon": None}
    plan = {**PLAN, "privacy": noise_only}
    agent = site_agent(tmp_path, "max_epsilon_per_plan = 1.0")
    rows = len(agent.data.split(plan).train)
    projected = accounting.project_plan_epsilon(
        noise_only, rows=rows, batch_size=BATCH, local_epochs=EPOCHS, rounds=ROUNDS
    )
    assert projected > 1.0

    with pytest.raises(TaskError) as info:
        agent.train(task(fitted_for(agent.data, plan), plan))

    assert info.value.code == "policy_refused"
    assert (
        f"at this site the run would spend epsilon {projected:.4g} over 3 rounds"
        in info.value.shared_reason
    )
    assert "above max_epsilon_per_plan 1" in info.value.shared_reason
    assert f"computed for the {rows} local training rows" in info.value.reason


def test_rounds_beyond_the_plans_count_against_the_per_plan_cap(tmp_path):
    one_round = {**DP_PLAN, "training": {**PLAN["training"], "rounds": 1}}
    agent = site_agent(tmp_path, "max_epsilon_per_plan = 2.0")
    fitted = fitted_for(agent.data, one_round)
    update, privacy = agent.train(task(fitted, one_round))
    agent.record_sent(
        "update",
        update.fields,
        plan_hash=plan_hash(one_round),
        size=1,
        sha=hashlib.sha256(update.payload).hexdigest(),
        privacy=privacy,
    )

    # The round is tried again (a new attempt): a second release would exceed the target.
    with pytest.raises(TaskError) as info:
        agent.train(task(fitted, one_round))

    assert info.value.code == "policy_refused"
    assert "over 2 rounds" in info.value.shared_reason


# -- FedProx and q-FedAvg -----------------------------------------------------------------------


@pytest.fixture
def data(tmp_path) -> LocalData:
    return LocalData(write_data(tmp_path / "data.csv"))


def fedprox(mu: float) -> dict[str, Any]:
    return {**MLP_PLAN, "aggregation": {"strategy": "fedprox", "mu": mu}}


def distance(state: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((state[k] - other[k]).square().sum()) for k in state))


def test_fedprox_passes_mu_and_the_global_weights_to_training(data, monkeypatch):
    seen: dict[str, Any] = {}
    real = training.train_local

    def spy(*args: Any, **kwargs: Any) -> dict[str, Any]:
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer.training, "train_local", spy)
    plain = make_task(data)
    global_state = tensors.decode_state_dict(plain.payload)

    handle_task(make_task(data, plan=fedprox(0.5)), data)
    assert seen["prox_mu"] == 0.5
    assert sorted(seen["prox_reference"]) == sorted(global_state)
    for name, tensor in global_state.items():
        assert torch.equal(seen["prox_reference"][name], tensor)

    handle_task(plain, data)  # fedavg: no proximal term
    assert seen["prox_mu"] == 0.0 and seen["prox_reference"] is None

    # No mu in the plan: the server's default, 0.01.
    handle_task(make_task(data, plan={**MLP_PLAN, "aggregation": {"strategy": "fedprox"}}), data)
    assert seen["prox_mu"] == 0.01 and sorted(seen["prox_reference"]) == sorted(global_state)


def test_a_large_mu_keeps_the_model_near_the_global_weights(data):
    global_state = tensors.decode_state_dict(make_task(data).payload)

    def moved(plan: dict[str, Any]) -> float:
        update = handle_task(make_task(data, plan=plan), data)
        return distance(tensors.decode_state_dict(update.payload), global_state)

    free, held = moved(fedprox(0.0)), moved(fedprox(100.0))

    assert free == pytest.approx(moved(MLP_PLAN))  # mu = 0 is FedAvg's local training
    assert held < 0.25 * free


@pytest.mark.parametrize(
    ("aggregation", "privacy", "expected"),
    [
        ({"strategy": "fedprox", "mu": 0.1}, SAMPLE, "FedProx with DP-SGD is not supported"),
        ({"strategy": "fedprox", "mu": -1}, None, "aggregation.mu must be a number"),
        ({"strategy": "qfedavg", "lipschitz": 10}, SAMPLE, "q-FedAvg with DP-SGD is not"),
        ("fedavg", None, "plan aggregation must be an object"),
    ],
)
def test_unsupported_strategy_settings_are_invalid_task(data, aggregation, privacy, expected):
    plan = {**MLP_PLAN, "aggregation": aggregation}
    if privacy is not None:
        plan["privacy"] = privacy

    with pytest.raises(TaskError) as info:
        handle_task(make_task(data, plan=plan), data)

    assert info.value.code == INVALID_TASK
    assert expected in info.value.reason, info.value.reason


def test_global_train_loss_is_the_received_models_loss_on_the_train_split(data):
    plan = {**MLP_PLAN, "aggregation": {"strategy": "qfedavg", "q": 1, "lipschitz": 100}}
    sent = make_task(data, plan=plan)
    arrays = data.arrays(data.split(plan), sent.fields["preprocessing"])
    n_features = int(arrays.train.X.shape[1])
    model = models.build_model(plan["model"], n_features)
    model.load_state_dict(tensors.decode_state_dict(sent.payload))
    expected = training.evaluate(model, arrays.train.X, arrays.train.y)["loss"]

    metrics = handle_task(sent, data).fields["metrics"]

    assert metrics["global_train_loss"] == pytest.approx(expected)
    assert metrics["global_train_loss"] != pytest.approx(metrics["global"]["loss"])  # not test
    assert metrics["global_train_loss"] > metrics["train_loss"]  # before training, not after
