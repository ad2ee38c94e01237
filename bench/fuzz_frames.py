"""Fuzz the wire protocol's decoders with structured mutations of valid frames (issue 6, part 5).

Starts from valid control frames (every type in CONTROL_SCHEMAS) and valid binary "QRMB" frames
(every type in BINARY_SCHEMAS, single and chunked), mutates them (truncations, bit flips, wrong
header lengths, huge declared sizes, bad JSON, wrong types, unknown and missing fields, chunk
sequences out of order, duplicated, interleaved or with inconsistent totals), and feeds them to
``fedcore.protocol.decode_control`` and ``fedcore.protocol.Reassembler``. Every input must either
decode or raise a ``ProtocolError`` whose code is in ``ERROR_CODES``: anything else is a crash.
The reassembler must also never hold more than its declared-size limit.

    .venv/bin/python bench/fuzz_frames.py                 # 120,000 frames (the issue's bar: 100k)
    .venv/bin/python bench/fuzz_frames.py --quick         # 5,000 frames
    .venv/bin/python bench/fuzz_frames.py --frames 1000000 --seed 7

Exit status 1 on any crash; the first few crashing inputs are printed. tests/unit/test_fuzz_frames.py
runs the same generator on a few thousand frames in CI.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import random
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench._common import Table, bar, write_results  # noqa: E402
from fedcore import protocol  # noqa: E402
from fedcore.protocol import (  # noqa: E402
    CONTROL_SCHEMAS,
    ERROR_CODES,
    FRAME_MAGIC,
    PROTOCOL_VERSION,
    BinaryMessage,
    ProtocolError,
    Reassembler,
)

BAR_FRAMES = 100_000
# Small limits, so the limit paths are reached without allocating megabytes per case.
MAX_CONTROL_BYTES = 4096
MAX_FRAME_BYTES = 2048
MAX_HEADER_BYTES = 1536
MAX_MESSAGE_BYTES = 64 << 10
SPOOL_THRESHOLD = 1000  # half the reassemblers spool payloads from this size on

PLAN = {
    "model": {"kind": "mlp", "hidden": [8], "activation": "relu"},
    "schema": {"columns": [{"name": "age", "type": "numeric"}], "target": {"column": "y"}},
    "evaluation": {"test_fraction": 0.2, "seed": 0},
}
GRANT = {"payload": {"v": 1, "run": 3, "silo": "icu"}, "signature": "c2ln", "key": "ed25519:AA"}
CONTROL_EXAMPLES: dict[str, dict[str, Any]] = {
    "hello": {"agent_version": "0.1.0", "site": "St Elsewhere", "capabilities": {"dp": True}},
    "welcome": {"silo": "icu", "silo_id": 7, "consortium": "north", "heartbeat_seconds": 15},
    "heartbeat": {"ts": 1718000000.25, "state": "idle"},
    "heartbeat_ack": {"ts": 1718000000},
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
    "stats": {"run": 3, "stats": {"n": 120, "columns": {"age": {"count": 120, "mean": 51.5}}}},
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
    },
}
BINARY_EXAMPLES: dict[str, dict[str, Any]] = {
    "task": {
        "run": 3,
        "round": 1,
        "rounds": 20,
        "plan_hash": "ab" * 32,
        "plan": PLAN,
        "preprocessing": {"means": {"age": 50.1}},
        "deadline": 1718000120.5,
        "authorization": GRANT,
    },
    "update": {
        "run": 3,
        "round": 1,
        "nonce": "9f" * 16,
        "num_examples": 480,
        "metrics": {"train_loss": 0.41},
        "silo": "icu",
        "privacy": {},
        "fairness": {},
    },
    "masked_update": {
        "run": 3,
        "round": 1,
        "attempt": 2,
        "nonce": "9f" * 16,
        "num_examples": 480,
        "metrics": {"loss": 0.4},
    },
}


def _nested(depth: int) -> list[Any]:
    """A list nested ``depth`` levels deep."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


