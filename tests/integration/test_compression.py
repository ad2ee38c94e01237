"""Compressed updates: plan validation, and the server's receipt through the real consumer."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from channels.db import database_sync_to_async
from django.core.exceptions import ValidationError

from fedcore import compression, protocol, tensors
from federation.models import AuditEvent, Round, Update
from federation.services.plans import plan_propose
from federation.storage import blob_store
from tests.factories import ConsortiumFactory, SiloFactory, plan_spec, running_round
from tests.governance_factories import Governed, governed_consortium
from tests.integration.test_agent_consumer import (
    connect,
    hello,
    receive_task,
    send_update,
    update_frames,
)

pytestmark = [pytest.mark.django_db(transaction=True)]

TOPK = {"method": "topk", "ratio": 0.5}


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


# ------------------------------------------------------------------------------ plan validation


@pytest.mark.parametrize(
    ("section", "extra", "field", "text"),
    [
        ({"method": "gzip"}, {}, "compression.method", "'gzip' is unknown"),
        ({"method": "topk"}, {}, "compression.ratio", "in (0, 1]"),
        ({"method": "topk", "ratio": 0}, {}, "compression.ratio", "in (0, 1]"),
        ({"method": "topk", "ratio": 2}, {}, "compression.ratio", "in (0, 1]"),
        ({"method": "float16", "ratio": 0.1}, {}, "compression.ratio", "topk only"),
        ({"method": "topk", "k": 3}, {}, "compression", "unknown key(s) 'k'"),
        (TOPK, {"secure_aggregation": True}, "compression", "secure aggregation"),
        ({"method": "int8"}, {"secure_aggregation": True}, "compression", "secure aggregation"),
    ],
)
def test_a_bad_compression_section_is_refused_naming_the_field(
    section: Any, extra: dict[str, Any], field: str, text: str
) -> None:
    g: Governed = governed_consortium(2)
    with pytest.raises(ValidationError) as exc:
        plan_propose(
            actor=g.scientists[0],
            consortium=g.consortium,
            name="compressed",
            description="",
            spec=plan_spec(compression=section, **extra),
            silos=g.silos,
        )
    errors = exc.value.message_dict
    key = f"spec.{field}"
    assert key in errors and text in " ".join(errors[key]), errors


def test_a_valid_compression_is_part_of_the_plan_and_its_hash() -> None:
    g: Governed = governed_consortium(2)
    hashes = set()
    for section in (None, {"method": "int8"}, TOPK, {"method": "topk", "ratio": 0.25}):
        spec = plan_spec() if section is None else plan_spec(compression=section)
        plan = plan_propose(
            actor=g.scientists[0],
            consortium=g.consortium,
            name=f"p{len(hashes)}",
            description="",
            spec=spec,
            silos=g.silos,
        )
        version = plan.versions.get()
        assert version.spec.get("compression") == section
        hashes.add(version.spec_hash)
    assert len(hashes) == 4


# ------------------------------------------------------------------------------ server receipt


@database_sync_to_async
def make_round(n_features: int = 3, **spec: Any) -> tuple[Round, str]:
    from federation.services.silos import silo_issue_token

    consortium = ConsortiumFactory()
    silo = SiloFactory(organization__consortium=consortium)
    return running_round([silo], n_features=n_features, **spec), silo_issue_token(silo=silo)


def trained(global_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    torch.manual_seed(5)
    return {n: t + 0.05 * torch.randn_like(t) for n, t in global_.items()}


def compressed_frames(
    wire: dict[str, torch.Tensor], run: int, method: str = "topk", **fields: Any
) -> list[bytes]:
    return update_frames(wire, run=run, round_=1, compression=method, **fields)


async def test_a_compressed_update_is_decoded_stored_dense_and_its_wire_bytes_recorded() -> None:
    # 300 features: on a 3-feature model the safetensors header outweighs any saving
    section = {"method": "topk", "ratio": 0.1}
    round_, token = await make_round(n_features=300, compression=section)
    comm = await connect(token)
    await hello(comm)
    global_ = tensors.decode_state_dict((await receive_task(comm)).payload)
    local = trained(global_)
    spec = compression.CompressionSpec.from_section(section)
    wire = compression.compress_update(local, global_, spec).tensors
    ack = await send_update(comm, compressed_frames(wire, round_.run_id))
    assert ack["type"] == "update_ack", ack
    update = await database_sync_to_async(Update.objects.get)(round=round_)
    stored = tensors.decode_state_dict(blob_store().get(update.blob_key))
    assert tensors.signature(stored) == tensors.signature(global_)  # full size
    expected = compression.decompress_update(wire, spec, global_)
    assert all(torch.equal(stored[n], expected[n]) for n in stored)
    assert update.compression == "topk"
    assert update.wire_bytes == len(tensors.encode_state_dict(wire))
    assert update.wire_bytes < update.size_bytes
    assert update.sha256 == tensors.sha256_hex(blob_store().get(update.blob_key))
    event = await database_sync_to_async(
        lambda: AuditEvent.objects.filter(action="update.accepted").latest("pk")
    )()
    assert event.data["compression"] == "topk"
    assert event.data["wire_sha256"] == tensors.sha256_hex(tensors.encode_state_dict(wire))
    await comm.disconnect()


def _bad_indices(wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    name = next(k for k in wire if k == "@indices")
    wire = dict(wire)
    wire[name] = torch.full_like(wire[name], 10**6)
    return wire


def _missing(wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in wire.items() if k != "@values"}


@pytest.mark.parametrize(
    ("mutate", "code", "text"),
    [
        (_bad_indices, "invalid_update", "outside"),
        (_missing, "incompatible_update", "missing"),
        (
            lambda w: {k: (v.double() if k == "@values" else v) for k, v in w.items()},
            "incompatible_update",
            "dtype float64",
        ),
        (
            lambda w: {k: (v * float("nan") if k == "@values" else v) for k, v in w.items()},
            "non_finite",
            "NaN or Inf",
        ),
    ],
    ids=["index-out-of-range", "missing-tensor", "wrong-dtype", "nan"],
)
async def test_a_malformed_compressed_update_is_refused_and_the_round_goes_on(
    mutate: Any, code: str, text: str
) -> None:
    round_, token = await make_round(compression=TOPK)
    comm = await connect(token)
    await hello(comm)
    global_ = tensors.decode_state_dict((await receive_task(comm)).payload)
    spec = compression.CompressionSpec.from_section(TOPK)
    wire = compression.compress_update(trained(global_), global_, spec).tensors

    error = await send_update(comm, compressed_frames(mutate(wire), round_.run_id))

    assert error["type"] == "error" and error["code"] == code and error["round"] == 1, error
    assert text in error["reason"]
    assert not await database_sync_to_async(Update.objects.filter(round=round_).exists)()
    refused = await database_sync_to_async(
        lambda: AuditEvent.objects.filter(action="update.refused").latest("pk")
    )()
    assert refused.data["code"] == code
    # the round is unharmed: the same silo's good update is accepted
    ack = await send_update(comm, compressed_frames(wire, round_.run_id))
    assert ack["type"] == "update_ack", ack
    await comm.disconnect()


async def test_compression_other_than_the_plans_is_refused() -> None:
    round_, token = await make_round()  # no compression in the plan
    comm = await connect(token)
    await hello(comm)
    global_ = tensors.decode_state_dict((await receive_task(comm)).payload)
    spec = compression.CompressionSpec("int8")
    wire = compression.compress_update(trained(global_), global_, spec).tensors
    error = await send_update(comm, compressed_frames(wire, round_.run_id, method="int8"))
    assert error["code"] == "invalid_update" and "plan's compression is 'none'" in error["reason"]
    # a dense update (an older agent, no "compression" field) is what the plan expects
    ack = await send_update(comm, update_frames(trained(global_), run=round_.run_id, round_=1))
    assert ack["type"] == "update_ack"
    await comm.disconnect()


async def test_a_dense_update_is_still_accepted_in_a_compressed_plan() -> None:
    round_, token = await make_round(compression=TOPK)
    comm = await connect(token)
    await hello(comm)
    global_ = tensors.decode_state_dict((await receive_task(comm)).payload)
    frames = update_frames(trained(global_), run=round_.run_id, round_=1)
    assert (await send_update(comm, frames))["type"] == "update_ack"
    update = await database_sync_to_async(Update.objects.get)(round=round_)
    assert update.compression == "" and update.wire_bytes == update.size_bytes
    await comm.disconnect()


def test_the_update_header_field_is_optional_and_a_string() -> None:
    fields = {"run": 1, "round": 1, "nonce": "a" * 32, "num_examples": 3, "metrics": {}}
    for extra in ({}, {"compression": "topk"}):
        message = protocol.BinaryMessage("update", {**fields, **extra}, b"x")
        received = protocol.Reassembler().feed(protocol.encode_binary(message)[0])
        assert received is not None and received.fields == message.fields
    with pytest.raises(protocol.InvalidField, match="compression"):
        protocol.encode_binary(protocol.BinaryMessage("update", {**fields, "compression": 8}, b""))
