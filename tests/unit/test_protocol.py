"""Tests for fedcore.protocol: control frames, binary frames, chunking and strict validation."""

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.protocol import (
    BINARY_SCHEMAS,
    CONTROL_SCHEMAS,
    DEFAULT_MAX_CONTROL_BYTES,
    ERROR_CODES,
    FRAME_MAGIC,
    FRAME_PREFIX_BYTES,
    MAX_JSON_DEPTH,
    PROTOCOL_VERSION,
    BinaryMessage,
    ChecksumMismatch,
    ChunkSequenceError,
    InvalidField,
    MalformedFrame,
    OversizedFrame,
    ProtocolError,
    Reassembler,
    TruncatedFrame,
    UnknownMessageType,
    UnsupportedVersion,
    decode_control,
    encode_binary,
    encode_control,
    encode_error,
)
from fedcore.tensors import sha256_hex

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TRANSFER = "0123456789abcdef0123456789abcdef"
OTHER_TRANSFER = "fedcba9876543210fedcba9876543210"
PLAN = {
    "model": {"kind": "mlp", "hidden": [32, 16], "activation": "relu", "dropout": 0.0},
    "schema": {"columns": [{"name": "age", "type": "numeric"}], "target": {"column": "y"}},
    "evaluation": {"test_fraction": 0.2, "seed": 0},
}

GRANT = {"payload": {"v": 1, "run": 3, "silo": "icu"}, "signature": "c2ln", "key": "ed25519:AAAA"}

# One valid example per control message type, with every field (required and optional) set.
CONTROL_EXAMPLES = {
    "hello": {"agent_version": "0.1.0", "site": "St Elsewhere", "capabilities": {"dp": True}},
    "welcome": {"silo": "icu", "silo_id": 7, "consortium": "north", "heartbeat_seconds": 15},
    "heartbeat": {"ts": 1718000000.25, "state": "idle"},
    "heartbeat_ack": {"ts": 1718000000},
    "ready": {},
    "stats_request": {"run": 3, "plan_hash": "ab" * 32, "plan": PLAN, "authorization": GRANT},
    "plan_offer": {
        "plan_hash": "ab" * 32,
        "plan": PLAN,
        "name": "Thyroid screening",
        "version": 2,
        "consortium": "north",
        "status": "submitted",
        "authorization": GRANT,
    },
    "stats": {
        "run": 3,
        "stats": {"n": 120, "columns": {"age": {"count": 120, "mean": 51.5}}},
        "label_counts": {"F": {"negatives": 40, "positives": 20}},  # a reweighing plan's
    },
    "analysis_request": {
        "run": 3,
        "plan_hash": "ab" * 32,
        "plan": PLAN,
        "step": "summary",
        "params": {"grid": [1.0, 2.5]},
        "authorization": GRANT,
    },
    "analysis": {"run": 3, "step": "summary", "answer": {"summary": {"counts": [6, 7]}}},
    "evaluation": {
        "run": 3,
        "model_version": 20,
        "evaluation": {"bins": 2, "positives": [1, 4], "negatives": [5, 0], "loss_sum": 2.5},
        "fairness": {"sex": {"F": {"tp": 2, "fp": 0, "tn": 3, "fn": 1}}},
        "score_histograms": {"F": {"negatives": [3, 0], "positives": [1, 2]}},  # postprocess
        # postprocess with rows "training": the held-out rows' histograms too
        "held_out_score_histograms": {"F": {"negatives": [2, 1], "positives": [0, 3]}},
        "calibration": {
            "grid": "uniform[0,1]",
            "bins": 1,
            "count": [3],
            "prob_sum": [1.5],
            "positives": [1],
        },
    },
    "update_ack": {"run": 3, "round": 0, "status": "accepted"},
    "run_finished": {"run": 3, "status": "completed"},
    "error": {"code": "invalid_field", "reason": "field 'run' is missing", "run": 3, "round": 2},
    "secagg": {
        "run": 3,
        "round": 2,
        "attempt": 1,
        "stage": "advertise_keys",
        "payload": {"stage": "advertise_keys", "round": "3:2:1", "clients": [1, 2, 3]},
        "client": 2,
        "step": "summary",
    },
}

TASK_FIELDS = {
    "run": 3,
    "round": 1,
    "rounds": 20,
    "plan_hash": "ab" * 32,
    "plan": PLAN,
    "preprocessing": {"means": {"age": 50.1}, "stds": {"age": 12.0}},
    "deadline": 1718000120.5,
    "authorization": GRANT,
    "sent_at": 1718000000.25,  # when the server started sending it (round timing)
    "example_weights": {"F": {"0": [0, 1.2], "1": [1, 0.8]}},  # a reweighing plan's
}
UPDATE_FIELDS = {
    "run": 3,
    "round": 1,
    "nonce": "9f" * 16,
    "num_examples": 480,
    "metrics": {"train_loss": 0.41},
    "silo": "icu",
    "privacy": {},  # sample-level DP report (kept small: some tests use tiny frames)
    "fairness": {},  # per-group confusion counts by sensitive attribute (kept small too)
    "sent_at": 1718000030.5,  # when the agent started sending it (round timing)
    "compression": "topk",  # the plan's compression method (fedcore.compression)
    "task_part": {},  # multi-class / regression: the global model's metrics part (kept small)
}
MASKED_UPDATE_FIELDS = {
    "run": 3,
    "round": 1,
    "attempt": 2,
    "nonce": "9f" * 16,
    "num_examples": 480,
    "metrics": {"train_loss": 0.41},
    "silo": "icu",
    "privacy": {},
}


