"""Claim an empty Redis database number for one test session or benchmark run (no Django).

The services suite and bench/load.py both run the production stack against the machine's Redis;
each takes a database number of its own (never 0, the default), marked with a key, so two runs at
once never flush each other's data.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urlsplit, urlunsplit


def redis_url_with_db(url: str, db: int) -> str:
    """The same Redis server, another database number."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def claim_redis_db(base_url: str, *, claim_key: str, ttl: int) -> tuple[str, Any]:
    """An empty Redis database number marked as ours with ``claim_key`` (expiring after ``ttl``
    seconds); returns its URL and a client of it."""
    import redis

    probe = redis.Redis.from_url(base_url, socket_connect_timeout=3)
    try:
        count = int(probe.config_get("databases").get("databases", 16))
    except redis.ResponseError:  # CONFIG may be disabled; 16 is Redis's default
        count = 16
    start = os.getpid()
    for offset in range(count - 1):
        number = 1 + (start + offset) % (count - 1)
        client = redis.Redis.from_url(redis_url_with_db(base_url, number), socket_connect_timeout=3)
        if not client.set(claim_key, os.getpid(), nx=True, ex=ttl):
            continue  # another run's
        if client.dbsize() == 1:
            return redis_url_with_db(base_url, number), client
        client.delete(claim_key)  # someone else's data lives here: leave it alone
    raise RuntimeError(f"no empty Redis database on {base_url} to claim")
