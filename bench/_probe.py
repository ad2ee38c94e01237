"""Where a round's orchestration goes, counted in the server's own process.

    probe = OverheadProbe.install()      # after configure_django(), before the server starts
    ... run rounds ...
    probe.uninstall()
    counts = probe.between(t0, t1)       # what happened in [t0, t1) (wall clock, time.time())

The benchmark's server runs in its own process (``bench/_federation.py``), so every database
statement, commit, thread hop and channel-layer message of a round can be counted there without
touching the code under test: the probe wraps, for the time it is installed,

* Django's cursor (``CursorWrapper.execute``/``executemany``): one statement each, by kind
  (SELECT, INSERT, UPDATE, DELETE, other: BEGIN/SAVEPOINT/PRAGMA...), with its duration;
* ``BaseDatabaseWrapper.commit`` (the outermost ``atomic`` commits) and statements that write
  outside any ``atomic`` block (SQLite commits each of those by itself);
* ``connection_created``: a database connection opened (CONN_MAX_AGE=0 opens one per hop);
* ``asgiref``'s ``SyncToAsync.__call__`` (``database_sync_to_async`` included) and
  ``asyncio.to_thread``: one thread hop each, by function;
* the channel layer's ``send``/``group_send``/``group_add``: one message each;
* ``dispatch.EmbeddedBackend.enqueue``: an orchestration step queued, with its countdown
  (a deadline timer when the countdown is > 0);
* ``orchestrator.run_advance``/``round_aggregate`` and ``update_services.update_receive``:
  their wall time on the orchestration and database threads.

Every event is a (wall time, kind, name, seconds) tuple; :meth:`OverheadProbe.between` sums them
over a window (one round: from the previous round's end to this round's end). Counting costs a
few microseconds an event; it adds to what it measures, the same before and after a change.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Window:
    """Counts and seconds of one window (one round)."""

    counts: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)

    def add(self, other: Window) -> None:
        """Add another window's counts and seconds (for means over rounds)."""
        self.counts.update(other.counts)
        self.seconds.update(other.seconds)


def _statement_kind(sql: str) -> str:
    head = sql.lstrip()[:10].upper()
    for kind in ("SELECT", "INSERT", "UPDATE", "DELETE"):
        if head.startswith(kind):
            return kind
    return "other"


_scope = threading.local()
_SAVEPOINT_ID = re.compile(r"s\d+_x\d+")


def _in_scope(name: str, fn: Callable[[], Any]) -> Any:
    previous = getattr(_scope, "name", None)
    _scope.name = name if previous is None else previous
    try:
        return fn()
    finally:
        _scope.name = previous


