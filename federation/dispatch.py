"""The one place where the embedded and production profiles differ: scheduling and dispatch.

A leaf port: it imports nothing from ``federation`` and knows the work it runs only by name.

- Steps are named (``RUN_ADVANCE`` = "run.advance", ``SWEEP``, ``SECAGG_TICK``,
  ``SILO_HEARTBEATS``) and resolved by a registry that ``federation.apps.FederationConfig.ready``
  fills at start-up (:func:`register_step`): the function that runs in process, and the Celery
  task that runs it in the production profile. The embedded backend and ``federation.tasks``
  both run steps through :func:`run_step`, so nothing here imports the layers that call it.
- ``enqueue_advance(run_id, countdown=...)`` asks the orchestrator to move a run forward;
  ``enqueue(step, *args, countdown=...)`` runs any named step later.
- ``send_to_silo(silo_id, event)`` pushes an event to the silo's agent connection.
- Every check of ``settings.QUORUM_PROFILE`` lives here: callers ask
  :func:`can_coordinate_in_process`, :func:`uses_broker`, :func:`attach_server_loop`.

Embedded profile: the ASGI server process owns an event loop (attached at start-up); orchestration
steps run one at a time on a single worker thread, timers are ``loop.call_later``, and events go
through the in-memory channel layer on that loop. A process without a server loop (a management
command) only writes the database: the server's sweeper, which re-reads every active run every
QUORUM_SWEEP_SECONDS, picks the work up. Because every step re-reads its state from the database,
no step is lost when a process dies.

Production profile: Celery tasks (with countdowns) and Celery beat's sweep; events through the
Redis channel layer, which reaches consumers in every ASGI process.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.db import close_old_connections, transaction
from django.utils import timezone

log = logging.getLogger("quorum.dispatch")

# Step names: what callers enqueue, what the registry resolves.
RUN_ADVANCE = "run.advance"
SWEEP = "sweep"
SECAGG_TICK = "secagg.tick"
SILO_HEARTBEATS = "silo.heartbeats"


class StepRegistry:
    """Named steps: the function each runs, and its Celery task (production), if it has one."""

    def __init__(self) -> None:
        self.functions: dict[str, Callable[..., Any]] = {}
        self.tasks: dict[str, Any] = {}

    def register(self, name: str, fn: Callable[..., Any], *, task: Any = None) -> None:
        """Name a step (at start-up); a second registration of a name replaces the first."""
        self.functions[name] = fn
        if task is not None:
            self.tasks[name] = task
        else:
            self.tasks.pop(name, None)

    def function(self, name: str) -> Callable[..., Any]:
        """The function of step ``name``; LookupError names an unknown step."""
        try:
            return self.functions[name]
        except KeyError:
            raise LookupError(
                f"no step named {name!r} is registered (known: {sorted(self.functions)}); "
                "steps are registered in federation.apps.FederationConfig.ready"
            ) from None

    def task(self, name: str) -> Any:
        """The Celery task of step ``name``; LookupError names a step with no task."""
        try:
            return self.tasks[name]
        except KeyError:
            raise LookupError(
                f"{name} has no Celery task: only {sorted(self.tasks)} can run in the "
                "production profile"
            ) from None


steps = StepRegistry()


def register_step(name: str, fn: Callable[..., Any], *, task: Any = None) -> None:
    """Register step ``name`` (called from federation.apps at start-up)."""
    steps.register(name, fn, task=task)


def run_step(name: str, *args: Any, **kwargs: Any) -> Any:
    """Run step ``name`` now, in this thread (Celery tasks, the embedded orchestration thread)."""
    return steps.function(name)(*args, **kwargs)


def profile() -> str:
    """The configured profile's name ("embedded" or "production"), for labels and reports."""
    return str(settings.QUORUM_PROFILE)


def is_production() -> bool:
    """Whether this process runs the production profile (Celery, Redis channel layer)."""
    return profile() == "production"


def can_coordinate_in_process() -> bool:
    """Whether state kept in this process's memory sees every agent message of a round.

    True in the embedded profile (one server process runs orchestration and every connection).
    """
    return not is_production()


def uses_broker() -> bool:
    """Whether steps go through a Celery broker (the production profile)."""
    return is_production()


def attach_server_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Hand the server's event loop to the embedded backend, when this process orchestrates."""
    if not is_production() and settings.QUORUM_EMBEDDED_ORCHESTRATOR:
        embedded.attach(loop)


def silo_group(silo_id: int) -> str:
    """Channel-layer group of a silo's agent connection."""
    return f"silo-{silo_id}"


LIVE_GROUP = "live"


class EmbeddedBackend:
    """In-process timers and a single orchestration thread on the server's event loop."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="quorum-orchestrator")
        self._sweep_task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        # When this process became the only one that orchestrates (the embedded profile has
        # one server process): work begun before then was begun by a process that is gone.
        self.attached_at: datetime | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Adopt the server's event loop and start the sweeper (idempotent)."""
        with self._lock:
            if self.loop is loop and self._sweep_task is not None:
                return
            self.loop = loop
            self.attached_at = timezone.now()
            self._sweep_task = loop.create_task(self._sweep_forever())

    def detach(self) -> None:
        """Stop the sweeper; used at server shutdown."""
        with self._lock:
            if self._sweep_task is not None:
                self._sweep_task.cancel()
            self._sweep_task = None
            self.loop = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(settings.QUORUM_SWEEP_SECONDS)
            future = self._executor.submit(_run_step, SWEEP)
            await asyncio.wrap_future(future)

    def enqueue(self, step: str, *args: Any, countdown: float = 0.0) -> None:
        """Run step(*args) on the orchestration thread after countdown seconds."""
        steps.function(step)  # LookupError now, not on the thread: an unknown step is a bug
        loop = self.loop
        if loop is None or loop.is_closed():
            log.debug("no server loop in this process; the sweeper will pick up %s", step)
            return

        def submit() -> None:
            self._executor.submit(_run_step, step, *args)

        loop.call_soon_threadsafe(loop.call_later, max(0.0, countdown), submit)

    def send(self, group: str, event: dict[str, Any]) -> None:
        """Send a channel-layer event to a group, on the server loop."""
        loop = self.loop
        if loop is None or loop.is_closed():
            return
        layer = get_channel_layer()
        future = asyncio.run_coroutine_threadsafe(layer.group_send(group, event), loop)
        future.add_done_callback(_log_failure)