# Values of every JSON kind, including the awkward ones: booleans where ints go, huge ints,
# floats where ints go, lone surrogates, deep nesting, NaN-like strings.
ODD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    1 << 63,
    (1 << 63) - 1,
    10**40,
    1.5,
    -0.0,
    1e308,
    "",
    "x" * 300,
    "\ud800",
    "NaN",
    [],
    [1, 2],
    {},
    {"a": None},
    {"\udc00": 1},
    _nested(40),
]
BAD_JSON: list[str] = [
    "",
    "{",
    "}",
    "[]",
    "null",
    '"hello"',
    "1",
    '{"v": 1, "type": "hello", "agent_version": "1",}',
    '{"v": 1, "v": 1, "type": "hello", "agent_version": "1"}',
    '{"v": NaN, "type": "hello"}',
    '{"v": 1, "type": "heartbeat", "ts": Infinity}',
    '{"v": 1, "type": "heartbeat", "ts": -Infinity}',
    '{"v": 1, "type": "heartbeat", "ts": 1e999}',
    '{"v": 1, "type": "heartbeat", "ts": ' + "9" * 5000 + "}",
    '{"v": 1, "type": "hello", "agent_version": "\\ud800"}',
    '{"v": 1, "type": "hello", "agent_version": "1", "capabilities": '
    + "[" * 3000
    + "]" * 3000
    + "}",
    '{"v": 1, "type": "hello", "agent_version": "1", "capabilities": '
    + '{"a":' * 40
    + "1"
    + "}" * 40
    + "}",
    "\ufeff{}",
    '{"v": 1}',
    '{"type": "hello"}',
    '{"v": true, "type": "hello", "agent_version": "1"}',
    '{"v": 1.0, "type": "hello", "agent_version": "1"}',
    '{"v": 2, "type": "hello", "agent_version": "1"}',
    '{"v": 1, "type": ["hello"], "agent_version": "1"}',
    '{"v": 1, "type": "update", "run": 1}',
    '{"v": 1, "type": "hello", "agent_version": "1"}\x00',
    "\x00" * 10,
]


@dataclass
class Case:
    """One fuzz input: a control frame, or a sequence of binary frames for one reassembler."""

    mutation: str
    control: str | bytes | None = None
    frames: list[bytes] = field(default_factory=list)


@dataclass
class Outcome:
    """What the decoders did with the generated frames."""

    frames: int = 0
    cases: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    by_mutation: Counter[str] = field(default_factory=Counter)
    crashes: list[tuple[str, str, bytes | str]] = field(default_factory=list)
    crash_count: int = 0
    slowest_frame_s: float = 0.0
    max_buffered: int = 0
    leaked_fds: int = 0


# ------------------------------------------------------------------------------ control frames


def _control_text(msg_type: str, fields: dict[str, Any]) -> str:
    return json.dumps({"v": PROTOCOL_VERSION, "type": msg_type, **fields}, ensure_ascii=False)


def _flip_bits(rng: random.Random, data: bytes, flips: int) -> bytes:
    if not data:
        return bytes([rng.randrange(256)])
    buf = bytearray(data)
    for _ in range(flips):
        i = rng.randrange(len(buf))
        buf[i] ^= 1 << rng.randrange(8)
    return bytes(buf)


