"""What the site keeps about its dealings with the server, in ``[agent] state_dir``.

- ``offers.json``: the plans the server offered this site (``plan_offer``), by plan hash.
  Rewritten whole, atomically (temp file + rename), so a crash never leaves half a file.
- ``decisions.jsonl``: the site operator's ``approve`` / ``reject`` decisions. Append-only, one
  JSON object a line; the latest line for a hash wins, earlier ones stay as history.
- ``sent.jsonl``: one line per message that left the site carrying anything derived from local
  data (``stats``, ``update``, ``error``). Append-only, flushed and fsynced before the message is
  sent: what a site shows an auditor, and what the privacy budget is summed from.

The ``epsilon`` of a sent-log line is the privacy budget that message added: for the update of a
DP plan, the run's cumulative epsilon at this site after it minus before it (the accountant
composes a run's rounds, so per-round epsilons would not add up); 0.0 for everything else and
for a re-send of weights already logged (same payload sha256: nothing new left the site). So the
log's epsilon summed over a run is the run's epsilon at this site, equal to the last cumulative
``epsilon`` its updates reported, and summed over the whole log is the site's total (runs add
up: basic composition). The number of DP rounds a run has released, which its next cumulative
epsilon builds on, is also read from here (:func:`released_updates`): it survives restarts.

The running agent writes offers and the sent log; the ``quorum-agent`` CLI appends decisions. They
never write the same file, so no lock is needed between the two processes.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

OFFERS_FILE = "offers.json"
DECISIONS_FILE = "decisions.jsonl"
SENT_FILE = "sent.jsonl"

APPROVED = "approved"
REJECTED = "rejected"
DECISIONS = (APPROVED, REJECTED)
MIN_PREFIX_CHARS = 8  # shortest plan hash prefix the CLI accepts
SHORT_HASH_CHARS = 12  # how plan hashes are shown in tables and log lines
# offers.json is written by what the server sends: bounded, so a server (or whoever holds its key)
# cannot fill the site's disk. Past MAX_OFFERS the oldest received are forgotten (logged); an
# offer whose plan is larger than MAX_OFFER_BYTES is not stored. The server re-sends the offers
# that still matter at every connect.
MAX_OFFERS = 200
# Server statuses of an offer that may still run; the others (withdrawn, rejected, superseded by
# a new version) update a stored offer: the plan will not run under that hash.
OPEN_OFFER_STATUSES = frozenset({"submitted", "approved"})
MAX_OFFER_BYTES = 256 << 10

_HEX64 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"[0-9a-f]+")


class RecordsError(Exception):
    """A state file is unreadable, or a plan hash given by the operator is unusable."""


class OfferRefused(ValueError):
    """A plan offer is not stored (too large)."""


def utc_now() -> str:
    """The current time as ISO 8601 in UTC, to the millisecond."""
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def short_hash(plan_hash: str | None) -> str:
    """The first SHORT_HASH_CHARS characters of a plan hash, or ``-``."""
    return plan_hash[:SHORT_HASH_CHARS] if plan_hash else "-"


@dataclass(frozen=True)
class Decision:
    """One line of decisions.jsonl: the operator approved or rejected a plan hash."""

    time: str
    plan_hash: str
    decision: str  # APPROVED or REJECTED
    reason: str
    operator: str


def _plan_summary(plan: Mapping[str, Any]) -> tuple[str, str]:
    """(model kind, privacy mode) of a plan, for display; ``?`` where the plan is malformed."""
    model = plan.get("model")
    kind = model.get("kind") if isinstance(model, Mapping) else None
    privacy = plan.get("privacy", {})
    mode = privacy.get("mode", "none") if isinstance(privacy, Mapping) else None
    return (kind if isinstance(kind, str) else "?", mode if isinstance(mode, str) else "?")


CANDIDATES_SHOWN = 10  # offered plans an error about an unusable hash prefix lists


def _newest(offers: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """Offered plan hashes, most recently received first."""
    return sorted(offers, key=lambda h: str(offers[h].get("received_at", "")), reverse=True)


def _candidates(offers: Mapping[str, Mapping[str, Any]], hashes: list[str]) -> str:
    """Offered plans named for an operator choosing one: hash, name, version, server status."""
    shown = [
        f"{h} ({offers[h].get('name')!r} v{offers[h].get('version')}, {offers[h].get('status')})"
        for h in hashes[:CANDIDATES_SHOWN]
    ]
    more = len(hashes) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more > 0 else "")


def append_line(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line to ``path`` (O_APPEND, created 0600) and fsync it.

    One ``write`` per line: with O_APPEND the kernel places it at the end of the file even when
    two processes append at once.
    """
    line = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"
    data = line.encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(f"{path}: short write ({written} of {len(data)} bytes); disk full?")
        os.fsync(fd)
    finally:
        os.close(fd)


