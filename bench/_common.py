"""Shared helpers for the benchmarks: aligned tables on stdout and JSON under bench/results/.

Every benchmark prints its tables (what a person reads) and writes the same figures as JSON to
``bench/results/<name>.json`` (what a machine reads; the folder is not committed). The JSON holds
the machine it ran on, so figures from two machines are never compared by accident.

    from bench._common import Table, write_results
    t = Table("aggregation: fedavg", ["N", "P", "ours s", "Flower s", "speed-up"])
    t.row(20, 5_000_000, 0.081, 0.93, 11.5)
    t.print()
    write_results("aggregation", {"fedavg": t.records()})
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = Path(os.environ.get("QUORUM_BENCH_RESULTS", ROOT / "bench" / "results"))

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _fmt(value: Any) -> str:
    """Format one cell: floats with sensible precision, everything else with str()."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        if value == 0:
            return "0"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        if magnitude >= 0.01:
            return f"{value:.3f}"
        return f"{value:.2e}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


class Table:
    """A titled table of rows printed with aligned columns; rows are kept for the JSON."""

    def __init__(self, title: str, columns: Sequence[str]):
        self.title = title
        self.columns = list(columns)
        self.rows: list[list[Any]] = []
        self.notes: list[str] = []

    def row(self, *values: Any) -> None:
        """Append one row; it must have one value per column."""
        if len(values) != len(self.columns):
            raise ValueError(
                f"table {self.title!r}: row has {len(values)} values, columns are {self.columns}"
            )
        self.rows.append(list(values))

    def note(self, text: str) -> None:
        """A line printed under the table (what was skipped and why, what a bar means)."""
        self.notes.append(text)

    def records(self) -> list[dict[str, Any]]:
        """The rows as dicts keyed by column name (for JSON)."""
        return [dict(zip(self.columns, r, strict=True)) for r in self.rows]

    def render(self) -> str:
        """The table as text."""
        cells = [self.columns] + [[_fmt(v) for v in r] for r in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = [self.title]
        header = "  ".join(c.rjust(w) for c, w in zip(self.columns, widths, strict=True))
        lines.append(header)
        lines.append("-" * len(header))
        for r in cells[1:]:
            lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        lines.extend(f"  note: {n}" for n in self.notes)
        return "\n".join(lines)

    def print(self) -> None:
        """Print the table followed by a blank line."""
        print(self.render(), end="\n\n", flush=True)

    def as_json(self) -> dict[str, Any]:
        """Title, rows and notes, for write_results."""
        return {"title": self.title, "rows": self.records(), "notes": self.notes}


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def write_results(name: str, data: dict[str, Any]) -> Path:
    """Write ``data`` (tables via Table.as_json or plain values) to bench/results/<name>.json."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        **{k: (v.as_json() if isinstance(v, Table) else v) for k, v in data.items()},
    }
    path = RESULTS_DIR / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    print(f"results written to {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return path


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def bar(ok: bool) -> str:
    """'ok' or 'MISSED' for a bar column."""
    return "ok" if ok else "MISSED"