def _update(payload: bytes = b"weights" * 100) -> BinaryMessage:
    # Without task_part: the chunking tests' frame sizes (400, 420) are calibrated to the
    # header of the other fields (the smallest leaves a few bytes of payload per frame).
    fields = {k: v for k, v in UPDATE_FIELDS.items() if k != "task_part"}
    return BinaryMessage(type="update", fields=fields, payload=payload)


def _frame(
    header: dict | bytes,
    chunk: bytes = b"",
    *,
    magic: bytes = FRAME_MAGIC,
    version: int = PROTOCOL_VERSION,
    header_length: int | None = None,
) -> bytes:
    """Build a binary frame by hand, so tests can break any part of it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if header_length is None else header_length
    return magic + struct.pack(">BI", version, length) + raw + chunk


_DROP = object()  # marks a header key to leave out


def _header(payload: bytes = b"abc", **overrides) -> dict:
    header = {
        "type": "update",
        "transfer": TRANSFER,
        "index": 0,
        "count": 1,
        "size": len(payload),
        "sha256": sha256_hex(payload),
        "fields": dict(UPDATE_FIELDS),
    }
    header.update(overrides)
    return {key: value for key, value in header.items() if value is not _DROP}


def _nested(depth: int) -> list:
    """A list nested ``depth`` levels deep: [[[...]]]."""
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def _parse_header(frame: bytes) -> dict:
    (length,) = struct.unpack(">I", frame[5:9])
    return json.loads(frame[9 : 9 + length])


def _feed_all(reassembler: Reassembler, frames: list[bytes]) -> list[BinaryMessage | None]:
    return [reassembler.feed(frame) for frame in frames]


# ----------------------------------------------------------------------------- error classes


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (MalformedFrame, "malformed"),
        (TruncatedFrame, "truncated"),
        (OversizedFrame, "oversized"),
        (UnsupportedVersion, "unsupported_version"),
        (UnknownMessageType, "unknown_type"),
        (InvalidField, "invalid_field"),
        (ChecksumMismatch, "checksum_mismatch"),
        (ChunkSequenceError, "chunk_sequence"),
    ],
)
def test_error_classes_carry_their_code_and_message(error, code):
    exc = error("field 'run' is missing")

    assert error.code == code
    assert code in ERROR_CODES
    assert isinstance(exc, ProtocolError) and isinstance(exc, ValueError)
    assert str(exc) == exc.message == "field 'run' is missing"


def test_error_codes_are_unique_and_cover_the_server_codes():
    assert len(ERROR_CODES) == len(set(ERROR_CODES))
    for code in ("auth_failed", "wrong_round", "duplicate_update", "non_finite", "internal"):
        assert code in ERROR_CODES


# --------------------------------------------------------------------------- control frames


@pytest.mark.parametrize("msg_type", sorted(CONTROL_SCHEMAS))
def test_control_round_trip_for_every_message_type(msg_type):
    fields = CONTROL_EXAMPLES[msg_type]

    text = encode_control(msg_type, **fields)
    decoded = decode_control(text)

    assert decoded == {"v": PROTOCOL_VERSION, "type": msg_type, **fields}
    assert decode_control(text.encode("utf-8")) == decoded


@pytest.mark.parametrize("msg_type", sorted(CONTROL_SCHEMAS))
def test_control_round_trip_with_required_fields_only(msg_type):
    schema = CONTROL_SCHEMAS[msg_type]
    fields = {k: v for k, v in CONTROL_EXAMPLES[msg_type].items() if schema[k][1]}

    assert decode_control(encode_control(msg_type, **fields)) == {
        "v": 1,
        "type": msg_type,
        **fields,
    }


def test_every_schema_field_has_an_example():
    for msg_type, schema in CONTROL_SCHEMAS.items():
        assert set(CONTROL_EXAMPLES[msg_type]) == set(schema), msg_type
    assert set(TASK_FIELDS) == set(BINARY_SCHEMAS["task"])
    assert set(UPDATE_FIELDS) == set(BINARY_SCHEMAS["update"])
    assert set(MASKED_UPDATE_FIELDS) == set(BINARY_SCHEMAS["masked_update"])
    assert set(BINARY_SCHEMAS["evaluate"]) == set(TASK_FIELDS) - {"round", "example_weights"} | {
        "model_version"
    }
    assert set(BINARY_SCHEMAS) == {"task", "evaluate", "update", "masked_update"}


def test_masked_update_round_trips_its_uint32_payload():
    vector = bytes(range(256)) * 40  # 2560 bytes: 640 masked coordinates
    message = BinaryMessage(type="masked_update", fields=dict(MASKED_UPDATE_FIELDS), payload=vector)
    frames = encode_binary(message, max_frame_bytes=1024)
    reassembler = Reassembler()
    results = [reassembler.feed(frame) for frame in frames]

    assert len(frames) > 1 and results[:-1] == [None] * (len(frames) - 1)
    assert results[-1] == message


def test_encode_control_puts_the_envelope_first_in_compact_json():
    text = encode_control("update_ack", run=1, round=2, status="accepted")

    assert text == '{"v":1,"type":"update_ack","run":1,"round":2,"status":"accepted"}'


def test_control_round_trip_keeps_non_ascii_text():
    text = encode_control("hello", agent_version="0.1", site="Hôpital Nord – Zürich")

    assert decode_control(text)["site"] == "Hôpital Nord – Zürich"


@pytest.mark.parametrize(
    ("msg_type", "fields", "error", "match"),
    [
        ("bogus", {}, UnknownMessageType, "unknown control message type"),
        ("task", {}, UnknownMessageType, "unknown control message type"),
        ("hello", {}, InvalidField, "missing required field 'agent_version'"),
        ("hello", {"agent_version": "1", "colour": "red"}, InvalidField, "unknown field"),
        ("hello", {"agent_version": 1}, InvalidField, "'agent_version' must be a string"),
        ("stats", {"run": True, "stats": {}}, InvalidField, "'run' must be an integer"),
        ("stats", {"run": 1.0, "stats": {}}, InvalidField, "'run' must be an integer"),
        ("stats", {"run": -1, "stats": {}}, InvalidField, "'run' must be between"),
        ("stats", {"run": 1 << 63, "stats": {}}, InvalidField, "'run' must be between"),
        ("heartbeat", {"ts": float("nan")}, InvalidField, "'ts' must be a finite number"),
        ("heartbeat", {"ts": False}, InvalidField, "'ts' must be a number"),
        ("heartbeat", {"ts": None}, InvalidField, "'ts' must be a number"),
        ("stats", {"run": 1, "stats": {"m": float("inf")}}, InvalidField, r"'stats\.m' is inf"),
        ("stats", {"run": 1, "stats": {1: 2}}, InvalidField, "keys must be UTF-8 strings"),
        ("stats", {"run": 1, "stats": {"s": {1, 2}}}, InvalidField, "'stats.s' is a set"),
        ("stats", {"run": 1, "stats": []}, InvalidField, "'stats' must be an object"),
        ("hello", {"agent_version": "1", "v": 2}, InvalidField, "'v' is set by the protocol"),
        ("hello", {"agent_version": "1", "type": "x"}, InvalidField, "'type' is set by"),
    ],
)
def test_encode_control_refuses_invalid_messages(msg_type, fields, error, match):
    with pytest.raises(error, match=match):
        encode_control(msg_type, **fields)


def test_encode_control_refuses_nesting_beyond_the_depth_limit():
    deep: dict = {}
    for _ in range(MAX_JSON_DEPTH):
        deep = {"d": deep}

    with pytest.raises(InvalidField, match=f"nests deeper than {MAX_JSON_DEPTH} levels"):
        encode_control("stats", run=1, stats=deep)


def _control(**obj) -> str:
    return json.dumps(obj)


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        ("not json", MalformedFrame, "not valid JSON: Expecting value at line 1 column 1"),
        ("", MalformedFrame, "not valid JSON"),
        ('{"v": 1, "type": "heartbeat"', MalformedFrame, "not valid JSON"),
        ("[1, 2]", MalformedFrame, "must be a JSON object, got array"),
        ('"hello"', MalformedFrame, "must be a JSON object, got string"),
        ("null", MalformedFrame, "must be a JSON object, got null"),
        (_control(v=2, type="heartbeat"), UnsupportedVersion, "protocol version 2"),
        (_control(type="heartbeat"), UnsupportedVersion, "no protocol version field 'v'"),
        (_control(v="1", type="heartbeat"), UnsupportedVersion, "not supported"),
        (_control(v=True, type="heartbeat"), UnsupportedVersion, "protocol version true"),
        (_control(v=1.0, type="heartbeat"), UnsupportedVersion, "not supported"),
        (_control(v=1, type="gossip"), UnknownMessageType, 'unknown control message type "gos'),
        (_control(v=1, type="task"), UnknownMessageType, "send it as a binary frame"),
        (_control(v=1), InvalidField, "field 'type' is missing"),
        (_control(v=1, type=3), InvalidField, "field 'type' is number"),
        (_control(v=1, type="stats", run=1), InvalidField, "missing required field 'stats'"),
        (_control(v=1, type="stats", run="1", stats={}), InvalidField, "'run' must be an int"),
        (_control(v=1, type="stats", run=True, stats={}), InvalidField, "got boolean true"),
        (_control(v=1, type="heartbeat", ts=True), InvalidField, "'ts' must be a number"),
        (_control(v=1, type="heartbeat", ts=None), InvalidField, "'ts' must be a number"),
        (_control(v=1, type="heartbeat", ts="1"), InvalidField, "'ts' must be a number"),
        (_control(v=1, type="heartbeat", colour=1), InvalidField, "unknown field.*'colour'"),
        (_control(v=1, type="stats", run=-3, stats={}), InvalidField, "must be between 0"),
        (_control(v=1, type="stats", run=2**64, stats={}), MalformedFrame, "signed 64-bit range"),
        ('{"v": 1, "type": "heartbeat", "ts": NaN}', MalformedFrame, "NaN is not allowed"),
        ('{"v": 1, "type": "heartbeat", "ts": Infinity}', MalformedFrame, "Infinity is not"),
        ('{"v": 1, "type": "heartbeat", "ts": -Infinity}', MalformedFrame, "-Infinity is not"),
        ('{"v": 1, "type": "heartbeat", "ts": 1e999}', MalformedFrame, "overflows"),
        ('{"v":1,"type":"stats","run":1,"stats":{"a":NaN}}', MalformedFrame, "NaN is not"),
        ('{"v": 1, "v": 1, "type": "heartbeat"}', MalformedFrame, 'duplicate key "v"'),
        ('{"v":1,"type":"stats","run":1,"stats":{"a":1,"a":2}}', MalformedFrame, "duplicate"),
        ('{"v":1,"type":"stats","run":' + "9" * 5000 + ',"stats":{}}', MalformedFrame, "JSON"),
        ('{"v":1,"type":"hello","agent_version":"\\ud800"}', InvalidField, "lone surrogate"),
        (
            '{"v":1,"type":"stats","run":1,"stats":{"a":' + "[" * 40 + "]" * 40 + "}}",
            InvalidField,
            "nests deeper than",
        ),
        ("[" * 100_000, MalformedFrame, "not valid JSON"),
        (
            '{"v":1,"type":"stats","run":1,"stats":' + "[" * 900 + "]" * 900 + "}",
            InvalidField,
            r"'stats' must be an object, got array \[\.\.\.\]",
        ),
        ('{"v":1,"type":' + "[" * 900 + "]" * 900 + "}", InvalidField, "'type' is array"),
    ],
)
def test_decode_control_refuses_bad_frames_with_the_right_code(text, error, match):
    with pytest.raises(error, match=match) as info:
        decode_control(text)

    assert type(info.value) is error


def test_decode_control_refuses_bytes_that_are_not_utf8():
    with pytest.raises(MalformedFrame, match="not UTF-8: invalid byte at byte offset 9"):
        decode_control(b'{"v": 1, \xff}')


def test_decode_control_refuses_non_text():
    with pytest.raises(MalformedFrame, match="must be text, got int"):
        decode_control(42)  # type: ignore[arg-type]


def test_decode_control_refuses_oversized_text_before_parsing():
    text = encode_control("hello", agent_version="1", site="x" * 200)

    with pytest.raises(OversizedFrame, match="exceeds the limit of 100 bytes"):
        decode_control(text, max_bytes=100)
    with pytest.raises(OversizedFrame):
        decode_control(text.encode(), max_bytes=100)
    with pytest.raises(OversizedFrame):  # even when it is not JSON at all
        decode_control("x" * (DEFAULT_MAX_CONTROL_BYTES + 1))


def test_decode_control_counts_the_limit_in_utf8_bytes():
    text = encode_control("hello", agent_version="1", site="é" * 10)
    size = len(text.encode("utf-8"))

    assert decode_control(text, max_bytes=size)["site"] == "é" * 10
    with pytest.raises(OversizedFrame):
        decode_control(text, max_bytes=size - 1)


def test_encode_error_builds_an_error_frame_and_drops_none_fields():
    text = encode_error("wrong_round", "round 4 is not open", run=3, round=None)

    assert decode_control(text) == {
        "v": 1,
        "type": "error",
        "code": "wrong_round",
        "reason": "round 4 is not open",
        "run": 3,
    }


def test_encode_error_accepts_a_protocol_error_code_and_message():
    exc = ChecksumMismatch("payload sha256 mismatch")

    decoded = decode_control(encode_error(exc.code, str(exc)))

    assert decoded["code"] == "checksum_mismatch"


def test_encode_error_refuses_unknown_codes_and_cuts_long_reasons():
    with pytest.raises(InvalidField, match="not one of ERROR_CODES"):
        encode_error("oops", "typo in the code")

    decoded = decode_control(encode_error("internal", "x" * 10_000))

    assert len(decoded["reason"]) <= 2000


def test_decode_control_accepts_unknown_error_codes_from_newer_peers():
    decoded = decode_control(_control(v=1, type="error", code="new_code", reason="r"))

    assert decoded["code"] == "new_code"


# ---------------------------------------------------------------------------- binary frames


def test_single_frame_round_trip_and_layout():
    msg = _update(b"\x00\x01safetensors bytes")

    frames = encode_binary(msg, transfer_id=TRANSFER)
    decoded = Reassembler().feed(frames[0])

    assert len(frames) == 1
    assert decoded == msg
    frame = frames[0]
    assert frame[:4] == b"QRMB" and frame[4] == PROTOCOL_VERSION
    header = _parse_header(frame)
    assert header == {
        "type": "update",
        "transfer": TRANSFER,
        "index": 0,
        "count": 1,
        "size": len(msg.payload),
        "sha256": sha256_hex(msg.payload),
        "fields": msg.fields,
    }
    assert frame.endswith(msg.payload)


def test_task_message_round_trips():
    msg = BinaryMessage(type="task", fields=dict(TASK_FIELDS), payload=b"global model")

    assert Reassembler().feed(encode_binary(msg)[0]) == msg


def test_encoding_with_a_fixed_transfer_id_is_deterministic():
    assert encode_binary(_update(), transfer_id=TRANSFER) == encode_binary(
        _update(), transfer_id=TRANSFER
    )


def test_default_transfer_ids_are_random_hex():
    first = _parse_header(encode_binary(_update())[0])["transfer"]
    second = _parse_header(encode_binary(_update())[0])["transfer"]

    assert first != second
    assert len(first) == 32 and int(first, 16) >= 0


def test_empty_payload_is_one_frame_with_size_zero():
    msg = _update(b"")

    frames = encode_binary(msg, max_frame_bytes=400)

    assert len(frames) == 1
    assert _parse_header(frames[0])["size"] == 0
    assert Reassembler().feed(frames[0]) == msg


@pytest.mark.parametrize("payload_size", [1, 100, 999, 1000, 5003])
# The smallest leaves a few bytes of payload per frame after the first frame's header.
@pytest.mark.parametrize("max_frame_bytes", [400, 420, 1024])
def test_chunked_round_trip(payload_size, max_frame_bytes):
    payload = bytes(i % 251 for i in range(payload_size))
    msg = _update(payload)
    reassembler = Reassembler(max_frame_bytes=max_frame_bytes)

    frames = encode_binary(msg, max_frame_bytes=max_frame_bytes)
    results = _feed_all(reassembler, frames)

    assert results[-1] == msg
    assert results[:-1] == [None] * (len(frames) - 1)
    assert all(len(frame) <= max_frame_bytes for frame in frames)
    headers = [_parse_header(frame) for frame in frames]
    assert [h["index"] for h in headers] == list(range(len(frames)))
    assert {h["count"] for h in headers} == {len(frames)}
    assert "fields" in headers[0] and all("fields" not in h for h in headers[1:])


def test_chunking_uses_every_frame_fully_but_the_last():
    payload = bytes(20_000)

    frames = encode_binary(_update(payload), max_frame_bytes=1000)

    assert len(frames) > 20
    # Frames differ only by the digits of their index: none is left mostly empty.
    assert all(len(frame) >= 1000 - 2 for frame in frames[:-1])


def test_reassembler_is_ready_for_the_next_message_after_one_completes():
    reassembler = Reassembler(max_frame_bytes=400)
    first, second = _update(b"a" * 700), _update(b"b" * 900)

    assert _feed_all(reassembler, encode_binary(first, max_frame_bytes=400))[-1] == first
    assert _feed_all(reassembler, encode_binary(second, max_frame_bytes=400))[-1] == second


def test_reassembler_accepts_bytearray_and_memoryview_frames():
    frame = encode_binary(_update())[0]

    assert Reassembler().feed(bytearray(frame)) == _update()
    assert Reassembler().feed(memoryview(frame)) == _update()


@pytest.mark.parametrize(
    ("msg", "kwargs", "error", "match"),
    [
        (BinaryMessage("gradients", {}, b""), {}, UnknownMessageType, "unknown binary"),
        (BinaryMessage("update", {"run": 1}, b""), {}, InvalidField, "missing required"),
        (
            BinaryMessage("update", {**UPDATE_FIELDS, "round": True}, b""),
            {},
            InvalidField,
            "'round' must be an integer",
        ),
        (BinaryMessage("update", UPDATE_FIELDS, "text"), {}, InvalidField, "payload must be"),
        (_update(), {"transfer_id": "ABC"}, InvalidField, "32 lowercase hex"),
        (_update(), {"max_frame_bytes": 200}, OversizedFrame, "leaves no room for payload"),
    ],
)
def test_encode_binary_refuses_invalid_messages(msg, kwargs, error, match):
    with pytest.raises(error, match=match):
        encode_binary(msg, **kwargs)


# ------------------------------------------------------------------ reassembler refusals


def _chunked(transfer_id: str = TRANSFER) -> list[bytes]:
    payload = (bytes(range(256)) * 5)[:1200]
    frames = encode_binary(_update(payload), max_frame_bytes=400, transfer_id=transfer_id)
    assert len(frames) >= 4
    return frames


def test_out_of_order_chunk_is_refused():
    frames = _chunked()
    reassembler = Reassembler(max_frame_bytes=400)
    reassembler.feed(frames[0])

    with pytest.raises(ChunkSequenceError, match="frame 2 arrived, expected frame 1"):
        reassembler.feed(frames[2])


def test_duplicated_chunk_is_refused():
    frames = _chunked()
    reassembler = Reassembler(max_frame_bytes=400)
    _feed_all(reassembler, frames[:2])

    with pytest.raises(ChunkSequenceError, match="duplicated or out of order"):
        reassembler.feed(frames[1])


def test_duplicated_first_frame_is_refused():
    frames = _chunked()
    reassembler = Reassembler(max_frame_bytes=400)
    reassembler.feed(frames[0])

    with pytest.raises(ChunkSequenceError, match="frame 0 arrived, expected frame 1"):
        reassembler.feed(frames[0])


def test_chunk_without_an_open_transfer_is_refused():
    with pytest.raises(ChunkSequenceError, match="no transfer open"):
        Reassembler(max_frame_bytes=400).feed(_chunked()[1])


def test_chunk_of_another_transfer_is_refused():
    ours, theirs = _chunked(), _chunked(transfer_id=OTHER_TRANSFER)
    reassembler = Reassembler(max_frame_bytes=400)
    reassembler.feed(ours[0])

    with pytest.raises(ChunkSequenceError, match=f"transfer {OTHER_TRANSFER} arrived while"):
        reassembler.feed(theirs[1])


def test_new_transfer_while_one_is_open_is_refused():
    ours, theirs = _chunked(), _chunked(transfer_id=OTHER_TRANSFER)
    reassembler = Reassembler(max_frame_bytes=400)
    reassembler.feed(ours[0])

    with pytest.raises(ChunkSequenceError, match=f"transfer {TRANSFER} is open"):
        reassembler.feed(theirs[0])


def test_header_differing_between_chunks_is_refused():
    payload = b"x" * 10
    reassembler = Reassembler()
    reassembler.feed(_frame(_header(payload, count=2), payload[:5]))
    later = _header(payload, index=1, count=2, size=11, fields=_DROP)

    with pytest.raises(ChunkSequenceError, match="'size' is 11, but frame 0 declared 10"):
        reassembler.feed(_frame(later, payload[5:]))


def test_an_error_drops_the_open_transfer():
    frames = _chunked()
    reassembler = Reassembler(max_frame_bytes=400)
    reassembler.feed(frames[0])
    with pytest.raises(MalformedFrame):
        reassembler.feed(b"garbage that is not a frame")

    with pytest.raises(ChunkSequenceError, match="no transfer open"):
        reassembler.feed(frames[1])
    assert _feed_all(reassembler, frames)[-1] is not None


def test_reset_drops_the_open_transfer():
    frames = _chunked()
    reassembler = Reassembler(max_frame_bytes=400)
    reassembler.feed(frames[0])

    reassembler.reset()

    assert _feed_all(reassembler, frames)[-1] is not None


@pytest.mark.parametrize("length", [0, 1, 4, 8])
def test_frame_shorter_than_the_prefix_is_truncated(length):
    frame = encode_binary(_update())[0][:length]

    with pytest.raises(TruncatedFrame, match=f"frame of {length} bytes is shorter than"):
        Reassembler().feed(frame)


def test_frame_cut_inside_its_header_is_truncated():
    frame = encode_binary(_update())[0]

    with pytest.raises(TruncatedFrame, match="runs past the end"):
        Reassembler().feed(frame[: FRAME_PREFIX_BYTES + 20])


def test_header_length_past_the_end_is_truncated():
    frame = _frame(_header(), b"abc", header_length=100_000)

    with pytest.raises(TruncatedFrame, match="header length 100000 .byte offset 5. runs past"):
        Reassembler().feed(frame)


def test_frame_cut_inside_its_payload_is_refused():
    msg = _update(b"p" * 50)
    frame = encode_binary(msg)[0]

    with pytest.raises(ChunkSequenceError, match="after 49 of the declared 50 payload bytes"):
        Reassembler().feed(frame[:-1])


def test_bad_magic_is_refused():
    frame = b"QRMX" + encode_binary(_update())[0][4:]

    with pytest.raises(MalformedFrame, match="bad magic b'QRMX' at byte offset 0"):
        Reassembler().feed(frame)


def test_wrong_version_is_refused():
    frame = _frame(_header(), b"abc", version=2)

    with pytest.raises(UnsupportedVersion, match="protocol version 2 at byte offset 4"):
        Reassembler().feed(frame)


def test_oversized_frame_is_refused_before_parsing():
    reassembler = Reassembler(max_frame_bytes=1000)

    with pytest.raises(OversizedFrame, match="frame of 1001 bytes exceeds the limit of 1000"):
        reassembler.feed(b"\x00" * 1001)  # garbage: refused for its size, not its content


def test_oversized_header_is_refused():
    payload = b"abc"
    frame = encode_binary(_update(payload))[0]

    with pytest.raises(OversizedFrame, match="header of .* bytes exceeds the limit of 64"):
        Reassembler(max_header_bytes=64).feed(frame)


def test_declared_size_over_the_limit_is_refused_at_frame_zero():
    huge = 10_000
    frame0 = _frame(_header(b"", size=huge, count=50, sha256="0" * 64), b"x" * 100)
    reassembler = Reassembler(max_message_bytes=huge - 1)

    with pytest.raises(OversizedFrame, match="declared size 10000 bytes exceeds the limit of 9999"):
        reassembler.feed(frame0)
    # Nothing was buffered: a normal message goes straight through.
    assert reassembler.feed(encode_binary(_update(b"ok"))[0]) == _update(b"ok")


def test_checksum_mismatch_after_a_flipped_payload_byte():
    frames = _chunked()
    flipped = bytearray(frames[-1])
    flipped[-1] ^= 0xFF
    frames[-1] = bytes(flipped)

    with pytest.raises(ChecksumMismatch, match="does not match the declared"):
        _feed_all(Reassembler(max_frame_bytes=400), frames)


def test_extra_bytes_beyond_the_declared_size_are_refused():
    frame = encode_binary(_update(b"12345"))[0] + b"6"

    with pytest.raises(ChunkSequenceError, match="beyond the declared size 5"):
        Reassembler().feed(frame)


def test_extra_bytes_in_a_middle_chunk_are_refused():
    payload = b"x" * 10
    reassembler = Reassembler()
    reassembler.feed(_frame(_header(payload, count=2), payload[:8]))
    later = _header(payload, index=1, count=2, fields=_DROP)

    with pytest.raises(ChunkSequenceError, match="total to 13, beyond the declared size 10"):
        reassembler.feed(_frame(later, b"x" * 5))


def test_empty_chunk_in_a_non_empty_transfer_is_refused():
    payload = b"x" * 10

    with pytest.raises(ChunkSequenceError, match="empty chunk in a transfer of 10 bytes"):
        Reassembler().feed(_frame(_header(payload, count=2), b""))


@pytest.mark.parametrize(
    ("header", "error", "match"),
    [
        (b"not json", MalformedFrame, "header is not valid JSON"),
        (b"\xff\xfe{}", MalformedFrame, "header is not UTF-8: invalid byte at byte offset 9"),
        (b"[1, 2]", MalformedFrame, "header must be a JSON object, got array"),
        (b'{"size": NaN}', MalformedFrame, "NaN is not allowed"),
        (_header(colour="red"), InvalidField, "unknown key.*'colour'"),
        (_header(index=_DROP), InvalidField, "missing key 'index'"),
        (_header(sha256=_DROP), InvalidField, "missing key 'sha256'"),
        (_header(index="0"), InvalidField, "'index' must be an integer, got string"),
        (_header(index=True), InvalidField, "'index' must be an integer, got boolean"),
        (_header(size=3.0), InvalidField, "'size' must be an integer"),
        (_header(size=-1), InvalidField, "'size' out of range"),
        (_header(type=5), InvalidField, "'type' must be a string"),
        (_header(transfer="XYZ"), InvalidField, "not 32 lowercase hex"),
        (_header(transfer=TRANSFER.upper()), InvalidField, "not 32 lowercase hex"),
        (_header(sha256="00"), InvalidField, "not 64 lowercase hex"),
        (_header(count=0), InvalidField, "count 0 must be between 1 and size"),
        (_header(count=5), InvalidField, r"count 5 must be between 1 and size \+ 1 \(4\)"),
        (_header(index=1, count=1, fields=_DROP), InvalidField, "index 1 must be below count"),
        (_header(fields=_DROP), InvalidField, "frame 0 must carry 'fields'"),
        (_header(fields=[1]), InvalidField, "frame 0 must carry 'fields' as an object"),
        (_header(index=1, count=2), InvalidField, "only frame 0 carries 'fields'"),
        (_header(type="gradients"), UnknownMessageType, "unknown binary message type"),
        (_header(fields={"run": 1}), InvalidField, "missing required field 'round'"),
        (
            _header(fields={**UPDATE_FIELDS, "round": True}),
            InvalidField,
            "'round' must be an integer, got boolean",
        ),
        (_header(fields={**UPDATE_FIELDS, "x": 1}), InvalidField, "unknown field.*'x'"),
        (
            _header(fields={**UPDATE_FIELDS, "metrics": {"m": _nested(MAX_JSON_DEPTH + 5)}}),
            InvalidField,
            "'metrics.m.*nests deeper than",
        ),
        (
            json.dumps(_header())
            .replace('"index": 0', '"index": ' + "[" * 900 + "]" * 900)
            .encode(),
            InvalidField,
            "'index' must be an integer, got array",
        ),
    ],
)
def test_invalid_headers_are_refused_with_the_right_code(header, error, match):
    frame = _frame(header, b"abc")

    with pytest.raises(error, match=match) as info:
        Reassembler().feed(frame)

    assert type(info.value) is error


def test_feed_refuses_non_bytes():
    with pytest.raises(MalformedFrame, match="binary frame must be bytes, got str"):
        Reassembler().feed("QRMB")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [{"max_message_bytes": 0}, {"max_frame_bytes": 9}, {"max_header_bytes": True}],
)
def test_reassembler_refuses_nonsensical_limits(kwargs):
    with pytest.raises(ValueError, match="max_"):
        Reassembler(**kwargs)


# ---------------------------------------------------------------------------------- fuzzing


@FUZZ
@given(frames=st.lists(st.binary(max_size=300), min_size=1, max_size=5))
def test_fuzz_arbitrary_bytes_only_raise_protocol_errors(frames):
    reassembler = Reassembler(max_frame_bytes=256)
    for frame in frames:
        try:
            result = reassembler.feed(frame)
        except ProtocolError:
            continue
        assert result is None or isinstance(result, BinaryMessage)


@FUZZ
@given(
    version=st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, 2, 255]),
    header=st.binary(max_size=120),
    chunk=st.binary(max_size=40),
    length_delta=st.sampled_from([0, 0, 0, -1, 1, -5, 1000]),
)
def test_fuzz_well_prefixed_frames_only_raise_protocol_errors(version, header, chunk, length_delta):
    frame = _frame(header, chunk, version=version, header_length=max(0, len(header) + length_delta))
    try:
        result = Reassembler().feed(frame)
    except ProtocolError:
        return
    assert isinstance(result, BinaryMessage | None)


_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=8)
)
_json_values = st.recursive(
    _json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=12,
)
_header_keys = ["type", "transfer", "index", "count", "size", "sha256", "fields", "extra"]
_header_values = st.one_of(
    _json_values,
    st.sampled_from(["update", "task", TRANSFER, OTHER_TRANSFER, "0" * 64, sha256_hex(b"ab")]),
    st.integers(min_value=0, max_value=4),
    st.just(dict(UPDATE_FIELDS)),
)


@FUZZ
@given(
    headers=st.lists(
        st.dictionaries(st.sampled_from(_header_keys), _header_values, max_size=8),
        min_size=1,
        max_size=3,
    ),
    chunks=st.lists(st.sampled_from([b"", b"a", b"ab", b"abc"]), min_size=3, max_size=3),
)
def test_fuzz_json_headers_only_raise_protocol_errors(headers, chunks):
    reassembler = Reassembler()
    for header, chunk in zip(headers, chunks, strict=False):
        raw = json.dumps(header, allow_nan=True).encode()
        try:
            result = reassembler.feed(_frame(raw, chunk))
        except ProtocolError:
            continue
        if result is not None:
            # Whatever got through is a complete, schema-valid message.
            assert result.payload == b"ab" and result.type in BINARY_SCHEMAS
            encode_binary(result)


@FUZZ
@given(text=st.text(max_size=200))
def test_fuzz_arbitrary_text_to_decode_control_only_raises_protocol_errors(text):
    try:
        result = decode_control(text, max_bytes=150)
    except ProtocolError:
        return
    assert isinstance(result, dict)


@FUZZ
@given(data=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_to_decode_control_only_raise_protocol_errors(data):
    try:
        decode_control(data)
    except ProtocolError:
        pass


_field_names = sorted({name for schema in CONTROL_SCHEMAS.values() for name in schema})
_field_values = st.one_of(
    _json_values,
    st.integers(min_value=0, max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=10),
    st.dictionaries(st.text(max_size=4), _json_values, max_size=3),
)


@FUZZ
@given(
    version=st.sampled_from([1, 1, 1, 2, True, "1", None]),
    msg_type=st.sampled_from([*CONTROL_SCHEMAS, "task", "bogus"]),
    fields=st.dictionaries(st.sampled_from([*_field_names, "extra"]), _field_values, max_size=5),
)
def test_fuzz_decode_control_accepts_exactly_what_encode_control_produces(
    version, msg_type, fields
):
    text = json.dumps({"v": version, "type": msg_type, **fields}, allow_nan=True)
    try:
        decoded = decode_control(text)
    except ProtocolError:
        return
    # Accepted: then the same fields encode without complaint and decode to the same message.
    body = {key: value for key, value in decoded.items() if key not in ("v", "type")}
    assert decode_control(encode_control(decoded["type"], **body)) == decoded


@FUZZ
@given(msg_type=st.sampled_from(sorted(CONTROL_SCHEMAS)), data=st.data())
def test_fuzz_valid_control_messages_round_trip(msg_type, data):
    value_for = {
        (int,): st.integers(min_value=0, max_value=2**63 - 1),
        (int, float): st.integers(min_value=0, max_value=2**40)
        | st.floats(allow_nan=False, allow_infinity=False),
        (str,): st.text(max_size=20),
        (dict,): st.dictionaries(st.text(max_size=4), _json_values.filter(_finite), max_size=3),
    }
    fields = {}
    for name, (types, required) in CONTROL_SCHEMAS[msg_type].items():
        if required or data.draw(st.booleans()):
            fields[name] = data.draw(value_for[types])

    decoded = decode_control(encode_control(msg_type, **fields))

    assert decoded == {"v": 1, "type": msg_type, **fields}


def _finite(value) -> bool:
    """Finite and within the signed 64-bit integer range, as the protocol requires."""
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return text is not None and _ints_fit(value)


def _ints_fit(value) -> bool:
    if isinstance(value, dict):
        return all(_ints_fit(item) for item in value.values())
    if isinstance(value, list):
        return all(_ints_fit(item) for item in value)
    return not isinstance(value, int) or -(2**63) <= value < 2**63


@FUZZ
@given(
    payload=st.binary(max_size=700),
    data=st.data(),
)
def test_fuzz_mutated_frames_are_refused_or_decode_identically(payload, data):
    msg = _update(payload)
    frames = encode_binary(msg, max_frame_bytes=400, transfer_id=TRANSFER)
    which = data.draw(st.integers(min_value=0, max_value=len(frames) - 1), label="frame")
    frame = frames[which]
    if data.draw(st.booleans(), label="flip (else truncate)"):
        position = data.draw(st.integers(min_value=0, max_value=len(frame) - 1), label="byte")
        bit = data.draw(st.integers(min_value=0, max_value=7), label="bit")
        mutated = bytearray(frame)
        mutated[position] ^= 1 << bit
        frames[which] = bytes(mutated)
        header_end = FRAME_PREFIX_BYTES + struct.unpack(">I", frame[5:9])[0]
        fields_start = frame.index(b',"fields":') if which == 0 else header_end
        in_fields = fields_start <= position < header_end
    else:
        cut = data.draw(st.integers(min_value=0, max_value=len(frame) - 1), label="cut")
        frames[which] = frame[:cut]
        in_fields = False

    reassembler = Reassembler(max_frame_bytes=400)
    delivered = []
    for mutated_frame in frames:
        try:
            result = reassembler.feed(mutated_frame)
        except ProtocolError:
            continue
        if result is not None:
            delivered.append(result)

    # The sha256 protects the payload; the header is protected only by validation (TLS guards
    # it in transit), so a flip inside frame 0's "fields" may yield other, still valid, fields.
    for result in delivered:
        assert result.type == msg.type and result.payload == msg.payload
        if not in_fields:
            assert result == msg