def read_lines(path: Path) -> list[dict[str, Any]]:
    """The JSON objects of a .jsonl file, in order; [] when it does not exist.

    Raises:
        RecordsError: a line is not a JSON object (naming the file and line).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as exc:
        raise RecordsError(f"{path}: cannot read: {exc}") from None
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise RecordsError(f"{path}: line {number} is not a JSON object")
        records.append(record)
    return records


class SiteRecords:
    """The files in the state directory: plan offers, local decisions and the sent log.

    Thread-safe: the agent writes from worker threads. Reads go to the files every time (they
    are small), so a decision made with the CLI counts at the agent's next request.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        max_offers: int = MAX_OFFERS,
        max_offer_bytes: int = MAX_OFFER_BYTES,
    ):
        """Args:
        state_dir: ``[agent] state_dir``; created (0700) on the first write.
        max_offers: offers kept in offers.json; the oldest received are evicted past it.
        max_offer_bytes: largest plan (compact JSON) an offer may carry to be stored.
        """
        self.max_offers = max_offers
        self.max_offer_bytes = max_offer_bytes
        self.state_dir = state_dir
        self.offers_path = state_dir / OFFERS_FILE
        self.decisions_path = state_dir / DECISIONS_FILE
        self.sent_path = state_dir / SENT_FILE
        self._lock = threading.Lock()

    def _ensure_dir(self) -> None:
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # -- offers -------------------------------------------------------------------------------

    def offers(self) -> dict[str, dict[str, Any]]:
        """The stored offers: plan hash -> {name, version, consortium, status, model, ...}."""
        try:
            text = self.offers_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise RecordsError(f"{self.offers_path}: cannot read: {exc}") from None
        try:
            offers = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecordsError(f"{self.offers_path}: not valid JSON ({exc.msg})") from None
        if not isinstance(offers, dict) or not all(isinstance(v, dict) for v in offers.values()):
            raise RecordsError(f"{self.offers_path}: not an object of plan hash -> offer")
        return offers

    def store_offer(
        self, fields: Mapping[str, Any]
    ) -> tuple[dict[str, Any], list[tuple[str, dict[str, Any]]]]:
        """Store a ``plan_offer`` (replacing an earlier offer of the same hash); return the entry
        and the offers evicted to keep at most ``max_offers`` (oldest first received).

        Args:
            fields: the decoded ``plan_offer``; its plan_hash and signature must already be
                checked.

        Raises:
            OfferRefused: the offer's plan is larger than ``max_offer_bytes``.
        """
        size = len(json.dumps(fields["plan"], separators=(",", ":")).encode("utf-8"))
        if size > self.max_offer_bytes:
            raise OfferRefused(
                f"its plan is {size} bytes; offers above {self.max_offer_bytes} bytes are not "
                "stored"
            )
        model, privacy = _plan_summary(fields["plan"])
        entry = {
            "name": fields["name"],
            "version": fields["version"],
            "consortium": fields["consortium"],
            "status": fields["status"],
            "model": model,
            "privacy": privacy,
            "received_at": utc_now(),
            # The content itself, so the operator can read what they approve (e.g. with jq).
            "plan": fields["plan"],
        }
        with self._lock:
            try:
                offers = self.offers()
            except RecordsError:
                offers = {}  # a damaged file is replaced: offers are re-sent at every connect
            offers.pop(fields["plan_hash"], None)
            offers[fields["plan_hash"]] = entry
            evicted: list[tuple[str, dict[str, Any]]] = []
            if len(offers) > self.max_offers:
                by_age = sorted(offers, key=lambda h: str(offers[h].get("received_at", "")))
                for old_hash in by_age[: len(offers) - self.max_offers]:
                    evicted.append((old_hash, offers.pop(old_hash)))
            self._ensure_dir()
            _write_atomically(self.offers_path, json.dumps(offers, indent=1, sort_keys=True))
        return entry, evicted

    # -- decisions ----------------------------------------------------------------------------

    def decisions(self) -> dict[str, Decision]:
        """The latest decision for each plan hash.

        Raises:
            RecordsError: decisions.jsonl has a line that is not a decision.
        """
        latest: dict[str, Decision] = {}
        for number, record in enumerate(read_lines(self.decisions_path), start=1):
            try:
                decision = Decision(**record)
            except TypeError:
                raise RecordsError(
                    f"{self.decisions_path}: line {number} is not a decision "
                    f"(keys {', '.join(sorted(record))})"
                ) from None
            if (
                decision.decision not in DECISIONS
                or not isinstance(decision.plan_hash, str)
                or not _HEX64.fullmatch(decision.plan_hash)
            ):
                raise RecordsError(f"{self.decisions_path}: line {number} is not a decision")
            latest[decision.plan_hash] = decision
        return latest

    def decide(self, plan_hash: str, decision: str, *, reason: str, operator: str) -> Decision:
        """Append a decision about a full plan hash.

        Args:
            plan_hash: 64 lowercase hex characters (see :meth:`resolve_hash`).
            decision: APPROVED or REJECTED.
            reason: free text, may be empty.
            operator: who decided (the local user name).
        """
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {decision!r}")
        if not _HEX64.fullmatch(plan_hash):
            raise RecordsError(f"{plan_hash!r} is not a full plan hash (64 hex characters)")
        record = Decision(
            time=utc_now(), plan_hash=plan_hash, decision=decision, reason=reason, operator=operator
        )
        self._ensure_dir()
        append_line(self.decisions_path, asdict(record))
        return record

    def resolve_hash(self, text: str) -> str:
        """The full plan hash an operator means: 64 hex, or a prefix of one offered plan.

        A full hash need not have been offered (pre-approval). A prefix of at least
        MIN_PREFIX_CHARS hex characters must match exactly one offered plan.

        Raises:
            RecordsError: not hex, too short, or matching no offered plan or several; the
                message lists the offered plans the operator may have meant.
        """
        value = text.strip().lower()
        if not _HEX.fullmatch(value) or len(value) > 64:
            raise RecordsError(f"{text!r} is not a plan hash (hex characters, at most 64)")
        if len(value) == 64:
            return value
        offers = self.offers()
        if len(value) < MIN_PREFIX_CHARS:
            matches = sorted(h for h in offers if h.startswith(value))
            raise RecordsError(
                f"{text!r} is too short; give at least {MIN_PREFIX_CHARS} characters of the "
                "plan hash, or all 64"
                + (f"; it starts {_candidates(offers, matches)}" if matches else "")
            )
        matches = sorted(h for h in offers if h.startswith(value))
        if len(matches) == 1:
            return matches[0]
        if not matches:
            offered = (
                f"; the offered plans are: {_candidates(offers, _newest(offers))}"
                if offers
                else "; no plan has been offered to this site yet"
            )
            raise RecordsError(
                f"no offered plan's hash starts with {value!r}{offered} (`quorum-agent plans` "
                "lists them); to approve a plan before it is offered, give its full "
                "64-character hash"
            )
        raise RecordsError(
            f"{value!r} matches {len(matches)} offered plans: {_candidates(offers, matches)}; "
            "give more characters"
        )

    # -- sent log -----------------------------------------------------------------------------

    def record_sent(
        self,
        *,
        type: str,
        run: int | None,
        round: int | None,
        plan_hash: str | None,
        size: int,
        sha256: str,
        epsilon: float = 0.0,
    ) -> dict[str, Any]:
        """Append one line to sent.jsonl (fsynced) and return it; call BEFORE sending.

        Args:
            type: the message type (``stats``, ``update``, ``error``).
            run: the run it belongs to, if any.
            round: the round it belongs to, if any.
            plan_hash: the plan it was computed for, if any.
            size: bytes sent on the wire (all frames of a binary message).
            sha256: of the safetensors payload for updates, of the JSON text otherwise.
            epsilon: privacy budget this message spent; DP updates go through
                :meth:`record_update`, which computes it.
        """
        record = _sent_record(type, run, round, plan_hash, size, sha256, epsilon)
        with self._lock:
            self._ensure_dir()
            append_line(self.sent_path, record)
        return record

    def record_update(
        self,
        *,
        run: int,
        round: int,
        plan_hash: str,
        size: int,
        sha256: str,
        spend: Callable[[int], float],
    ) -> dict[str, Any]:
        """Append the line of a DP update (fsynced) with the epsilon it adds; call BEFORE sending.

        Counting the run's released updates and appending happen under one lock, so two
        updates of a run never both count themselves as the k-th.

        Args:
            run: the run of the update.
            round: its round.
            plan_hash: the plan it was trained for.
            size: bytes sent on the wire (all frames).
            sha256: of the safetensors payload.
            spend: ``spend(k)`` is the epsilon one more round adds to the run when ``k`` of its
                updates were already released (``RoundPrivacy.increment``). Not called for a
                payload already in the log (a re-send adds nothing).

        Raises:
            RecordsError: the sent log cannot be read.
        """
        with self._lock:
            released = released_updates(self.sent(), run=run, plan_hash=plan_hash)
            epsilon = 0.0 if sha256 in released else spend(len(released))
            record = _sent_record("update", run, round, plan_hash, size, sha256, epsilon)
            self._ensure_dir()
            append_line(self.sent_path, record)
        return record

    def sent(self) -> list[dict[str, Any]]:
        """Every line of sent.jsonl, oldest first.

        Raises:
            RecordsError: a line is not a JSON object.
        """
        return read_lines(self.sent_path)


