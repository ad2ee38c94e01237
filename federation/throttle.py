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
    """The peer's address as the ASGI server saw it (uvicorn honours X-Forwarded-For only from
    the addresses in FORWARDED_ALLOW_IPS, by default 127.0.0.1: a proxy on the same host)."""
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