def _splice(rng: random.Random, data: bytes) -> bytes:
    """Delete, duplicate or insert a random run of bytes."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8)))
    i = rng.randrange(len(data))
    j = min(len(data), i + rng.randrange(1, 16))
    choice = rng.randrange(3)
    if choice == 0:
        return data[:i] + data[j:]
    if choice == 1:
        return data[:j] + data[i:j] + data[j:]
    return data[:i] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 8))) + data[i:]


def control_case(rng: random.Random) -> Case:
    """A mutated control frame."""
    msg_type = rng.choice(sorted(CONTROL_EXAMPLES))
    fields = json.loads(json.dumps(CONTROL_EXAMPLES[msg_type]))
    schema = CONTROL_SCHEMAS[msg_type]
    kind = rng.randrange(12)
    if kind == 0:
        return Case("control: valid", control=_control_text(msg_type, fields))
    if kind == 1:
        text = _control_text(msg_type, fields)
        return Case("control: truncated", control=text[: rng.randrange(len(text))])
    if kind == 2:
        raw = _control_text(msg_type, fields).encode()
        return Case("control: bit flips", control=_flip_bits(rng, raw, rng.randrange(1, 4)))
    if kind == 3:
        raw = _control_text(msg_type, fields).encode()
        return Case("control: spliced bytes", control=_splice(rng, raw))
    if kind == 4:
        return Case("control: bad JSON", control=rng.choice(BAD_JSON))
    if kind == 5:
        name = rng.choice(sorted(schema))
        fields[name] = rng.choice(ODD_VALUES)
        return Case("control: wrong type", control=_control_text(msg_type, fields))
    if kind == 6:
        fields[rng.choice(["extra", "v2", "__proto__", "silo", "payload"])] = rng.choice(ODD_VALUES)
        return Case("control: unknown field", control=_control_text(msg_type, fields))
    if kind == 7:
        if fields:
            del fields[rng.choice(sorted(fields))]
        return Case("control: missing field", control=_control_text(msg_type, fields))
    if kind == 8:
        envelope = {"v": rng.choice([None, 0, 2, "1", 1.0, True, 1]), "type": msg_type}
        if rng.random() < 0.5:
            envelope["type"] = rng.choice(["", "HELLO", "update", "task", None, 7, "x" * 100])
        if rng.random() < 0.3:
            envelope.pop(rng.choice(["v", "type"]))
        return Case("control: bad envelope", control=json.dumps({**envelope, **fields}))
    if kind == 9:
        pad = "x" * (MAX_CONTROL_BYTES + rng.randrange(1, 64))
        fields = {"agent_version": pad}
        text = _control_text("hello", fields)
        return Case("control: oversized", control=text if rng.random() < 0.5 else text.encode())
    if kind == 10:
        # Multi-byte characters near the byte limit: the limit counts UTF-8 bytes, not chars.
        n = MAX_CONTROL_BYTES // 3 + rng.randrange(-40, 40)
        return Case(
            "control: multibyte near limit",
            control=_control_text("hello", {"agent_version": "€" * n}),
        )
    raw = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 64)))
    return Case(
        "control: random bytes", control=raw if rng.random() < 0.5 else raw.decode("latin-1")
    )


# ------------------------------------------------------------------------------- binary frames


def _valid_frames(rng: random.Random, msg_type: str | None = None) -> list[bytes]:
    msg_type = msg_type or rng.choice(sorted(BINARY_EXAMPLES))
    size = rng.choice([0, 1, 7, 100, 1000, 3000, 6000])
    payload = rng.randbytes(size)
    message = BinaryMessage(type=msg_type, fields=dict(BINARY_EXAMPLES[msg_type]), payload=payload)
    return protocol.encode_binary(message, max_frame_bytes=rng.choice([MAX_FRAME_BYTES, 1024, 700]))


def _split_frame(frame: bytes) -> tuple[dict[str, Any], bytes]:
    (length,) = struct.unpack(">I", frame[5:9])
    return json.loads(frame[9 : 9 + length]), frame[9 + length :]


def _build(
    header: Any,
    chunk: bytes,
    *,
    raw: bytes | None = None,
    length: int | None = None,
    magic: bytes = FRAME_MAGIC,
    version: int = PROTOCOL_VERSION,
) -> bytes:
    body = raw if raw is not None else json.dumps(header).encode("utf-8", "surrogatepass")
    declared = len(body) if length is None else length
    return magic + struct.pack(">BI", version, declared) + body + chunk


def _mutate_header(rng: random.Random, header: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    header = dict(header)
    choice = rng.randrange(10)
    if choice == 0:
        key = rng.choice(["type", "transfer", "index", "count", "size", "sha256", "fields"])
        header[key] = rng.choice(ODD_VALUES)
        return "binary: header wrong type", header
    if choice == 1:
        key = rng.choice(["type", "transfer", "index", "count", "size", "sha256", "fields"])
        header.pop(key, None)
        return "binary: header missing key", header
    if choice == 2:
        header[rng.choice(["extra", "chunk", "v"])] = rng.choice(ODD_VALUES)
        return "binary: header unknown key", header
    if choice == 3:
        header["size"] = rng.choice([MAX_MESSAGE_BYTES + 1, 1 << 40, (1 << 63) - 1, 1 << 63])
        return "binary: huge declared size", header
    if choice == 4:
        header["count"] = rng.choice([0, 2, 1000, header["size"] + 2, (1 << 63) - 1])
        return "binary: inconsistent count", header
    if choice == 5:
        header["index"] = rng.choice([1, header["count"], header["count"] + 5, (1 << 63) - 1])
        return "binary: bad index", header
    if choice == 6:
        header["size"] = max(0, header["size"] + rng.choice([-1, 1, 100, -100]))
        return "binary: wrong size", header
    if choice == 7:
        header["transfer"] = rng.choice(["", "A" * 32, "0" * 31, "g" * 32, "0" * 33])
        header["sha256"] = rng.choice([header["sha256"], "0" * 64, "AB" * 32])
        return "binary: bad ids", header
    if choice == 8:
        if isinstance(header.get("fields"), dict):
            fields = dict(header["fields"])
            name = rng.choice(sorted(fields) + ["unknown"])
            if rng.random() < 0.3 and name in fields:
                del fields[name]
            else:
                fields[name] = rng.choice(ODD_VALUES)
            header["fields"] = fields
        return "binary: bad fields", header
    header["type"] = rng.choice(["hello", "", "UPDATE", "task ", "masked_update"])
    return "binary: unknown type", header


def binary_case(rng: random.Random) -> Case:
    """A sequence of binary frames: one valid message with one thing broken."""
    frames = _valid_frames(rng)
    kind = rng.randrange(18)  # 7 and 14-17: header mutations, the richest family
    if kind == 0:
        return Case("binary: valid", frames=frames)
    i = rng.randrange(len(frames))
    frame = frames[i]
    if kind == 1:
        frames[i] = frame[: rng.randrange(len(frame))]
        return Case("binary: truncated", frames=frames[: i + 1])
    if kind == 2:
        frames[i] = _flip_bits(rng, frame, rng.randrange(1, 4))
        return Case("binary: bit flips", frames=frames)
    if kind == 3:
        frames[i] = _splice(rng, frame)
        return Case("binary: spliced bytes", frames=frames)
    header, chunk = _split_frame(frame)
    raw = json.dumps(header).encode()
    if kind == 4:
        length = rng.choice([0, 1, len(raw) - 1, len(raw) + 1, len(raw) + 1000, 2**32 - 1])
        frames[i] = _build(header, chunk, raw=raw, length=length)
        return Case("binary: wrong header length", frames=frames[: i + 1])
    if kind == 5:
        magic = rng.choice([b"QRMA", b"qrmb", b"\x00\x00\x00\x00", b"RMBQ"])
        version = rng.choice([PROTOCOL_VERSION, 0, 2, 255])
        frames[i] = _build(header, chunk, raw=raw, magic=magic, version=version)
        return Case("binary: bad magic or version", frames=frames[: i + 1])
    if kind == 6:
        bad = rng.choice(BAD_JSON).encode("utf-8", "surrogatepass")
        frames[i] = _build(None, chunk, raw=bad)
        return Case("binary: header bad JSON", frames=frames[: i + 1])
    if kind == 7 or kind >= 14:
        mutation, header = _mutate_header(rng, header)
        try:
            frames[i] = _build(header, chunk)
        except (TypeError, ValueError):  # a value json.dumps refuses: send it raw
            frames[i] = _build(None, chunk, raw=repr(header).encode("utf-8", "surrogatepass"))
        return Case(mutation, frames=frames[: i + 1])
    if kind == 8:
        frames[i] = frame + rng.randbytes(rng.randrange(1, 50))
        return Case("binary: extra payload bytes", frames=frames)
    if kind == 9:
        if len(frames) > 1:
            rng.shuffle(frames)
        else:
            frames = frames * 2
        return Case("binary: chunks out of order / duplicated", frames=frames)
    if kind == 10:
        if len(frames) > 1:
            del frames[rng.randrange(len(frames))]
        other = _valid_frames(rng)
        return Case("binary: chunk dropped / next transfer", frames=frames + other)
    if kind == 11:
        other = _valid_frames(rng)
        mixed = [f for pair in zip(frames, other, strict=False) for f in pair]
        return Case("binary: interleaved transfers", frames=mixed)
    if kind == 12:
        # Later frames contradict frame 0 (total, count or checksum): the Reassembler's totals.
        if len(frames) > 1:
            j = rng.randrange(1, len(frames))
            h, c = _split_frame(frames[j])
            key = rng.choice(["size", "count", "sha256", "type"])
            h[key] = {
                "size": h["size"] + 1,
                "count": h["count"] + 1,
                "sha256": "0" * 64,
                "type": "task" if h["type"] != "task" else "update",
            }[key]
            frames[j] = _build(h, c)
            return Case("binary: inconsistent totals", frames=frames)
        h, c = _split_frame(frames[0])
        frames[0] = _build(h, c[:-1] if c else b"z")
        return Case("binary: inconsistent totals", frames=frames)
    # kind 13
    frames[i] = frame + b"\x00" * (MAX_FRAME_BYTES - len(frame) + rng.randrange(1, 100))
    return Case("binary: oversized frame", frames=frames[: i + 1])


def generate(rng: random.Random) -> Iterator[Case]:
    """Endless fuzz cases, about half control and half binary."""
    while True:
        yield control_case(rng) if rng.random() < 0.45 else binary_case(rng)


# ---------------------------------------------------------------------------------- the driver


def _crash(outcome: Outcome, mutation: str, data: bytes | str, exc: BaseException) -> None:
    outcome.crash_count += 1
    if len(outcome.crashes) < 5:
        detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
        outcome.crashes.append((mutation, detail, data))


def _check_error(exc: ProtocolError) -> str | None:
    """Why a protocol error is not a proper typed error, or None."""
    if exc.code not in ERROR_CODES:
        return f"code {exc.code!r} not in ERROR_CODES"
    if not str(exc):
        return "empty message"
    return None


def _buffered(reassembler: Reassembler) -> int:
    transfer = getattr(reassembler, "_transfer", None)
    return int(getattr(transfer, "received", 0) or 0)


def run_case(case: Case, outcome: Outcome, *, reassembler: Reassembler | None = None) -> None:
    """Feed one case to the decoder it targets, recording codes, crashes and timings."""
    outcome.cases += 1
    outcome.by_mutation[case.mutation] += 1
    if case.control is not None:
        outcome.frames += 1
        _feed(
            outcome,
            case.mutation,
            case.control,
            lambda: protocol.decode_control(case.control, max_bytes=MAX_CONTROL_BYTES),
        )
        return
    reassembler = reassembler or new_reassembler()
    for frame in case.frames:
        outcome.frames += 1
        _feed(outcome, case.mutation, frame, lambda frame=frame: reassembler.feed(frame))
        buffered = _buffered(reassembler)
        outcome.max_buffered = max(outcome.max_buffered, buffered)
        if buffered > MAX_MESSAGE_BYTES:
            _crash(
                outcome,
                case.mutation,
                frame,
                AssertionError(
                    f"reassembler holds {buffered} bytes, above its {MAX_MESSAGE_BYTES}-byte limit"
                ),
            )


def _feed(outcome: Outcome, mutation: str, data: bytes | str, call: Callable[[], Any]) -> None:
    start = time.perf_counter()
    try:
        result = call()
    except ProtocolError as exc:
        problem = _check_error(exc)
        if problem:
            _crash(outcome, mutation, data, AssertionError(problem))
        outcome.by_code[exc.code] += 1
    except Exception as exc:  # noqa: BLE001 - anything untyped is exactly what we look for
        _crash(outcome, mutation, data, exc)
        outcome.by_code["CRASH"] += 1
    else:
        if result is None or isinstance(result, dict):
            outcome.by_code["accepted" if result is not None else "accepted (chunk)"] += 1
        else:
            spooled = getattr(protocol, "spooled_file", lambda payload: None)(result.payload)
            outcome.by_code["accepted (spooled)" if spooled else "accepted"] += 1
    outcome.slowest_frame_s = max(outcome.slowest_frame_s, time.perf_counter() - start)


def new_reassembler(spool_dir: str | None = None) -> Reassembler:
    """A reassembler with the fuzzer's small limits; with ``spool_dir`` (if this version of the
    Reassembler spools), payloads of SPOOL_THRESHOLD bytes or more go to anonymous files."""
    extra: dict[str, Any] = {}
    if spool_dir is not None and "spool_dir" in inspect.signature(Reassembler).parameters:
        extra = {"spool_dir": spool_dir, "spool_threshold": SPOOL_THRESHOLD}
    return Reassembler(
        max_message_bytes=MAX_MESSAGE_BYTES,
        max_frame_bytes=MAX_FRAME_BYTES,
        max_header_bytes=MAX_HEADER_BYTES,
        **extra,
    )


def open_fds() -> int:
    """File descriptors this process holds (spool files must not leak)."""
    return len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else 0


def fuzz(frames: int, seed: int = 0) -> Outcome:
    """Generate and feed at least ``frames`` frames. A share goes to long-lived reassemblers
    (state carried across cases, as on a real connection), half of them spooling to files."""
    rng = random.Random(seed)
    outcome = Outcome()
    gc.collect()
    fds_before = open_fds()
    with tempfile.TemporaryDirectory(prefix="quorum-fuzz-") as spool:
        shared = [new_reassembler(), new_reassembler(spool)]
        for case in generate(rng):
            if outcome.frames >= frames:
                break
            pick = rng.random()
            if pick < 0.3:
                reassembler = shared[int(pick < 0.15)]
            else:
                reassembler = new_reassembler(spool if pick < 0.65 else None)
            run_case(case, outcome, reassembler=reassembler)
        for reassembler in shared:
            reassembler.reset()
        del shared, reassembler
        gc.collect()
        outcome.leaked_fds = open_fds() - fds_before
        if outcome.leaked_fds > 0:
            _crash(
                outcome,
                "spool files",
                b"",
                AssertionError(
                    f"{outcome.leaked_fds} file descriptors left open after every case ended"
                ),
            )
    return outcome


def _show(data: bytes | str) -> str:
    text = repr(data)
    return text if len(text) <= 300 else text[:300] + f"... ({len(data)} long)"


def main(argv: list[str] | None = None) -> int:
    """Run the fuzzer, print the tables, write bench/results/fuzz_frames.json."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=120_000, help="frames to generate")
    parser.add_argument("--quick", action="store_true", help="5,000 frames (a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    frames = 5_000 if args.quick else args.frames

    started = time.perf_counter()
    outcome = fuzz(frames, args.seed)
    elapsed = time.perf_counter() - started

    codes = Table(
        f"fuzz_frames: outcomes of {outcome.frames:,} frames (seed {args.seed})",
        ["outcome", "frames", "share %"],
    )
    for code, count in outcome.by_code.most_common():
        codes.row(code, count, 100.0 * count / outcome.frames)
    codes.print()
    mutations = Table("fuzz_frames: cases by mutation", ["mutation", "cases"])
    for mutation, count in sorted(outcome.by_mutation.items()):
        mutations.row(mutation, count)
    mutations.print()
    ok_frames = outcome.frames >= BAR_FRAMES
    summary = Table(
        "fuzz_frames: bar (>= 100,000 frames, zero crashes)",
        [
            "frames",
            "cases",
            "crashes",
            "seconds",
            "frames/s",
            "slowest frame ms",
            "max buffered B",
            "bar",
        ],
    )
    summary.row(
        outcome.frames,
        outcome.cases,
        outcome.crash_count,
        elapsed,
        outcome.frames / elapsed,
        1000 * outcome.slowest_frame_s,
        outcome.max_buffered,
        bar(outcome.crash_count == 0 and ok_frames),
    )
    if not ok_frames:
        summary.note(f"only {outcome.frames:,} frames: the bar needs {BAR_FRAMES:,} (--frames)")
    summary.note(
        f"spooling reassemblers (payloads >= {SPOOL_THRESHOLD} B to anonymous files): "
        f"{outcome.leaked_fds} file descriptors leaked"
    )
    summary.note(
        f"limits: control {MAX_CONTROL_BYTES} B, frame {MAX_FRAME_BYTES} B, header "
        f"{MAX_HEADER_BYTES} B, message {MAX_MESSAGE_BYTES} B"
    )
    summary.print()
    for mutation, detail, data in outcome.crashes:
        print(f"CRASH in {mutation}: {detail}\n  input: {_show(data)}")
    write_results(
        "fuzz_frames",
        {
            "frames": outcome.frames,
            "seed": args.seed,
            "crashes": outcome.crash_count,
            "crash_examples": [
                {"mutation": m, "error": d, "input": _show(x)} for m, d, x in outcome.crashes
            ],
            "outcomes": codes,
            "mutations": mutations,
            "summary": summary,
        },
    )
    return 1 if outcome.crash_count else 0


if __name__ == "__main__":
    sys.exit(main())