def _sent_record(
    type: str,
    run: int | None,
    round: int | None,
    plan_hash: str | None,
    size: int,
    sha256: str,
    epsilon: float,
) -> dict[str, Any]:
    record: dict[str, Any] = {
        "time": utc_now(),
        "type": type,
        "run": run,
        "plan_hash": plan_hash,
        "bytes": size,
        "sha256": sha256,
        "epsilon": float(epsilon),
    }
    if round is not None:
        record["round"] = round
    return record


def released_updates(sent: list[dict[str, Any]], *, run: int, plan_hash: str) -> set[str]:
    """The payload sha256 of every distinct update of a run (and plan) in the sent log.

    Each one is a round of local training whose result left the site; a re-sent update (same
    payload) counts once. The plan hash guards against two servers that both have a run of that
    number.
    """
    return {
        str(record.get("sha256"))
        for record in sent
        if record.get("type") == "update"
        and record.get("run") == run
        and record.get("plan_hash") == plan_hash
    }


def epsilon_by_run(sent: list[dict[str, Any]]) -> dict[int | None, float]:
    """The privacy budget spent per run, summed over the sent log (increments: see above).

    Raises:
        RecordsError: a line's epsilon is not a number >= 0.
    """
    spent: dict[int | None, float] = {}
    for record in sent:
        epsilon = record.get("epsilon", 0.0)
        if isinstance(epsilon, bool) or not isinstance(epsilon, int | float) or not epsilon >= 0:
            raise RecordsError(f"sent log entry of {record.get('time')} has epsilon {epsilon!r}")
        run = record.get("run")
        key = run if isinstance(run, int) else None
        spent[key] = spent.get(key, 0.0) + float(epsilon)
    return spent


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: write a temp file in the same folder, fsync, rename."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