def _log_failure(future: Any) -> None:
    exc = future.exception()
    if exc is not None:
        log.error("channel layer send failed: %s", exc)


def _run_step(step: str, *args: Any) -> Any:
    """Run one orchestration step with fresh database connections; never let it kill the thread."""
    close_old_connections()
    try:
        return run_step(step, *args)
    except Exception:
        log.exception("orchestration step %s%r failed", step, args)
        return None
    finally:
        close_old_connections()


class CeleryBackend:
    """Celery tasks and the Redis channel layer (production profile).

    Nothing here lives in process memory: a step becomes a Celery message naming its task
    (registered with the step at start-up) and the run's id; an event goes through Redis to whichever
    ASGI process holds the connection. A failure to publish is logged, never raised into the
    transaction's caller: the beat sweep moves every active run forward within
    QUORUM_SWEEP_SECONDS, and an agent is handed the work it owes whenever it (re)connects.
    """

    # Publishing must not hold up a consumer for long when the broker is down.
    RETRY_POLICY = {
        "max_retries": 2,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 0.5,
    }

    def enqueue(self, step: str, *args: Any, countdown: float = 0.0) -> None:
        """Send step(*args) as its Celery task, to run after countdown seconds."""
        task = steps.task(step)  # LookupError: a step with no task is a programming error
        try:
            task.apply_async(
                args=list(args),
                countdown=max(0.0, countdown),
                retry=True,
                retry_policy=self.RETRY_POLICY,
            )
        except Exception:
            log.exception(
                "could not send %s%r to the broker; the sweep will catch up", task.name, args
            )

    def send(self, group: str, event: dict[str, Any]) -> None:
        """Send a channel-layer event to a group through Redis."""
        try:
            async_to_sync(get_channel_layer().group_send)(group, event)
        except Exception:
            log.exception("channel layer send to %s failed", group)


embedded = EmbeddedBackend()


def sole_orchestrator_since() -> datetime | None:
    """Since when this process has been the only one that orchestrates, or None.

    The embedded profile's server process, once its loop is attached: an aggregation marked
    begun before then was begun by a process that is gone (a restart), so it is rerun at once
    rather than after ``QUORUM_AGGREGATION_STALE_SECONDS``. None in the production profile
    (several Celery workers, each may be aggregating) and in a process without the loop.
    """
    current = backend()
    if isinstance(current, EmbeddedBackend) and current.loop is not None:
        return current.attached_at
    return None


def backend() -> EmbeddedBackend | CeleryBackend:
    """The backend of the configured profile."""
    if is_production():
        return CeleryBackend()
    return embedded


def enqueue(step: str, *args: Any, countdown: float = 0.0) -> None:
    """Run the named step later (now, if countdown is 0) through the profile's backend."""
    backend().enqueue(step, *args, countdown=countdown)


def enqueue_advance(run_id: int, *, countdown: float = 0.0) -> None:
    """After the current transaction commits, ask the orchestrator to move a run forward."""
    transaction.on_commit(lambda: enqueue(RUN_ADVANCE, run_id, countdown=countdown))


def send_to_silo(silo_id: int, event: dict[str, Any]) -> None:
    """After the current transaction commits, push an event to a silo's agent connection."""
    transaction.on_commit(lambda: backend().send(silo_group(silo_id), event))


def publish_live(event: dict[str, Any]) -> None:
    """After the current transaction commits, push an event to live dashboards."""
    transaction.on_commit(lambda: backend().send(LIVE_GROUP, event))


# How long heartbeats are gathered before one database job (one transaction) records them all.
HEARTBEAT_FLUSH_SECONDS = 1.0


class HeartbeatRecorder:
    """Records agents' heartbeats in batches: one database job per second per process.

    A heartbeat used to be one thread hop and one UPDATE (with CONN_MAX_AGE=0, one connection
    opened and closed) each: 1,000 agents beating every 5 s queued 200 of them a second on the
    consumers' single database thread, heartbeat acks took seconds, keepalive pings timed out
    and connections dropped (bench/load.py). Liveness only needs a granularity of
    QUORUM_SILO_OFFLINE_AFTER (20 s), so a second's delay changes nothing. Each silo's latest
    connection is kept; ``silo_heartbeat`` still ignores a connection that was replaced.
    """

    def __init__(self) -> None:
        self._pending: dict[int, str] = {}
        self._task: asyncio.Task[None] | None = None

    def record(self, silo_id: int, connection_id: str) -> None:
        """Note a heartbeat; it reaches the database within HEARTBEAT_FLUSH_SECONDS."""
        self._pending[silo_id] = connection_id
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            self._task = loop.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(HEARTBEAT_FLUSH_SECONDS)
        await self.flush()

    async def flush(self) -> None:
        """Write every pending heartbeat now."""
        from channels.db import database_sync_to_async

        pending, self._pending = self._pending, {}
        if pending:  # one transaction for the batch (services.silos.silo_heartbeats_record)
            await database_sync_to_async(run_step)(SILO_HEARTBEATS, beats=pending)


heartbeats = HeartbeatRecorder()
