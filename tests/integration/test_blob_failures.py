"""A blob write that fails (disk full, I/O error) refuses the update and leaves nothing behind."""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async
from django.conf import settings

from fedcore import tensors
from fedcore.models import build_model
from federation import storage
from federation.models import AuditEvent, Round, RoundMetric, Update
from federation.services.updates import Refused, update_receive
from federation.storage import BlobStoreError, FilesystemBlobStore, update_key
from tests.factories import ConsortiumFactory, SiloFactory, running_round
from tests.integration.test_agent_consumer import (
    connect,
    hello,
    make_round,
    receive_task,
    send_update,
    update_frames,
)

pytestmark = pytest.mark.django_db


def _disk_full(*_: Any, **__: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


FAILURES = {"fsync": (os, "fsync"), "rename": (os, "replace")}


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.mark.parametrize("step", sorted(FAILURES))
def test_a_failed_write_leaves_neither_the_blob_nor_a_temporary_file(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put("runs/1/models/v0.safetensors", b"old")
    monkeypatch.setattr(*FAILURES[step], _disk_full)
    with pytest.raises(BlobStoreError, match="No space left"):
        store.put("runs/1/models/v0.safetensors", b"new")
    with pytest.raises(BlobStoreError, match="No space left"):
        store.put("runs/1/models/v1.safetensors", b"new")
    monkeypatch.undo()
    assert files_under(tmp_path / "blobs") == [tmp_path / "blobs/runs/1/models/v0.safetensors"]
    assert store.get("runs/1/models/v0.safetensors") == b"old"  # the previous version intact


@pytest.mark.parametrize("step", sorted(FAILURES))
def test_an_update_whose_blob_cannot_be_written_is_refused_and_nothing_is_recorded(
    step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    consortium = ConsortiumFactory()
    silo = SiloFactory(organization__consortium=consortium)
    round_ = running_round([silo])
    state = build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()
    fields = {
        "run": round_.run_id,
        "round": 1,
        "nonce": secrets.token_hex(16),
        "num_examples": 40,
        "metrics": {"train_loss": 0.4, "local": {"auc": 0.8}},
    }
    payload = tensors.encode_state_dict(state)
    blobs = Path(settings.QUORUM_BLOB_DIR)
    before = files_under(blobs)

    monkeypatch.setattr(*FAILURES[step], _disk_full)
    with pytest.raises(Refused) as refused:
        update_receive(silo_id=silo.pk, fields=fields, payload=payload)
    monkeypatch.undo()

    assert refused.value.code == "internal"
    assert "ask for it again" in refused.value.reason
    assert refused.value.ask_again == (round_.pk, round_.deadline.timestamp())
    assert not Update.objects.filter(round=round_).exists()
    assert not RoundMetric.objects.filter(round=round_).exists()
    assert not AuditEvent.objects.filter(action="update.accepted").exists()
    assert AuditEvent.objects.get(action="update.refused").data["code"] == "internal"
    assert files_under(blobs) == before, "a partial or temporary blob was left behind"
    assert Round.objects.get(pk=round_.pk).status == Round.Status.COLLECTING

    # The disk recovers: the same update, sent again, is accepted and stored intact.
    update_receive(silo_id=silo.pk, fields=fields, payload=payload)
    update = Update.objects.get(round=round_, silo=silo)
    key = update.blob_key
    prefix = update_key(
        run_id=round_.run_id,
        round_number=1,
        attempt=1,
        silo_id=silo.pk,
        sha256=tensors.sha256_hex(payload),
        receipt="",
    ).removesuffix("-.safetensors")
    assert key.startswith(prefix + "-") and key.endswith(".safetensors")
    assert tensors.sha256_hex(storage.blob_store().get(key)) == update.sha256


@pytest.mark.django_db(transaction=True)
async def test_after_a_failed_write_the_server_asks_for_the_update_again_within_the_round(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk full for a moment does not lose the round: the same connection gets the task
    again after a back-off, and the update sent again is accepted."""
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False  # the consumer alone
    settings.QUORUM_BLOB_RETRY_SECONDS = 0.05
    round_, [(silo, token)] = await make_round()
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    state = tensors.decode_state_dict(task.payload)

    monkeypatch.setattr(os, "fsync", _disk_full)
    error = await send_update(comm, update_frames(state, run=round_.run_id, round_=1))
    assert (error["code"], error["round"]) == ("internal", 1)
    monkeypatch.undo()  # the disk has room again

    again = await receive_task(comm)  # no reconnection: the server asks by itself
    assert (again.fields["run"], again.fields["round"]) == (round_.run_id, 1)
    assert again.payload == task.payload
    ack = await send_update(comm, update_frames(state, run=round_.run_id, round_=1))
    assert ack["type"] == "update_ack"
    assert await database_sync_to_async(Update.objects.filter(round=round_, silo=silo).count)() == 1
    await comm.disconnect()


def _update_fields(round_: Round) -> dict[str, Any]:
    return {
        "run": round_.run_id,
        "round": 1,
        "nonce": secrets.token_hex(16),
        "num_examples": 40,
        "metrics": {"train_loss": 0.4},
    }


def test_a_refused_update_leaves_no_blob_although_its_write_started_before_the_checks() -> None:
    """The blob write runs beside the receipt's checks; a refusal deletes what it wrote."""
    consortium = ConsortiumFactory()
    silo, other = SiloFactory.create_batch(2, organization__consortium=consortium)
    round_ = running_round([silo])
    state = build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()
    blobs = Path(settings.QUORUM_BLOB_DIR)
    before = files_under(blobs)
    bad = {name: value.clone() for name, value in state.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    with pytest.raises(Refused) as refused:
        update_receive(
            silo_id=silo.pk, fields=_update_fields(round_), payload=tensors.encode_state_dict(bad)
        )
    assert refused.value.code == "non_finite"
    round_.run.version.silos.add(other)  # takes part in the plan, not selected for the round
    with pytest.raises(Refused) as refused:
        update_receive(
            silo_id=other.pk, fields=_update_fields(round_), payload=tensors.encode_state_dict(state)
        )
    assert refused.value.code == "not_selected"
    assert files_under(blobs) == before


def test_the_same_bytes_sent_again_are_refused_and_the_accepted_blob_stays() -> None:
    """A second receipt of identical bytes (a replay, a reconnect's resend) writes its own file
    and deletes only that: the accepted update's blob is intact."""
    consortium = ConsortiumFactory()
    silo = SiloFactory(organization__consortium=consortium)
    round_ = running_round([silo])
    payload = tensors.encode_state_dict(
        build_model({"kind": "logistic_regression"}, 3, seed=1).state_dict()
    )
    fields = _update_fields(round_)
    update_receive(silo_id=silo.pk, fields=fields, payload=payload)
    accepted = Update.objects.get(round=round_, silo=silo)
    blobs = Path(settings.QUORUM_BLOB_DIR)
    before = files_under(blobs)
    for again in (fields, {**fields, "nonce": secrets.token_hex(16)}):
        with pytest.raises(Refused) as refused:
            update_receive(silo_id=silo.pk, fields=again, payload=payload)
        assert refused.value.code == "duplicate_update"
    assert files_under(blobs) == before
    assert storage.blob_store().get(accepted.blob_key) == payload