class OverheadProbe:
    """Wraps the server's database, thread-hop, channel and scheduling entry points."""

    def __init__(self, *, statements: bool = False) -> None:
        self.statements = statements  # also keep each statement's text (its first 110 chars)
        self.events: list[tuple[float, str, str, float]] = []
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def record(self, kind: str, name: str = "", seconds: float = 0.0) -> None:
        """Note one event now (thread-safe)."""
        with self._lock:
            self.events.append((time.time(), kind, name, seconds))

    def _patch(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        original = owner.__dict__[attr] if attr in vars(owner) else getattr(owner, attr)
        setattr(owner, attr, make(original))
        self._undo.append(lambda: setattr(owner, attr, original))

    def _patch_item(self, mapping: dict[str, Any], key: str, make: Callable[[Any], Any]) -> None:
        original = mapping[key]
        mapping[key] = make(original)
        self._undo.append(lambda: mapping.__setitem__(key, original))

    @classmethod
    def install(cls, *, statements: bool = False) -> OverheadProbe:
        """Start counting (Django must be set up); ``statements``: keep the SQL texts too."""
        from asgiref.sync import SyncToAsync
        from django.db import connection as default_connection
        from django.db.backends.base.base import BaseDatabaseWrapper
        from django.db.backends.signals import connection_created
        from django.db.backends.utils import CursorWrapper

        from federation import dispatch
        from federation.services import updates as update_services

        probe = cls(statements=statements)
        rec = probe.record

        def wrap_execute(original: Any) -> Any:
            @functools.wraps(original)
            def execute(self: Any, sql: str, *args: Any, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return original(self, sql, *args, **kwargs)
                finally:
                    kind = _statement_kind(sql)
                    spent = time.perf_counter() - start
                    rec("query", kind, spent)
                    scope = getattr(_scope, "name", None) or "other"
                    rec("sql in", scope, spent)
                    if probe.statements:
                        text = _SAVEPOINT_ID.sub("s_x", " ".join(sql.split()))
                        rec("statement", f"{scope}: {text[:110]}", spent)
                    if kind in ("INSERT", "UPDATE", "DELETE") and not self.db.in_atomic_block:
                        rec("commit", "autocommit")

            return execute

        probe._patch(CursorWrapper, "execute", wrap_execute)
        probe._patch(CursorWrapper, "executemany", wrap_execute)

        def wrap_commit(original: Any) -> Any:
            @functools.wraps(original)
            def commit(self: Any) -> Any:
                start = time.perf_counter()
                try:
                    return original(self)
                finally:
                    rec("commit", "atomic", time.perf_counter() - start)

            return commit

        probe._patch(BaseDatabaseWrapper, "commit", wrap_commit)

        def opened(sender: Any, connection: Any, **_: Any) -> None:
            rec("connection", connection.alias)

        connection_created.connect(opened, weak=False)
        probe._undo.append(lambda: connection_created.disconnect(opened))
        del default_connection

        def wrap_sync_to_async(original: Any) -> Any:
            @functools.wraps(original)
            async def call(self: Any, *args: Any, **kwargs: Any) -> Any:
                func = getattr(self, "func", None)
                start = time.perf_counter()
                try:
                    return await original(self, *args, **kwargs)
                finally:  # the hop's whole wait: queueing, the thread, the function
                    rec("hop", getattr(func, "__name__", "?"), time.perf_counter() - start)

            return call

        probe._patch(SyncToAsync, "__call__", wrap_sync_to_async)

        def wrap_to_thread(original: Any) -> Any:
            @functools.wraps(original)
            def to_thread(func: Any, /, *args: Any, **kwargs: Any) -> Any:
                rec("hop", getattr(func, "__name__", "?"))
                return original(func, *args, **kwargs)

            return to_thread

        probe._patch(asyncio, "to_thread", wrap_to_thread)

        from channels.layers import get_channel_layer

        layer_type = type(get_channel_layer())
        for method in ("send", "group_send", "group_add"):

            def wrap_layer(original: Any, method: str = method) -> Any:
                @functools.wraps(original)
                async def sent(self: Any, *args: Any, **kwargs: Any) -> Any:
                    rec("channel", method)
                    return await original(self, *args, **kwargs)

                return sent

            probe._patch(layer_type, method, wrap_layer)

        def wrap_enqueue(original: Any) -> Any:
            @functools.wraps(original)
            def enqueue(self: Any, step: str, *args: Any, countdown: float = 0.0) -> Any:
                rec("enqueue", "timer" if countdown > 0 else "now", countdown)
                return original(self, step, *args, countdown=countdown)

            return enqueue

        probe._patch(dispatch.EmbeddedBackend, "enqueue", wrap_enqueue)

        def wrap_timed(kind: str) -> Callable[[Any], Any]:
            def make(original: Any) -> Any:
                @functools.wraps(original)
                def timed(*args: Any, **kwargs: Any) -> Any:
                    start = time.perf_counter()
                    try:
                        return _in_scope(original.__name__, lambda: original(*args, **kwargs))
                    finally:
                        rec(kind, original.__name__, time.perf_counter() - start)

                return timed

            return make

        from federation.services import rounds as round_services

        # dispatch runs the steps by name from its registry (filled at start-up), and the
        # orchestrator calls round_aggregate in the round services.
        probe._patch_item(dispatch.steps.functions, dispatch.RUN_ADVANCE, wrap_timed("step"))
        probe._patch_item(dispatch.steps.functions, dispatch.SWEEP, wrap_timed("step"))
        probe._patch(round_services, "round_aggregate", wrap_timed("step"))

        def wrap_receive(original: Any) -> Any:
            @functools.wraps(original)
            def update_receive(*, silo_id: int, **kwargs: Any) -> Any:
                start = time.perf_counter()
                try:
                    return _in_scope("update_receive", lambda: original(silo_id=silo_id, **kwargs))
                finally:  # recorded at its end (committed), with its duration
                    rec("receive", str(silo_id), time.perf_counter() - start)

            return update_receive

        probe._patch(update_services, "update_receive", wrap_receive)

        from federation import consumers, selectors

        def wrap_task(original: Any) -> Any:
            @functools.wraps(original)
            def task_message(*, round_id: int, silo_id: int) -> Any:
                start = time.perf_counter()
                try:
                    return _in_scope(
                        "task_message", lambda: original(round_id=round_id, silo_id=silo_id)
                    )
                finally:  # its end is the task's sent_at, give or take a microsecond
                    rec("task", str(silo_id), time.perf_counter() - start)

            return task_message

        probe._patch(selectors, "task_message", wrap_task)

        # A plain round's tasks are signed when it opens and sent from the round.task event
        # (selectors.prebuilt_task, in a thread that inherits the consumer's context): the
        # task leaves when that returns.
        consumer_silo: contextvars.ContextVar[str] = contextvars.ContextVar("probe_silo")

        def wrap_round_task(original: Any) -> Any:
            @functools.wraps(original)
            async def round_task(self: Any, event: dict[str, Any]) -> Any:
                consumer_silo.set(str(self.silo_id))
                return await original(self, event)

            return round_task

        def wrap_prebuilt(original: Any) -> Any:
            @functools.wraps(original)
            def prebuilt_task(event: dict[str, Any]) -> Any:
                start = time.perf_counter()
                try:
                    return original(event)
                finally:
                    rec("task", consumer_silo.get(""), time.perf_counter() - start)

            return prebuilt_task

        probe._patch(consumers.AgentConsumer, "round_task", wrap_round_task)
        probe._patch(selectors, "prebuilt_task", wrap_prebuilt)

        def wrap_frame(original: Any) -> Any:
            @functools.wraps(original)
            async def receive_binary(self: Any, frame: bytes) -> Any:
                rec("frame", str(self.silo_id))
                return await original(self, frame)

            return receive_binary

        probe._patch(consumers.AgentConsumer, "receive_binary", wrap_frame)
        return probe

    def times(self, kind: str, name: str, start: float, end: float) -> list[tuple[float, float]]:
        """(wall time, seconds) of every event of one kind and name in [start, end)."""
        with self._lock:
            return [
                (at, seconds)
                for at, k, n, seconds in self.events
                if k == kind and n == name and start <= at < end
            ]

    def uninstall(self) -> None:
        """Stop counting; restore every wrapped entry point."""
        while self._undo:
            self._undo.pop()()

    def between(self, start: float, end: float) -> Window:
        """Counts and seconds of the events in [start, end) (wall clock)."""
        window = Window()
        with self._lock:
            events = list(self.events)
        for at, kind, name, seconds in events:
            if start <= at < end:
                window.counts[kind] += 1
                window.counts[f"{kind}:{name}"] += 1
                window.seconds[kind] += seconds
                window.seconds[f"{kind}:{name}"] += seconds
        return window
