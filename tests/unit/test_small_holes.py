"""Issue 13's smaller holes that need no server: JSON numbers out of range, log escaping, the
per-silo report budget."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import pytest

from config.files import private_sqlite
from fedcore import protocol
from fedcore.logsafe import EscapingFormatter, escape_control
from federation.storage import FilesystemBlobStore
from federation.throttle import SiloReportBudget


@pytest.mark.parametrize(
    "number", ["1" + "0" * 400, "-" + "9" * 20, str(1 << 63), "1" + "0" * 5000]
)
def test_integers_beyond_64_bits_are_refused_anywhere_in_a_frame(number: str) -> None:
    for text in (
        '{"v":1,"type":"heartbeat","ts":NUMBER}'.replace("NUMBER", number),
        '{"v":1,"type":"stats","run":1,"stats":{"rows":[1,2,NUMBER]}}'.replace("NUMBER", number),
    ):
        with pytest.raises(protocol.MalformedFrame, match="outside the signed 64-bit range"):
            protocol.decode_control(text)


def test_the_64_bit_edges_and_big_floats_still_parse() -> None:
    text = '{"v":1,"type":"stats","run":1,"stats":{"a":MAX,"b":MIN,"c":1e300}}'
    text = text.replace("MAX", str((1 << 63) - 1)).replace("MIN", str(-(1 << 63)))
    assert protocol.decode_control(text)["stats"] == {
        "a": (1 << 63) - 1,
        "b": -(1 << 63),
        "c": 1e300,
    }


def test_control_characters_are_escaped_and_plain_text_is_left_alone() -> None:
    assert escape_control("plain text, ünïcode ✓") == "plain text, ünïcode ✓"
    assert escape_control("a\nb\r\tc\x00\x1b\x85\u2028") == "a\\nb\\r\\tc\\x00\\x1b\\x85\\u2028"


def test_a_logged_reason_with_a_newline_stays_on_one_line_but_tracebacks_keep_theirs() -> None:
    formatter = EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord(
        "quorum.agent_ws",
        logging.WARNING,
        __file__,
        1,
        "silo %s reports: %s",
        ("s1", "x\n2026-12-05 19:00:00,000 CRITICAL forged"),
        None,
    )
    assert formatter.format(record) == (
        "WARNING quorum.agent_ws: silo s1 reports: x\\n2026-12-05 19:00:00,000 CRITICAL forged"
    )
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record.exc_info = sys.exc_info()
    assert "\nTraceback" in formatter.format(record)


def test_the_report_budget_grants_a_burst_then_refills_and_summarises_per_window() -> None:
    now = [0.0]
    budget = SiloReportBudget(burst=3, per_minute=60.0, window=10.0, clock=lambda: now[0])
    assert [budget.take(1, "internal")[0] for _ in range(5)] == [True, True, True, False, False]
    assert budget.take(2, "internal") == (True, None)  # another silo has its own bucket
    now[0] = 1.0  # one token back
    assert budget.take(1, "internal") == (True, None)
    now[0] = 1.5
    assert budget.take(1, "malformed") == (False, None)
    now[0] = 10.5  # a window after the first suppressed frame: the summary is due
    budget._buckets[1].tokens = 0.0
    budget._buckets[1].updated = 10.5
    write, summary = budget.take(1, "internal")
    assert not write and summary is not None
    assert summary["suppressed"] == 4 and summary["codes"] == {"internal": 3, "malformed": 1}
    assert budget.flush(1) is None  # nothing pending any more


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_sqlite_database_is_created_0600_in_a_0700_folder(tmp_path: Path) -> None:
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    (old / "quorum.sqlite3-wal").write_bytes(b"")
    (old / "quorum.sqlite3-wal").chmod(0o644)
    for home in (tmp_path / "new" / "var", old):
        database = private_sqlite(home / "quorum.sqlite3")
        sqlite3.connect(database).execute("create table t (x)").connection.commit()
        assert _mode(home) == 0o700
        assert _mode(database) == 0o600
    assert _mode(old / "quorum.sqlite3-wal") == 0o600  # left by an older version: narrowed


def test_blobs_are_0600_in_0700_folders(tmp_path: Path) -> None:
    store = FilesystemBlobStore(tmp_path / "blobs")
    store.put("runs/1/models/v1.safetensors", b"weights")
    folders = [tmp_path / "blobs", tmp_path / "blobs/runs", tmp_path / "blobs/runs/1/models"]
    assert [_mode(folder) for folder in folders] == [0o700] * 3
    assert _mode(tmp_path / "blobs/runs/1/models/v1.safetensors") == 0o600
    assert store.get("runs/1/models/v1.safetensors") == b"weights"
