"""A large update: spooled to an anonymous file on the blob filesystem as it arrives, then stored
by linking that file, never written twice nor held in memory as a whole."""

from __future__ import annotations

import errno
import gc
import os
import secrets
from pathlib import Path
from typing import Any

import pytest
from channels.db import database_sync_to_async

from fedcore import protocol, tensors
from federation.models import Round, Silo, Update
from federation.services.silos import silo_issue_token
from federation.storage import FilesystemBlobStore, blob_store
from tests.factories import ConsortiumFactory, SiloFactory, running_round
from tests.integration.test_agent_consumer import (
    connect,
    hello,
    receive_control,
    receive_task,
)

FIELDS = {"run": 1, "round": 1, "nonce": "cd" * 16, "num_examples": 5, "metrics": {}}


def spooled_payload(directory: Path, size: int = 200_000) -> tuple[bytes, Any]:
    data = os.urandom(size)
    frames = protocol.encode_binary(
        protocol.BinaryMessage("update", dict(FIELDS), data), max_frame_bytes=16_000
    )
    reassembler = protocol.Reassembler(spool_dir=directory, spool_threshold=1000)
    message = [reassembler.feed(frame) for frame in frames][-1]
    assert message is not None and protocol.spooled_file(message.payload) is not None
    return data, message.payload


def test_a_spooled_payload_is_stored_by_linking_its_file(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs").mkdir(exist_ok=True)  # the store makes it (0700) itself
    data, payload = spooled_payload(tmp_path / "blobs")
    fd, _ = protocol.spooled_file(payload)

    store.put("runs/1/update.safetensors", payload)
    inode = os.fstat(fd).st_ino
    del payload
    gc.collect()

    path = tmp_path / "blobs" / "runs" / "1" / "update.safetensors"
    assert path.stat().st_ino == inode  # the received file itself: no second write
    assert store.get("runs/1/update.safetensors") == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["update.safetensors"]


def test_a_spooled_payload_that_cannot_be_linked_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs").mkdir(exist_ok=True)  # the store makes it (0700) itself
    data, payload = spooled_payload(tmp_path / "blobs")

    def cross_device(*_: Any, **__: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    store.put("u.safetensors", payload)

    assert store.get("u.safetensors") == data
    assert [p.name for p in (tmp_path / "blobs").iterdir()] == ["u.safetensors"]


@pytest.mark.parametrize("spooled", [True, False])
def test_a_stored_blob_survives_a_crash_its_name_included(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, spooled: bool
) -> None:
    # Durable means the data (fsync of the file) and the new name (fsync of the directory the
    # rename wrote into), both before put returns and the update is acknowledged.
    store = FilesystemBlobStore(tmp_path / "blobs")
    (tmp_path / "blobs").mkdir(exist_ok=True)  # the store makes it (0700) itself
    data, payload = spooled_payload(tmp_path / "blobs")
    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append("directory" if Path(f"/proc/self/fd/{fd}").is_dir() else "file")

    monkeypatch.setattr(os, "fsync", recording_fsync)
    store.put("runs/1/u.safetensors", payload if spooled else data)

    # "runs" and "runs/1" are new: each name is synced in its parent, then the file, its name
    assert synced == ["directory", "directory", "file", "directory"]
    assert store.get("runs/1/u.safetensors") == data
    synced.clear()
    store.put("runs/1/v.safetensors", data)  # the folders exist: nothing more to sync
    assert synced == ["file", "directory"]


@pytest.fixture(autouse=True)
def _no_orchestrator(settings: Any) -> None:
    settings.QUORUM_EMBEDDED_ORCHESTRATOR = False


@pytest.mark.django_db(transaction=True)
async def test_a_large_update_through_the_consumer_is_spooled_checked_and_stored() -> None:
    round_, [(silo, token)] = await make_round_with(model={"kind": "mlp", "hidden": [1500, 1500]})
    comm = await connect(token)
    await hello(comm)
    task = await receive_task(comm)
    state = tensors.decode_state_dict(task.payload)
    payload = tensors.encode_state_dict({k: v + 1 for k, v in state.items()})
    assert len(payload) > protocol.DEFAULT_SPOOL_THRESHOLD
    message = protocol.BinaryMessage(
        "update",
        {
            "run": round_.run_id,
            "round": 1,
            "nonce": secrets.token_hex(16),
            "num_examples": 9,
            "metrics": {},
        },
        payload,
    )

    for frame in protocol.binary_frames(message):
        await comm.send_to(bytes_data=frame)
    ack = await receive_control(comm)

    assert ack["type"] == "update_ack" and ack["status"] == "accepted"
    update = await database_sync_to_async(Update.objects.get)(round=round_, silo=silo)
    assert update.sha256 == tensors.sha256_hex(payload)
    assert await database_sync_to_async(blob_store().get)(update.blob_key) == payload
    await comm.disconnect()


@database_sync_to_async
def make_round_with(**spec: Any) -> tuple[Round, list[tuple[Silo, str]]]:
    """A collecting round of one silo, for a plan with the given spec overrides."""
    consortium = ConsortiumFactory()
    silo = SiloFactory(organization__consortium=consortium)
    return running_round([silo], **spec), [(silo, silo_issue_token(silo=silo))]


def test_get_buffer_reads_a_blob_into_a_writable_buffer_that_decodes_without_a_copy(
    tmp_path: Path,
) -> None:
    import torch

    store = FilesystemBlobStore(tmp_path)
    state = {"w": torch.arange(1000, dtype=torch.float32), "n": torch.tensor(3)}
    store.put("runs/1/u.safetensors", tensors.encode_state_dict(state))
    buffer = store.get_buffer("runs/1/u.safetensors")
    assert isinstance(buffer, memoryview) and not buffer.readonly
    assert bytes(buffer) == store.get("runs/1/u.safetensors")
    decoded = tensors.decode_state_dict(buffer)
    assert torch.equal(decoded["w"], state["w"]) and int(decoded["n"]) == 3
    decoded["w"][0] = 42.0  # the tensor shares the buffer: no second copy was made
    assert tensors.decode_state_dict(buffer)["w"][0] == 42.0
    with pytest.raises(OSError, match="could not read blob"):
        store.get_buffer("runs/1/missing.safetensors")
