"""The agent's websocket session with the consortium server, with reconnect.

One :class:`Agent` lives for the whole process; it opens one websocket at a time (a *session*),
says ``hello``, waits for ``welcome``, sends heartbeats and answers ``stats_request`` and ``task``
messages until the connection drops, then reconnects with exponential backoff and full jitter.
What must survive a reconnect lives on the Agent: the data caches, the training job in flight
(a worker thread cannot be interrupted mid-step, and its result is still wanted) and the last
built update, which is re-sent without retraining when the server re-sends the same task.

Exit codes of :meth:`Agent.run` / :func:`run_agent`: :data:`EXIT_OK` (stopped by the caller,
e.g. SIGTERM) and :data:`EXIT_AUTH` (the server refused the token; reconnecting cannot help).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import sys
import threading
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from clientagent import __version__
from clientagent.config import SiteConfig
from clientagent.data import LocalData, canonical_sha256
from clientagent.progress import RoundProgress
from clientagent.trainer import (
    DATA_INVALID,
    TaskError,
    TrainingCancelled,
    handle_stats_request,
    handle_task,
)
from fedcore import protocol, tensors

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_CONFIG = 2
EXIT_AUTH = 3

AUTH_REFUSED_MESSAGE = (
    "the server refused this site's token; ask the consortium admin for a new token "
    "and update token in site.toml"
)
AUTH_FAILED_CODE = "auth_failed"
AUTH_CLOSE_CODES = frozenset({4401, 4403})
AUTH_HTTP_STATUSES = frozenset({401, 403})

# One websocket frame: a binary chunk of at most DEFAULT_MAX_FRAME_BYTES plus slack for the
# websocket framing; larger messages are chunked by fedcore.protocol.
MAX_WS_MESSAGE_BYTES = protocol.DEFAULT_MAX_FRAME_BYTES + (64 << 10)
PING_INTERVAL_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 20.0
OPEN_TIMEOUT_SECONDS = 15.0
WELCOME_TIMEOUT_SECONDS = 30.0
MIN_HEARTBEAT_SECONDS = 1.0
CLOSE_TIMEOUT_SECONDS = 5.0


class AuthRefused(Exception):
    """The server refused the site's token (HTTP 401/403, ``auth_failed`` or close 4401)."""


class SessionLost(Exception):
    """The websocket closed or the server misbehaved; the agent reconnects."""


class Backoff:
    """Exponential backoff with full jitter: delay = uniform(0, min(cap, base * 2**attempt)).

    ``attempt`` counts the failures since the last :meth:`reset` (a successful ``welcome``).
    """

    def __init__(self, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        """Args:
        base: upper bound of the first delay, seconds.
        cap: largest upper bound, seconds.
        rng: random source; default random.SystemRandom() (tests inject a seeded one).
        """
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base}, cap={cap}")
        self.base = base
        self.cap = cap
        self.rng = rng if rng is not None else random.SystemRandom()
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay before retry number ``attempt`` (0-based)."""
        # min() on the exponent first: 2**attempt would overflow float after ~1000 failures.
        return min(self.cap, self.base * 2.0 ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the smallest delay (after a successful welcome)."""
        self.attempt = 0


@dataclass(frozen=True)
class _BuiltUpdate:
    key: tuple[Any, ...]
    message: protocol.BinaryMessage


def _round_label(run: int, rnd: int, rounds: int | None) -> str:
    return f"round {rnd}/{rounds}" if rounds else f"run {run} round {rnd}"


def _auc(metrics: Mapping[str, Any], which: str) -> str:
    value = metrics.get(which, {}).get("auc") if isinstance(metrics.get(which), Mapping) else None
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def _describe_close(ws: ClientConnection) -> str:
    code, reason = ws.close_code, ws.close_reason
    if code is None:
        return "connection lost"
    return f"connection closed (code {code}{': ' + reason if reason else ''})"


