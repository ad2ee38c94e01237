"""The agent websocket, driven with Channels' WebsocketCommunicator against the real consumer."""

from __future__ import annotations

import secrets
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import torch
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator

from config.asgi import application
from fedcore import protocol, signing, tensors
from fedcore.models import build_model
from federation.models import Round, RoundMetric, Silo, Update
from federation.services.silos import silo_issue_token
from federation.signing import server_public_key_text
from tests.factories import ConsortiumFactory, SiloFactory, approve_by_stewards, running_round

pytestmark = [pytest.mark.django_db(transaction=True)]


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    """Test the consumer alone: no in-process orchestration thread acting behind its back."""
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


@database_sync_to_async
def make_round(n_silos: int = 1) -> tuple[Round, list[tuple[Silo, str]]]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n_silos, organization__consortium=consortium)
    tokens = [(s, silo_issue_token(silo=s)) for s in silos]
    return running_round(silos), tokens


async def connect(token: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(
        application, "/ws/agent/", headers=[(b"authorization", f"Bearer {token}".encode())]
    )
    connected, _ = await comm.connect()
    assert connected
    return comm


async def hello(comm: WebsocketCommunicator) -> dict[str, Any]:
    await comm.send_to(text_data=protocol.encode_control("hello", agent_version="test"))
    return protocol.decode_control(await comm.receive_from(timeout=5))


async def receive_task(comm: WebsocketCommunicator) -> protocol.BinaryMessage:
    reassembler = protocol.Reassembler()
    while True:
        frame = await comm.receive_from(timeout=5)
        if isinstance(frame, str) and protocol.decode_control(frame)["type"] == "plan_offer":
            continue  # plans naming this silo are offered for local review first
        assert isinstance(frame, bytes), frame
        message = reassembler.feed(frame)
        if message is not None:
            return message


def update_frames(
    state: dict[str, torch.Tensor], *, run: int, round_: int, **fields: Any
) -> list[bytes]:
    message = protocol.BinaryMessage(
        type="update",
        fields={
            "run": run,
            "round": round_,
            "nonce": secrets.token_hex(16),
            "num_examples": 40,
            "metrics": {"train_loss": 0.5, "local": {"auc": 0.8, "accuracy": 0.7}},
            **fields,
        },
        payload=tensors.encode_state_dict(state),
    )
    return protocol.encode_binary(message, max_frame_bytes=600)  # several chunks


async def receive_control(comm: WebsocketCommunicator) -> dict[str, Any]:
    """The next control message, past any plan offers."""
    while True:
        message = protocol.decode_control(await comm.receive_from(timeout=5))
        if message["type"] != "plan_offer":
            return message


async def send_update(comm: WebsocketCommunicator, frames: list[bytes]) -> dict[str, Any]:
    for frame in frames:
        await comm.send_to(bytes_data=frame)
    return await receive_control(comm)


def good_state() -> dict[str, torch.Tensor]:
    return build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()


async def test_wrong_token_is_refused_with_auth_failed() -> None:
    await make_round()
    comm = await connect("not-a-token")
    error = protocol.decode_control(await comm.receive_from(timeout=5))
    assert error["type"] == "error" and error["code"] == "auth_failed"
    closed = await comm.receive_output(timeout=5)
    assert closed == {"type": "websocket.close", "code": 4401}


async def test_hello_gets_welcome_and_the_current_round_task() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    welcome = await hello(comm)
    assert welcome["type"] == "welcome" and welcome["silo"] == silo.name
    task = await receive_task(comm)
    assert task.type == "task" and task.fields["round"] == 1 and task.fields["run"] == round_.run_id
    state = tensors.decode_state_dict(task.payload)
    assert set(state) == {"linear.weight", "linear.bias"} or len(state) == 2
    silo_row = await database_sync_to_async(Silo.objects.get)(pk=silo.pk)
    assert silo_row.connection_id is not None and silo_row.last_heartbeat is not None
    await comm.disconnect()
    silo_row = await database_sync_to_async(Silo.objects.get)(pk=silo.pk)
    assert silo_row.connection_id is None


async def test_valid_update_is_accepted_and_stored() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    state = tensors.decode_state_dict(task.payload)
    ack = await send_update(comm, update_frames(state, run=round_.run_id, round_=1))
    assert ack == {
        "v": 1,
        "type": "update_ack",
        "run": round_.run_id,
        "round": 1,
        "status": "accepted",
    }
    update = await database_sync_to_async(Update.objects.get)(round=round_, silo=silo)
    assert update.num_examples == 40
    names = await database_sync_to_async(
        lambda: set(
            RoundMetric.objects.filter(round=round_, silo=silo).values_list("scope", "name")
        )
    )()
    assert names == {("train", "train_loss"), ("local", "auc"), ("local", "accuracy")}
    await comm.disconnect()


@pytest.mark.parametrize(
    ("mutate", "code"),
    [
        (lambda s: {**s, next(iter(s)): torch.zeros(7, 7)}, "incompatible_update"),
        (lambda s: {k: v.to(torch.float64) for k, v in s.items()}, "incompatible_update"),
        (lambda s: {k: torch.full_like(v, float("nan")) for k, v in s.items()}, "non_finite"),
        (lambda s: {**s, "extra": torch.zeros(1)}, "incompatible_update"),
    ],
    ids=["wrong-shape", "wrong-dtype", "nan", "extra-tensor"],
)
async def test_bad_update_gets_error_frame_and_round_is_unharmed(mutate: Any, code: str) -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    state = tensors.decode_state_dict(task.payload)
    error = await send_update(comm, update_frames(mutate(state), run=round_.run_id, round_=1))
    assert error["type"] == "error" and error["code"] == code, error
    assert error["round"] == 1
    assert not await database_sync_to_async(Update.objects.filter(round=round_).exists)()
    # The round goes on: a good update from the same silo is still accepted.
    ack = await send_update(comm, update_frames(state, run=round_.run_id, round_=1))
    assert ack["type"] == "update_ack"
    await comm.disconnect()


async def test_update_for_wrong_round_or_run_is_refused() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    await receive_task(comm)
    error = await send_update(comm, update_frames(good_state(), run=round_.run_id, round_=2))
    assert error["code"] == "wrong_round" and "current round is 1" in error["reason"]
    error = await send_update(comm, update_frames(good_state(), run=round_.run_id + 99, round_=1))
    assert error["code"] == "wrong_run"
    await comm.disconnect()


async def test_duplicate_update_and_replayed_nonce_are_refused() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    await receive_task(comm)
    frames = update_frames(good_state(), run=round_.run_id, round_=1)
    assert (await send_update(comm, frames))["type"] == "update_ack"
    error = await send_update(comm, frames)
    assert error["code"] == "duplicate_update"
    await comm.disconnect()


async def test_silo_not_selected_is_refused() -> None:
    round_, [(a, token_a), (b, token_b)] = await make_round(2)
    await database_sync_to_async(round_.selected.remove)(b)
    comm = await connect(token_b)
    await hello(comm)
    error = await send_update(comm, update_frames(good_state(), run=round_.run_id, round_=1))
    assert error["code"] == "not_selected"
    await comm.disconnect()


async def test_malformed_frames_get_typed_errors_and_connection_survives() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    await receive_task(comm)
    await comm.send_to(bytes_data=b"garbage that is not a frame")
    assert protocol.decode_control(await comm.receive_from(timeout=5))["code"] == "malformed"
    await comm.send_to(text_data="{not json")
    assert protocol.decode_control(await comm.receive_from(timeout=5))["code"] == "malformed"
    await comm.send_to(text_data='{"v": 99, "type": "heartbeat"}')
    assert (
        protocol.decode_control(await comm.receive_from(timeout=5))["code"] == "unsupported_version"
    )
    await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
    assert protocol.decode_control(await comm.receive_from(timeout=5))["type"] == "heartbeat_ack"
    await comm.disconnect()


async def test_messages_before_hello_are_refused() -> None:
    _, [(silo, token)] = await make_round()
    comm = await connect(token)
    await comm.send_to(text_data=protocol.encode_control("heartbeat", ts=1.0))
    error = protocol.decode_control(await comm.receive_from(timeout=5))
    assert error["code"] == "invalid_field" and "hello" in error["reason"]
    await comm.disconnect()


async def test_task_carries_a_grant_signed_for_exactly_this_silo_and_hash() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    key = await database_sync_to_async(server_public_key_text)()
    grant = task.fields["authorization"]
    # No steward approved this plan: the signature holds, but the agent must refuse it.
    with pytest.raises(signing.AuthorizationError, match="no data steward"):
        signing.verify_authorization(
            grant, public_key=key, plan=task.fields["plan"], silo=silo.name, run=round_.run_id
        )
    await comm.disconnect()

    plan = await database_sync_to_async(lambda: round_.run.plan)()
    await database_sync_to_async(approve_by_stewards)(plan)
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    grant = task.fields["authorization"]
    payload = signing.verify_authorization(
        grant, public_key=key, plan=task.fields["plan"], silo=silo.name, run=round_.run_id
    )
    assert payload["plan_hash"] == task.fields["plan_hash"] and payload["silo_approvals"]
    with pytest.raises(signing.AuthorizationError, match="not 'elsewhere'"):
        signing.verify_authorization(
            grant, public_key=key, plan=task.fields["plan"], silo="elsewhere", run=round_.run_id
        )
    tampered_plan = {**task.fields["plan"], "min_silos": 99}
    with pytest.raises(signing.AuthorizationError, match="hashes to"):
        signing.verify_authorization(
            grant, public_key=key, plan=tampered_plan, silo=silo.name, run=round_.run_id
        )
    other_key = signing.public_key_text(signing.generate_private_key())
    with pytest.raises(signing.AuthorizationError, match="does not verify"):
        signing.verify_authorization(
            grant, public_key=other_key, plan=task.fields["plan"], silo=silo.name, run=round_.run_id
        )
    await comm.disconnect()


async def test_task_grant_binds_its_round_weights_preprocessing_and_expiry() -> None:
    round_, [(silo, token)] = await make_round()
    plan = await database_sync_to_async(lambda: round_.run.plan)()
    await database_sync_to_async(approve_by_stewards)(plan)
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    await comm.disconnect()
    key = await database_sync_to_async(server_public_key_text)()
    grant = signing.verify_authorization(
        task.fields["authorization"],
        public_key=key,
        plan=task.fields["plan"],
        silo=silo.name,
        run=round_.run_id,
    )
    assert grant["kind"] == "task" and grant["round"] == task.fields["round"] == round_.number
    assert grant["attempt"] == round_.attempt and grant["rounds"] == task.fields["rounds"]
    assert grant["weights_sha256"] == tensors.sha256_hex(task.payload)
    assert grant["preprocessing_sha256"] == signing.sha256_canonical(task.fields["preprocessing"])
    expires = datetime.fromisoformat(grant["expires_at"])
    deadline = datetime.fromtimestamp(task.fields["deadline"], UTC)
    assert expires - deadline == timedelta(seconds=signing.TASK_EXPIRY_MARGIN_SECONDS)
    plan_rounds = task.fields["rounds"]
    # What the agent checks: the exact bytes received pass, changed ones do not.
    signing.check_request_scope(
        grant,
        kind="task",
        plan_rounds=plan_rounds,
        round=task.fields["round"],
        rounds=task.fields["rounds"],
        weights_sha256=tensors.sha256_hex(task.payload),
        preprocessing=task.fields["preprocessing"],
    )
    with pytest.raises(signing.AuthorizationError, match="global weights received hash to"):
        signing.check_request_scope(
            grant,
            kind="task",
            plan_rounds=plan_rounds,
            round=task.fields["round"],
            rounds=task.fields["rounds"],
            weights_sha256=tensors.sha256_hex(bytes(len(task.payload))),
            preprocessing=task.fields["preprocessing"],
        )


async def test_task_and_update_carry_the_stamps_that_time_their_transfer() -> None:
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    assert task.fields["sent_at"] <= time.time()  # the server's clock as it sent the task
    state = tensors.decode_state_dict(task.payload)
    sent_at = time.time() - 2.0  # as if the upload had taken two seconds
    ack = await send_update(
        comm, update_frames(state, run=round_.run_id, round_=1, sent_at=sent_at)
    )
    assert ack["type"] == "update_ack"
    update = await database_sync_to_async(Update.objects.get)(round=round_, silo=silo)
    upload = update.metrics["transfer"]["upload_seconds"]
    assert upload >= 2.0  # the server's clock at receipt minus the agent's sent_at
    assert update.metrics["train_loss"] == 0.5  # what the agent sent is kept as it was
    await comm.disconnect()


async def test_hello_records_the_announced_model_kinds_and_a_malformed_one_is_refused() -> None:
    _, [(silo, token)] = await make_round()
    kind = {"name": "resmlp", "version": "0.1.0", "sha256": "ab" * 32}
    comm = await connect(token)
    await comm.send_to(
        text_data=protocol.encode_control(
            "hello", agent_version="test", capabilities={"models": [kind]}
        )
    )
    assert protocol.decode_control(await comm.receive_from(timeout=5))["type"] == "welcome"
    assert (await database_sync_to_async(Silo.objects.get)(pk=silo.pk)).model_kinds == [kind]
    await comm.disconnect()

    comm = await connect(token)
    bad = {**kind, "sha256": "not-a-digest"}
    await comm.send_to(
        text_data=protocol.encode_control(
            "hello", agent_version="test", capabilities={"models": [bad]}
        )
    )
    error = protocol.decode_control(await comm.receive_from(timeout=5))
    assert error["type"] == "error" and error["code"] == "invalid_field"
    assert "capabilities.models[0].sha256 must be 64 lowercase hex digits" in error["reason"]
    assert await comm.receive_output(timeout=5) == {"type": "websocket.close", "code": 4400}
    # the refused hello registered nothing: the kinds announced before stay as they were
    assert (await database_sync_to_async(Silo.objects.get)(pk=silo.pk)).model_kinds == [kind]
