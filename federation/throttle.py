"""Cheap defences of the agent websocket against floods of bad tokens (docs/security.md,
"Hostile input").

Both classes live in the memory of one server process and never touch the database: that is the
point. A flood of bad tokens from one address is refused after a few database look-ups, and its
audit trail is one event per interval, not one row per attempt (which would let an attacker fill
the database). With several ASGI processes each counts on its own, so an address gets at most
``limit`` tries per process and window.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# An attacker with many addresses (IPv6) must not grow the tables without bound.
MAX_TRACKED_ADDRESSES = 10_000
AUDITED_ADDRESSES = 10  # the busiest addresses named in one aggregated audit event


def client_address(scope: dict[str, Any]) -> str:
    """The client's address: the peer's, or from a trusted proxy the one its X-Forwarded-For
    names (config.security.TrustedProxyMiddleware; QUORUM_TRUSTED_PROXIES, empty by default)."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


@dataclass
class AuthFailureLimiter:
    """Counts token failures per address; an address with ``limit`` failures inside ``window``
    seconds is blocked for the rest of that window, with no database look-up.

    Only confirmed failures count: many valid agents behind one address (a hospital's NAT, a
    proxy that does not forward addresses) connecting at once after a server restart must all get
    in. What bounds a burst of bad tokens before they are confirmed is ``max_pending``: at most
    that many look-ups from one address are in flight at a time; the rest are refused with "try
    again later" (agents retry), so a burst costs at most ``max_pending`` queries before the
    failures it produced block the address.
    """

    limit: int
    window: float
    max_pending: int = 100
    clock: Callable[[], float] = time.monotonic
    _seen: dict[str, tuple[float, int]] = field(default_factory=dict)  # addr -> (start, count)
    _pending: Counter[str] = field(default_factory=Counter)  # addr -> look-ups in flight

    def blocked(self, address: str) -> bool:
        """Whether connections from ``address`` are refused right now."""
        entry = self._seen.get(address)
        if entry is None:
            return False
        start, count = entry
        if self.clock() - start >= self.window:
            del self._seen[address]
            return False
        return count >= self.limit

    def begin(self, address: str) -> bool:
        """Start a token look-up for ``address``; False (refuse, no look-up) when ``max_pending``
        of its look-ups are already in flight. Every True must be followed by :meth:`end`."""
        if self._pending[address] >= self.max_pending:
            return False
        self._pending[address] += 1
        return True

    def end(self, address: str) -> None:
        """A look-up started with :meth:`begin` finished (whatever its outcome)."""
        self._pending[address] -= 1
        if self._pending[address] <= 0:
            del self._pending[address]

    def failed(self, address: str) -> bool:
        """Record one failure; returns whether the address is now blocked."""
        now = self.clock()
        start, count = self._seen.get(address, (now, 0))
        if now - start >= self.window:
            start, count = now, 0
        if address not in self._seen and len(self._seen) >= MAX_TRACKED_ADDRESSES:
            self._prune(now)
        self._seen[address] = (start, count + 1)
        return count + 1 >= self.limit

    def _prune(self, now: float) -> None:
        expired = [a for a, (start, _) in self._seen.items() if now - start >= self.window]
        for address in expired:
            del self._seen[address]
        if len(self._seen) >= MAX_TRACKED_ADDRESSES:  # all fresh: forget the oldest half
            oldest = sorted(self._seen, key=lambda a: self._seen[a][0])
            for address in oldest[: len(oldest) // 2]:
                del self._seen[address]


@dataclass
class AuthFailureAudit:
    """Aggregates token failures into one audit event per ``interval`` seconds.

    The first failure after a quiet interval is reported at once (with anything pending); the
    ones after it wait for the next report, which the next failure after the interval triggers.
    """

    interval: float
    clock: Callable[[], float] = time.monotonic
    _pending: Counter[str] = field(default_factory=Counter)
    _refused: int = 0  # connections refused without a look-up (blocked addresses)
    _last: float | None = None

    def failed(self, address: str, *, blocked: bool = False) -> dict[str, Any] | None:
        """Count one failure; returns the audit data to record now, or None."""
        if blocked:
            self._refused += 1
        else:
            if address in self._pending or len(self._pending) < MAX_TRACKED_ADDRESSES:
                self._pending[address] += 1
            else:
                self._pending["other"] += 1
        now = self.clock()
        if self._last is not None and now - self._last < self.interval:
            return None
        return self._report(now)

    def _report(self, now: float) -> dict[str, Any] | None:
        if not self._pending and not self._refused:
            return None
        data = {
            "failures": sum(self._pending.values()),
            "refused_blocked": self._refused,
            "addresses": len(self._pending),
            "top_addresses": dict(self._pending.most_common(AUDITED_ADDRESSES)),
            "interval_seconds": self.interval,
        }
        self._pending.clear()
        self._refused = 0
        self._last = now
        return data


@dataclass
class _Bucket:
    tokens: float
    updated: float
    suppressed: Counter[str] = field(default_factory=Counter)  # code -> frames not written
    since: float | None = None  # when the first suppressed frame of this summary arrived


@dataclass
class SiloReportBudget:
    """A token bucket per silo for the audit rows of what its agent reports or gets refused
    (``error`` frames, malformed frames): ``burst`` rows at once, then ``per_minute``.

    Past the budget a frame writes no row; it is counted, and one aggregated "suppressed N
    frames" event per ``window`` seconds says how many of each code were left out (due when a
    suppressed frame arrives a window after the first one, or when the agent disconnects). An
    authenticated agent sending 2,000 error frames used to add 2,000 rows (7.8 MiB).
    """

    burst: int
    per_minute: float
    window: float
    clock: Callable[[], float] = time.monotonic
    _buckets: dict[int, _Bucket] = field(default_factory=dict)

    def take(self, silo_id: int, code: str) -> tuple[bool, dict[str, Any] | None]:
        """One report from ``silo_id``: (write its own audit row?, summary to write now or None)."""
        now = self.clock()
        bucket = self._buckets.get(silo_id)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_ADDRESSES:
                self._buckets.clear()  # silos are few; this only bounds a misuse
            bucket = self._buckets[silo_id] = _Bucket(tokens=float(self.burst), updated=now)
        bucket.tokens = min(
            float(self.burst), bucket.tokens + (now - bucket.updated) * self.per_minute / 60.0
        )
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return True, None
        if bucket.since is None:
            bucket.since = now
        bucket.suppressed[code[:50]] += 1
        if now - bucket.since >= self.window:
            return False, self._summary(bucket, now)
        return False, None

    def flush(self, silo_id: int) -> dict[str, Any] | None:
        """The pending summary of ``silo_id`` (its agent went away), or None."""
        bucket = self._buckets.get(silo_id)
        if bucket is None or not bucket.suppressed:
            return None
        return self._summary(bucket, self.clock())

    def _summary(self, bucket: _Bucket, now: float) -> dict[str, Any]:
        assert bucket.since is not None
        data = {
            "suppressed": sum(bucket.suppressed.values()),
            "codes": dict(bucket.suppressed.most_common(AUDITED_ADDRESSES)),
            "seconds": round(now - bucket.since, 3),
            "burst": self.burst,
            "per_minute": self.per_minute,
        }
        bucket.suppressed.clear()
        bucket.since = None
        return data