class Agent:
    """A site agent: the reconnect loop plus the state that outlives one websocket session."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        backoff: Backoff | None = None,
        progress_stream: TextIO | None = None,
        progress_tty: bool | None = None,
        connect_options: Mapping[str, Any] | None = None,
    ):
        """Args:
        config: the parsed site.toml.
        backoff: reconnect delays (default: base 0.5 s, cap 30 s, SystemRandom jitter).
        progress_stream: where the training bar is drawn (default sys.stderr).
        progress_tty: draw a bar (default: whether progress_stream is a terminal).
        connect_options: extra keyword arguments for websockets' connect() (tests, proxies).
        """
        self.config = config
        self.backoff = backoff if backoff is not None else Backoff()
        self.data = LocalData(config.data.path)
        self.progress_stream = progress_stream if progress_stream is not None else sys.stderr
        self.progress_tty = progress_tty
        self.connect_options = dict(connect_options or {})
        self.silo: str | None = None
        self.state = "idle"
        self.sessions = 0  # successful welcomes, for logs and tests
        self._cancel = threading.Event()
        self._train_lock = asyncio.Lock()
        self._jobs: dict[tuple[Any, ...], asyncio.Future[protocol.BinaryMessage]] = {}
        self._last_update: _BuiltUpdate | None = None
        self._rounds: dict[int, int] = {}

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Connect, serve and reconnect until ``stop`` is set or the token is refused.

        Returns:
            EXIT_OK when ``stop`` was set, EXIT_AUTH when the server refused the token.
        """
        stop = stop if stop is not None else asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    await self.session(stop)
                    reason = "connection closed"
                except AuthRefused as exc:
                    logger.error("%s (%s)", AUTH_REFUSED_MESSAGE, exc)
                    return EXIT_AUTH
                except InvalidStatus as exc:
                    reason = (
                        f"HTTP {exc.response.status_code} instead of a websocket; "
                        f"check [server] url in {self.config.path}"
                    )
                except (OSError, TimeoutError, InvalidHandshake, SessionLost) as exc:
                    reason = str(exc) or type(exc).__name__
                except Exception as exc:
                    # A bug or a server we do not understand: keep the site online, with backoff.
                    logger.exception("unexpected error in the session")
                    reason = f"unexpected {type(exc).__name__}"
                if stop.is_set():
                    break
                delay = self.backoff.next_delay()
                logger.warning(
                    "server unreachable, retrying in %.1f s (attempt %d): %s",
                    delay,
                    self.backoff.attempt,
                    reason,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            logger.info("stopped")
            return EXIT_OK
        finally:
            # Interrupt local training at its next step; wait for the worker thread to notice.
            self._cancel.set()
            jobs = list(self._jobs.values())
            if jobs:
                await asyncio.gather(*jobs, return_exceptions=True)

    async def session(self, stop: asyncio.Event) -> None:
        """One websocket session: connect, hello/welcome, serve until it closes or ``stop``.

        Raises:
            AuthRefused: the token was refused; do not reconnect.
            SessionLost, OSError, TimeoutError, InvalidHandshake: reconnect.
        """
        opening = asyncio.ensure_future(self._connect())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            return
        ws = opening.result()
        async with ws:
            await _Session(self, ws, stop).serve()

    async def _connect(self) -> ClientConnection:
        options: dict[str, Any] = {
            "additional_headers": {"Authorization": f"Bearer {self.config.server.token}"},
            "max_size": MAX_WS_MESSAGE_BYTES,
            "ping_interval": PING_INTERVAL_SECONDS,
            "ping_timeout": PING_TIMEOUT_SECONDS,
            "open_timeout": OPEN_TIMEOUT_SECONDS,
            "close_timeout": CLOSE_TIMEOUT_SECONDS,
            "user_agent_header": f"quorum-agent/{__version__}",
        }
        options.update(self.connect_options)
        logger.debug("connecting to %s", self.config.server.url)
        try:
            return await connect(self.config.server.url, **options)
        except InvalidStatus as exc:
            if exc.response.status_code in AUTH_HTTP_STATUSES:
                raise AuthRefused(f"HTTP {exc.response.status_code}") from None
            raise

    # -- requests ---------------------------------------------------------------------------

    async def handle_stats_request(self, fields: dict[str, Any], session: _Session) -> None:
        """Compute the local statistics in a worker thread and reply ``stats`` (or ``error``)."""
        run = fields["run"]
        self.state = "stats"
        try:
            reply = await asyncio.to_thread(handle_stats_request, fields, self.data)
        except TaskError as exc:
            await self._refuse(exc, f"run {run}", session)
            return
        finally:
            self.state = "idle"
        await session.send_control("stats", **reply)
        logger.info("run %d: sent local statistics of the training split", run)

    async def handle_task(self, task: protocol.BinaryMessage, session: _Session) -> None:
        """Train (or reuse the update already built for this task) and send the ``update``."""
        fields = task.fields
        run, rnd = fields["run"], fields["round"]
        self._rounds[run] = fields["rounds"]
        label = _round_label(run, rnd, fields["rounds"])
        payload_sha = await asyncio.to_thread(tensors.sha256_hex, task.payload)
        # What the update depends on: the same key means the same weights would come out.
        key = (
            run,
            rnd,
            fields["plan_hash"],
            payload_sha,
            canonical_sha256(fields["preprocessing"]),
        )

        built = self._last_update
        if built is not None and built.key == key:
            logger.info("%s: re-sending the update already built for this task", label)
            # A fresh nonce: the server may have recorded the first one before the link dropped.
            update = replace(built.message, fields={**built.message.fields, "nonce": _nonce()})
        else:
            job = self._jobs.get(key)
            if job is None:
                late = time.time() - float(fields["deadline"])
                if late > 0:
                    logger.warning(
                        "%s: the deadline passed %.0f s ago by this machine's clock; training "
                        "anyway (the server may refuse the update; check the clock)",
                        label,
                        late,
                    )
                job = asyncio.ensure_future(self._train(task, label, key))
                self._jobs[key] = job
                job.add_done_callback(lambda done: self._job_done(key, done))
            try:
                # shield: if this session dies, the job (and its thread) carries on and the
                # next session's copy of the task picks up its result.
                update = await asyncio.shield(job)
            except TaskError as exc:
                await self._refuse(exc, label, session)
                return
            except TrainingCancelled:
                return

        frames = await asyncio.to_thread(
            protocol.encode_binary, update, max_frame_bytes=protocol.DEFAULT_MAX_FRAME_BYTES
        )
        await session.send_frames(frames)
        metrics = update.fields["metrics"]
        logger.info(
            "%s: sent update (%d examples, %.1f KiB) global auc %s -> local auc %s",
            label,
            update.fields["num_examples"],
            len(update.payload) / 1024,
            _auc(metrics, "global"),
            _auc(metrics, "local"),
        )

    async def _train(
        self, task: protocol.BinaryMessage, label: str, key: tuple[Any, ...]
    ) -> protocol.BinaryMessage:
        async with self._train_lock:  # one training at a time: the CPU is the bottleneck
            if self._cancel.is_set():
                raise TrainingCancelled(label)
            progress = RoundProgress(label, stream=self.progress_stream, tty=self.progress_tty)
            self.state = "training"
            try:
                update = await asyncio.to_thread(
                    handle_task,
                    task,
                    self.data,
                    silo=self.silo,
                    observer=progress,
                    cancel=self._cancel,
                )
            finally:
                progress.close()
                self.state = "idle"
        # Kept here, not by the session that asked: that session may be gone by now, and the
        # server re-sends the same task after the reconnect.
        self._last_update = _BuiltUpdate(key=key, message=update)
        return update

    def _job_done(self, key: tuple[Any, ...], job: asyncio.Future[Any]) -> None:
        if self._jobs.get(key) is job:
            del self._jobs[key]
        if not job.cancelled():
            job.exception()  # retrieved here: no "exception never retrieved" if nobody waits

    async def _refuse(self, exc: TaskError, label: str, session: _Session) -> None:
        # The site operator must see which column and row is wrong: data problems are ERRORs.
        level = logging.ERROR if exc.code == DATA_INVALID else logging.WARNING
        logger.log(level, "%s: %s: %s", label, exc.code, exc.reason)
        await session.send_control("error", **exc.to_fields())

    # -- server notices ---------------------------------------------------------------------

    def on_update_ack(self, fields: Mapping[str, Any]) -> None:
        """Log the server's verdict on our update and forget the kept copy."""
        run, rnd, status = fields["run"], fields["round"], fields["status"]
        label = _round_label(run, rnd, self._rounds.get(run))
        level = logging.INFO if status in ("accepted", "ok") else logging.WARNING
        logger.log(level, "%s %s", label, status)
        self._forget_update(run, rnd)

    def on_error(self, fields: Mapping[str, Any]) -> None:
        """Log an ``error`` from the server; drop our update if it was about it."""
        code, reason = fields["code"], fields["reason"]
        if code == AUTH_FAILED_CODE:
            raise AuthRefused(f"{code}: {reason}")
        run, rnd = fields.get("run"), fields.get("round")
        where = ""
        if run is not None and rnd is not None:
            where = _round_label(run, rnd, self._rounds.get(run)) + ": "
        elif run is not None:
            where = f"run {run}: "
        logger.warning("%sserver error %s: %s", where, code, reason)
        if run is not None and rnd is not None:
            self._forget_update(run, rnd)

    def on_run_finished(self, fields: Mapping[str, Any]) -> None:
        """Log the end of a run and free what was kept for it."""
        run = fields["run"]
        logger.info("run %d finished: %s", run, fields["status"])
        self._rounds.pop(run, None)
        if self._last_update is not None and self._last_update.key[0] == run:
            self._last_update = None
        self.data.clear()

    def _forget_update(self, run: int, rnd: int) -> None:
        if self._last_update is not None and self._last_update.key[:2] == (run, rnd):
            self._last_update = None


def _nonce() -> str:
    return secrets.token_hex(16)


class _Session:
    """One open websocket: handshake, heartbeats, dispatch. Discarded when it closes."""

    def __init__(self, agent: Agent, ws: ClientConnection, stop: asyncio.Event):
        self.agent = agent
        self.ws = ws
        self.stop = stop
        self.reassembler = protocol.Reassembler()
        self.heartbeat_seconds = 30.0
        self._binary_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        watcher = asyncio.create_task(self._close_on_stop())
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self._handshake()
            heartbeat = asyncio.create_task(self._heartbeat())
            async for message in self.ws:
                await self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            for task in [watcher, heartbeat, *self._tasks]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in [watcher, heartbeat, *self._tasks] if t is not None),
                return_exceptions=True,
            )
        if self.ws.close_code in AUTH_CLOSE_CODES:
            raise AuthRefused(f"connection closed with code {self.ws.close_code}")
        if not self.stop.is_set():
            raise SessionLost(_describe_close(self.ws))

    async def _close_on_stop(self) -> None:
        await self.stop.wait()
        logger.info("closing the connection")
        await self.ws.close(1000, "site agent stopping")

    async def _handshake(self) -> None:
        hello: dict[str, Any] = {"agent_version": __version__}
        if self.agent.config.agent.name:
            hello["site"] = self.agent.config.agent.name
        await self.send_control("hello", **hello)
        try:
            fields = await asyncio.wait_for(self._await_welcome(), WELCOME_TIMEOUT_SECONDS)
        except TimeoutError:
            raise SessionLost(
                f"no welcome from the server within {WELCOME_TIMEOUT_SECONDS:.0f} s"
            ) from None
        self.agent.silo = fields["silo"]
        self.heartbeat_seconds = max(MIN_HEARTBEAT_SECONDS, float(fields["heartbeat_seconds"]))
        self.agent.backoff.reset()
        self.agent.sessions += 1
        logger.info(
            "connected to %s as silo %r of consortium %r",
            self.agent.config.server.url,
            fields["silo"],
            fields["consortium"],
        )

    async def _await_welcome(self) -> dict[str, Any]:
        while True:
            message = await self.ws.recv()
            if not isinstance(message, str):
                logger.warning("ignoring a binary frame received before welcome")
                continue
            try:
                fields = protocol.decode_control(message)
            except protocol.ProtocolError as exc:
                raise SessionLost(f"bad message instead of welcome: {exc}") from None
            if fields["type"] == "welcome":
                return fields
            if fields["type"] == "error":
                self.agent.on_error(fields)  # raises AuthRefused on auth_failed
                raise SessionLost(f"server error before welcome: {fields['code']}")
            logger.warning("ignoring %r received before welcome", fields["type"])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            await self.send_control("heartbeat", ts=time.time(), state=self.agent.state)

    async def _dispatch(self, message: str | bytes) -> None:
        if isinstance(message, str):
            try:
                fields = protocol.decode_control(message)
            except protocol.ProtocolError as exc:
                await self._reject_frame(exc)
                return
            await self._on_control(fields)
            return
        try:
            binary = self.reassembler.feed(message)
        except protocol.ProtocolError as exc:
            await self._reject_frame(exc)
            return
        if binary is None:
            return
        if binary.type == "task":
            self._spawn(self.agent.handle_task(binary, self), binary.fields)
        else:
            logger.warning("ignoring a %r binary message (not for agents)", binary.type)

    async def _on_control(self, fields: dict[str, Any]) -> None:
        kind = fields["type"]
        if kind == "stats_request":
            self._spawn(self.agent.handle_stats_request(fields, self), fields)
        elif kind == "update_ack":
            self.agent.on_update_ack(fields)
        elif kind == "error":
            self.agent.on_error(fields)
        elif kind == "run_finished":
            self.agent.on_run_finished(fields)
        elif kind == "heartbeat_ack":
            logger.debug("heartbeat acknowledged")
        elif kind == "welcome":
            self.agent.silo = fields["silo"]
        else:
            logger.warning("ignoring a %r message (not for agents)", kind)

    async def _reject_frame(self, exc: protocol.ProtocolError) -> None:
        logger.warning("refused a frame from the server: %s: %s", exc.code, exc)
        await self.send_control("error", code=exc.code, reason=str(exc))

    def _spawn(self, work: Awaitable[None], fields: Mapping[str, Any]) -> None:
        task = asyncio.ensure_future(self._guard(work, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, work: Awaitable[None], fields: Mapping[str, Any]) -> None:
        try:
            await work
        except ConnectionClosed:
            logger.debug("connection closed while handling a request")
        except Exception:
            # A bug, not a refusal: details stay in the local log (they may quote local data).
            logger.exception("failed to handle a %s message", fields.get("type", "task"))
            error: dict[str, Any] = {
                "code": "internal",
                "reason": "the site agent failed to handle the request; see the site's agent log",
            }
            for key in ("run", "round"):
                if isinstance(fields.get(key), int):
                    error[key] = fields[key]
            with contextlib.suppress(ConnectionClosed):
                await self.send_control("error", **error)

    async def send_control(self, msg_type: str, **fields: Any) -> None:
        """Send one JSON control message."""
        await self.ws.send(protocol.encode_control(msg_type, **fields))

    async def send_frames(self, frames: list[bytes]) -> None:
        """Send the frames of one binary message, never interleaved with another transfer."""
        async with self._binary_lock:
            for frame in frames:
                await self.ws.send(frame)


async def run_agent(
    config: SiteConfig, *, stop: asyncio.Event | None = None, **options: Any
) -> int:
    """Run the site agent until ``stop`` is set or the server refuses the token.

    Args:
        config: the parsed site.toml (see :func:`clientagent.config.load_config`).
        stop: set it to close the websocket cleanly and return EXIT_OK (the CLI sets it on
            SIGINT/SIGTERM).
        **options: keyword arguments for :class:`Agent` (backoff, progress_stream, ...).

    Returns:
        EXIT_OK (0) after ``stop``; EXIT_AUTH (3) when the token was refused.
    """
    return await Agent(config, **options).run(stop)
