"""The fast paths of the update codec: byte-identical safetensors, zero-copy decoding, strict
header checks, the one-pass finiteness check, lazily built frames, and a Reassembler that holds
one copy of a payload (in memory, or spooled to an anonymous file)."""

from __future__ import annotations

import gc
import json
import os
import struct
import threading
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as safetensors_save

from fedcore.protocol import (
    BinaryMessage,
    ChunkSequenceError,
    ProtocolError,
    Reassembler,
    binary_frames,
    encode_binary,
    spooled_file,
)
from fedcore.tensors import (
    TensorCodecError,
    decode_state_dict,
    encode_state_dict,
    first_non_finite,
    sha256_hex,
)

FIELDS = {"run": 3, "round": 1, "nonce": "ab" * 16, "num_examples": 10, "metrics": {}}


def _mixed_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "w32": torch.randn(3, 4, generator=gen),
        "w64": torch.randn(2, generator=gen, dtype=torch.float64),
        "h16": torch.randn(5, generator=gen).half(),
        "b16": torch.randn(5, generator=gen).bfloat16(),
        "steps": torch.tensor(7),
        "i32": torch.arange(3, dtype=torch.int32),
        "i16": torch.arange(3, dtype=torch.int16),
        "i8": torch.arange(3, dtype=torch.int8),
        "u8": torch.arange(3, dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        'odd "name"\\ \n \x01 ü': torch.ones(1),
    }


def _safetensors(header: dict, data: bytes, *, pad: bool = True) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


# ----------------------------------------------------------------------------- safetensors codec


@pytest.mark.parametrize(
    "state",
    [_mixed_state(), {}, {"only": torch.zeros(0)}, {"x": torch.randn(1000, 7)}],
    ids=["mixed-dtypes", "empty", "one-empty-tensor", "one-matrix"],
)
def test_encoding_is_byte_identical_to_safetensors(state):
    assert encode_state_dict(state) == safetensors_save(dict(state))


def test_decoding_a_bytearray_shares_its_memory_and_bytes_are_copied():
    data = encode_state_dict({"w": torch.zeros(4)})
    buffer = bytearray(data)

    shared = decode_state_dict(buffer)
    shared["w"] += 1
    copied = decode_state_dict(data)
    copied["w"] += 5

    assert torch.equal(decode_state_dict(buffer)["w"], torch.ones(4))  # no copy was made
    assert torch.equal(decode_state_dict(data)["w"], torch.zeros(4))  # bytes stay intact


def test_a_misaligned_tensor_is_copied_and_decodes_right():
    value = struct.pack("<f", 2.5)
    header = {
        "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [1, 5]},
    }

    state = decode_state_dict(bytearray(_safetensors(header, b"\x07" + value)))

    assert state["a"].tolist() == [7] and state["b"].tolist() == [2.5]


