"""The site's own count of the rounds it trained, per run: ``<state_dir>/rounds.json``.

Before a task's training starts, the agent claims its round: the round and attempt named in the
server's signed grant must come after the last one this site trained for that run, or the task is
refused as a replay (a proxy or a compromised server re-sending an old task). The file is written
to a temporary file, fsynced and renamed over the old one (then the folder is fsynced), so a
crash leaves either the old count or the new one, never a torn file, and a restart keeps it.

A damaged file fails closed: no task trains until the operator moves it aside.

The agent reserves a round (:meth:`RoundLog.reserve`: checked against the file and the
reservations of this process, which later claims see at once) and makes it durable while the
round trains; the update only leaves once the write is fsynced. A crash before then loses the
reservation, but also the update: nothing of that training was released.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROUNDS_FILE = "rounds.json"


class RoundLogError(ValueError):
    """rounds.json cannot be read (damaged); the agent trains nothing until it is fixed."""


class RoundReplayed(ValueError):
    """The task's round attempt is not after the last one this site trained for its run."""


@dataclass(frozen=True)
class TrainedRound:
    """The last round attempt of a run this site started training, and when."""

    round: int
    attempt: int
    at: str


class RoundLog:
    """Per run, the last round attempt this site started training (persisted, fsynced)."""

    def __init__(self, state_dir: Path):
        self.path = Path(state_dir) / ROUNDS_FILE
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        # Reserved rounds not yet written, by run id: every claim checks them too.
        self._pending: dict[str, dict[str, Any]] = {}

    def _read(self) -> dict[str, Any]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except OSError as exc:
            raise RoundLogError(f"cannot read {self.path}: {exc}") from exc
        try:
            data = json.loads(text)
            runs = data["runs"]
            for entry in runs.values():
                TrainedRound(**entry)
                if not isinstance(entry["round"], int) or not isinstance(entry["attempt"], int):
                    raise TypeError("round and attempt must be integers")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RoundLogError(
                f"{self.path} is damaged ({exc}); move it aside (keep it for the audit trail): "
                "the site then trains only rounds after those the server asks for next"
            ) from exc
        return runs

    def last(self, run: int) -> TrainedRound | None:
        """The last round attempt of ``run`` this site trained, if any."""
        with self._lock:
            entry = self._pending.get(str(run)) or self._read().get(str(run))
        return None if entry is None else TrainedRound(**entry)

    def claim(self, run: int, round: int, attempt: int) -> None:
        """Record that ``round``/``attempt`` of ``run`` trains now (fsynced before returning).

        Raises:
            RoundReplayed: this site already trained this round attempt or a later one.
            RoundLogError: the file is damaged.
            OSError: it cannot be written (nothing trains then).
        """
        self.reserve(run, round, attempt)()

    def reserve(self, run: int, round: int, attempt: int) -> Callable[[], None]:
        """Check and reserve ``round``/``attempt`` of ``run``; return what writes it (fsynced).

        A later claim or reservation of this process sees the reservation at once, written or
        not. The returned function raises OSError when the file cannot be written: the caller
        must then not release anything of the round.

        Raises:
            RoundReplayed: this site already trained (or reserved) this round attempt or a
                later one.
            RoundLogError: the file is damaged.
        """
        with self._lock:
            runs = self._read()
            entry = self._pending.get(str(run)) or runs.get(str(run))
            if entry is not None and (round, attempt) <= (entry["round"], entry["attempt"]):
                raise RoundReplayed(
                    f"run {run} round {round} (attempt {attempt}) is not after round "
                    f"{entry['round']} (attempt {entry['attempt']}), which this site already "
                    f"trained at {entry['at']}: a replayed task"
                )
            reserved = {
                "round": round,
                "attempt": attempt,
                "at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            self._pending[str(run)] = reserved

        def persist() -> None:
            with self._write_lock:  # writers in turn, each with every reservation so far
                try:
                    with self._lock:
                        runs = {**self._read(), **self._pending}
                    self._write({"runs": runs})
                finally:
                    # Written, or not at all: then nothing of the round may leave, and the same
                    # task asked again is tried again rather than refused as a replay.
                    with self._lock:
                        if self._pending.get(str(run)) is reserved:
                            del self._pending[str(run)]

        return persist

    def _write(self, data: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, sort_keys=True, indent=1)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        folder = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
