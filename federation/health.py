"""GET /healthz: can this process reach what it needs? (database, channel layer, broker)

For load balancers, systemd watchdogs and monitoring. No authentication and no secrets in the
answer: each check reports ``ok``, how long it took and, when it failed, the kind of error.
200 when every check passes, 503 otherwise. Each check is bounded by HEALTH_TIMEOUT seconds.

The embedded profile has no broker and an in-memory channel layer: those checks report what they
are and pass.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from channels.layers import get_channel_layer
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from federation import dispatch

HEALTH_TIMEOUT = 2.0


def _error(exc: BaseException) -> str:
    first_line = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:200]


# Probes that block run here, never on Django's shared sync thread or the connection pool: a
# database that does not answer used to hold /healthz for the pool's 30 s timeout. A probe that
# hangs occupies one of these threads until its own connect/statement timeout; the answer does
# not wait for it (asyncio.wait_for cancels the future at once), and at most PROBE_THREADS hang.
PROBE_THREADS = 4
_probes = ThreadPoolExecutor(max_workers=PROBE_THREADS, thread_name_prefix="quorum-health")


def _in_probe_thread(fn: Callable[[], dict[str, Any]]) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def run() -> dict[str, Any]:
        return await asyncio.get_running_loop().run_in_executor(_probes, fn)

    return run


def _database() -> dict[str, Any]:
    if connection.vendor == "postgresql":
        # Its own short-lived connection with a connect and a statement timeout: the pool's
        # timeout is for requests, and a pooled connection may be a dead one.
        params = connection.get_connection_params()
        params["connect_timeout"] = max(1, math.ceil(HEALTH_TIMEOUT))
        with psycopg.connect(**params, autocommit=True) as conn:
            conn.execute(f"SET statement_timeout = {int(HEALTH_TIMEOUT * 1000)}")
            conn.execute("SELECT 1").fetchone()
        return {"vendor": connection.vendor}
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()  # this probe thread's own connection
    return {"vendor": connection.vendor}


async def _channel_layer() -> dict[str, Any]:
    layer = get_channel_layer()
    kind = type(layer).__name__
    if not hasattr(layer, "connection"):  # the in-memory layer of the embedded profile
        return {"backend": kind}
    for index in range(layer.ring_size):  # channels_redis: ping each host through its pool
        await layer.connection(index).ping()
    return {"backend": kind, "hosts": layer.ring_size}


def _broker() -> dict[str, Any]:
    if not dispatch.uses_broker():
        return {"used": False}
    from config.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, interval_start=0, timeout=HEALTH_TIMEOUT)
        return {"used": True, "transport": conn.transport_cls}


async def _check(probe: Callable[[], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    started = time.monotonic()
    try:
        details = await asyncio.wait_for(probe(), timeout=HEALTH_TIMEOUT)
        result: dict[str, Any] = {"ok": True, **details}
    except TimeoutError:
        result = {"ok": False, "error": f"no answer within {HEALTH_TIMEOUT:.0f} s"}
    except Exception as exc:  # a health check reports every failure, whatever its kind
        result = {"ok": False, "error": _error(exc)}
    result["ms"] = round((time.monotonic() - started) * 1000, 1)
    return result


@never_cache
@require_GET
async def healthz(request: HttpRequest) -> JsonResponse:
    """JSON: {"status": "ok"|"fail", "profile": ..., "checks": {name: {ok, ms, ...}}}."""
    checks = {
        "database": await _check(_in_probe_thread(_database)),
        "channel_layer": await _check(_channel_layer),
        "broker": await _check(_in_probe_thread(_broker)),
    }
    ok = all(check["ok"] for check in checks.values())
    return JsonResponse(
        {"status": "ok" if ok else "fail", "profile": dispatch.profile(), "checks": checks},
        status=200 if ok else 503,
    )