def _f32(name: str, begin: int, end: int, shape: list[int] | None = None) -> dict:
    return {
        name: {"dtype": "F32", "shape": shape or [(end - begin) // 4], "data_offsets": [begin, end]}
    }


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_safetensors({**_f32("a", 0, 4), **_f32("b", 8, 12)}, bytes(12)), "leaves a gap"),
        (_safetensors({**_f32("a", 0, 8), **_f32("b", 4, 12)}, bytes(12)), "overlaps"),
        (_safetensors(_f32("a", 0, 4), bytes(8)), "buffer holds 8"),
        (_safetensors(_f32("a", 0, 8, [3]), bytes(8)), "8 data bytes for float32"),
        (_safetensors({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"x"), "dtype"),
        (_safetensors(_f32("a", 0, 4, [-1]), bytes(4)), "shape"),
        (_safetensors({"a": {"dtype": "F32", "shape": [1]}}, bytes(4)), "exactly dtype"),
        (
            _safetensors({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b""),
            "data_offsets",
        ),
        (struct.pack("<Q", 6) + b'{"a":1,"a":2}'[:6], "not UTF-8 JSON"),
        (struct.pack("<Q", 16) + b'{"a":1, "a":2}  ', "duplicate key"),
        (struct.pack("<Q", 8) + b'{"a":NaN', "NaN"),
        (struct.pack("<Q", 8) + b"   []   ", "not a JSON object"),
        (struct.pack("<Q", 1 << 40) + b"{}", "exceeds"),
        (_safetensors({"__metadata__": {"k": 1}}, b""), "__metadata__"),
    ],
)
def test_decode_refuses_inconsistent_headers_with_a_reason(data, reason):
    with pytest.raises(TensorCodecError, match="not a valid safetensors state dict") as caught:
        decode_state_dict(bytearray(data))

    assert reason in str(caught.value)


def test_decode_accepts_string_metadata_from_other_writers():
    data = safetensors_save({"w": torch.ones(2)}, metadata={"format": "pt"})

    assert torch.equal(decode_state_dict(data)["w"], torch.ones(2))


def test_first_non_finite_is_exact_when_a_finite_sum_would_overflow():
    huge = torch.full((4,), 3e38)  # finite values whose float32 sum is inf
    half = torch.full((4,), 60000.0, dtype=torch.float16)

    assert first_non_finite({"a": huge, "b": half}) is None
    assert first_non_finite({"a": huge, "b": torch.tensor([1.0, float("-inf")])}) == "b"
    assert first_non_finite({"a": torch.tensor([float("inf"), float("-inf")])}) == "a"
    assert first_non_finite({"a": torch.tensor([0.0, float("nan")]).half()}) == "a"


# --------------------------------------------------------------------------------- frames


def test_binary_frames_are_encode_binary_built_lazily():
    payload = bytes(range(256)) * 40
    message = BinaryMessage("update", dict(FIELDS), payload)

    frames = binary_frames(message, max_frame_bytes=700, transfer_id="0" * 32)
    listed = encode_binary(message, max_frame_bytes=700, transfer_id="0" * 32)

    assert list(frames) == listed == list(frames)  # iterable again, same frames
    assert len(frames) == frames.count == len(listed)
    assert frames.nbytes == sum(len(f) for f in listed)
    assert frames.sha256 == sha256_hex(payload)


# --------------------------------------------------------------------------------- reassembly


def _frames(size: int, frame_bytes: int = 64 << 10) -> tuple[bytes, list[bytes]]:
    payload = os.urandom(size)
    message = BinaryMessage("update", dict(FIELDS), payload)
    return payload, encode_binary(message, max_frame_bytes=frame_bytes)


def test_reassembly_holds_one_copy_of_the_payload():
    payload, frames = _frames(4 << 20)
    reassembler = Reassembler()
    gc.collect()

    tracemalloc.start()
    try:
        for frame in frames:
            message = reassembler.feed(frame)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert message is not None and message.payload == payload
    assert peak < 1.3 * len(payload)  # no list of chunks joined into a second copy


def test_memory_follows_the_bytes_received_not_the_declared_size():
    _, frames = _frames(48 << 20, frame_bytes=1 << 20)
    reassembler = Reassembler()

    tracemalloc.start()
    try:
        reassembler.feed(frames[0])
        reassembler.feed(frames[1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert peak < 4 << 20  # two 1 MiB chunks of a declared 48 MiB


@pytest.mark.parametrize("order", ["duplicate", "swapped", "skipped"])
def test_out_of_order_or_duplicate_chunks_drop_the_transfer(order):
    payload, frames = _frames(300_000)
    sequence = {
        "duplicate": [0, 1, 1],
        "swapped": [0, 2, 1],
        "skipped": [0, 1, 3],
    }[order]
    reassembler = Reassembler()

    with pytest.raises(ChunkSequenceError, match="duplicated or out of order"):
        for index in sequence:
            reassembler.feed(frames[index])

    # dropped: the sender starts over, and the whole message then arrives intact
    with pytest.raises(ChunkSequenceError, match="no transfer open"):
        reassembler.feed(frames[sequence[-1]])
    results = [reassembler.feed(frame) for frame in frames]
    assert results[-1] is not None and results[-1].payload == payload


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    directory = tmp_path / "spool"
    directory.mkdir()
    return directory


def test_large_payloads_are_spooled_to_an_anonymous_file(spool: Path):
    payload, frames = _frames(300_000, frame_bytes=20_000)
    reassembler = Reassembler(spool_dir=spool, spool_threshold=100_000)

    message = [reassembler.feed(frame) for frame in frames][-1]

    assert message is not None and message.payload[:] == payload
    fd, digest = spooled_file(message.payload)
    assert digest == sha256_hex(payload) == sha256_hex(message.payload)
    assert os.fstat(fd).st_size == len(payload)
    assert list(spool.iterdir()) == []  # nothing named: it vanishes with the payload
    state_bytes = encode_state_dict({"w": torch.arange(30_000, dtype=torch.float32)})
    tensors_message = encode_binary(
        BinaryMessage("update", dict(FIELDS), state_bytes), max_frame_bytes=20_000
    )
    decoded = [reassembler.feed(frame) for frame in tensors_message][-1]
    assert decoded is not None and spooled_file(decoded.payload) is not None
    assert torch.equal(decode_state_dict(decoded.payload)["w"], torch.arange(30_000.0))


def test_small_payloads_and_a_missing_spool_dir_stay_in_memory(spool: Path):
    payload, frames = _frames(50_000, frame_bytes=20_000)
    in_memory = Reassembler(spool_dir=spool, spool_threshold=100_000)
    small = [in_memory.feed(f) for f in frames][-1]
    missing = Reassembler(spool_dir=spool / "absent", spool_threshold=1)
    elsewhere = [missing.feed(f) for f in frames][-1]

    assert small is not None and isinstance(small.payload, bytearray)
    assert elsewhere is not None and isinstance(elsewhere.payload, bytearray)
    assert spooled_file(small.payload) is None
    assert small.payload == elsewhere.payload == payload


def test_a_dropped_or_finished_spool_closes_its_file(spool: Path):
    _, frames = _frames(300_000, frame_bytes=20_000)
    reassembler = Reassembler(spool_dir=spool, spool_threshold=100_000)
    before = _open_fds()

    reassembler.feed(frames[0])
    reassembler.feed(frames[1])
    assert _open_fds() == before + 1
    with pytest.raises(ChunkSequenceError):
        reassembler.feed(frames[1])  # duplicate: the transfer and its file are dropped
    assert _open_fds() == before

    reassembler.feed(frames[0])
    reassembler.reset()
    assert _open_fds() == before

    message = [reassembler.feed(frame) for frame in frames][-1]
    assert _open_fds() > before  # the payload's mapping owns the file now
    assert not [t for t in threading.enumerate() if t.name == "quorum-spool"]  # writers joined
    del message
    gc.collect()
    assert _open_fds() == before


def test_a_spool_that_cannot_be_written_refuses_the_message_as_internal(
    spool: Path, monkeypatch: pytest.MonkeyPatch
):
    payload, frames = _frames(300_000, frame_bytes=20_000)
    reassembler = Reassembler(spool_dir=spool, spool_threshold=100_000)
    reassembler.feed(frames[0])
    real_write = os.write

    def disk_full(fd: int, data: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", disk_full)
    # the writer thread fails: a later frame, at the latest the last one, reports it
    with pytest.raises(ProtocolError, match="could not store the") as caught:
        for frame in frames[1:]:
            reassembler.feed(frame)
    monkeypatch.setattr(os, "write", real_write)

    assert caught.value.code == "internal"
    message = [reassembler.feed(frame) for frame in frames][-1]  # the resend goes through
    assert message is not None and message.payload[:] == payload
