"""The frame fuzzer of bench/fuzz_frames.py, bounded for CI: structured mutations of valid control
and binary frames only ever decode or raise a typed ProtocolError (the bench runs >= 100,000)."""

from __future__ import annotations

import random

import pytest

from bench import fuzz_frames
from fedcore import protocol
from fedcore.protocol import ERROR_CODES


def test_thousands_of_mutated_frames_only_raise_typed_protocol_errors() -> None:
    outcome = fuzz_frames.fuzz(4000, seed=11)

    assert outcome.crash_count == 0, outcome.crashes
    assert outcome.frames >= 4000
    codes = set(outcome.by_code) - {"accepted", "accepted (chunk)", "accepted (spooled)"}
    assert codes <= set(ERROR_CODES)
    # The mutations reach every decoder check they are meant to reach, and valid frames pass.
    for code in (
        "malformed",
        "truncated",
        "oversized",
        "unsupported_version",
        "unknown_type",
        "invalid_field",
        "checksum_mismatch",
        "chunk_sequence",
        "accepted",
    ):
        assert outcome.by_code[code] > 0, code
    assert outcome.max_buffered <= fuzz_frames.MAX_MESSAGE_BYTES
    assert outcome.leaked_fds <= 0  # spool files are closed with their transfers


def test_every_mutation_family_is_generated() -> None:
    rng = random.Random(0)
    cases = [next(fuzz_frames.generate(rng)) for _ in range(3000)]
    names = {case.mutation for case in cases}
    assert {
        "control: bad JSON",
        "binary: huge declared size",
        "binary: inconsistent totals",
        "binary: interleaved transfers",
        "binary: oversized frame",
    } <= names


def test_an_untyped_exception_counts_as_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(text: object, **_: object) -> None:
        raise KeyError("type")

    monkeypatch.setattr(protocol, "decode_control", broken)
    outcome = fuzz_frames.Outcome()
    fuzz_frames.run_case(fuzz_frames.Case("control: valid", control="{}"), outcome)

    assert outcome.crash_count == 1 and outcome.by_code["CRASH"] == 1
    assert "KeyError" in outcome.crashes[0][1]


def test_a_protocol_error_with_an_unknown_code_counts_as_a_crash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Odd(protocol.ProtocolError):
        code = "no_such_code"

    def broken(text: object, **_: object) -> None:
        raise Odd("odd")

    monkeypatch.setattr(protocol, "decode_control", broken)
    outcome = fuzz_frames.Outcome()
    fuzz_frames.run_case(fuzz_frames.Case("control: valid", control="{}"), outcome)

    assert outcome.crash_count == 1


def test_the_bench_exits_non_zero_on_a_crash(
    monkeypatch: pytest.MonkeyPatch, tmp_path: object
) -> None:
    monkeypatch.setenv("QUORUM_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(fuzz_frames, "write_results", lambda *a, **k: None)
    assert fuzz_frames.main(["--frames", "300"]) == 0

    def broken(frame: object) -> None:
        raise IndexError("boom")

    monkeypatch.setattr(protocol.Reassembler, "feed", lambda self, frame: broken(frame))
    assert fuzz_frames.main(["--frames", "300"]) == 1
