"""The agent websocket at /ws/agent/: token auth, hello/heartbeat, task dispatch, update receipt.

Thin: it parses frames, calls one service (or selector) per message and sends the reply; every
decision, including when a silo drops out of a secure round, is in services. Every refused message gets
an ``error`` frame with a code and a reason, and the connection (and the round) goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine
from typing import Any

from channels.consumer import get_handler_name
from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from fedcore import model_kinds, protocol
from federation import dispatch, selectors, throttle
from federation.peer import PeerAware, PeerGone
from federation.services import agent_auth, agent_reports
from federation.services import analysis as analysis_services
from federation.services import evaluation as evaluation_services
from federation.services import refusals as refusal_services
from federation.services import secagg as secagg_services
from federation.services import silos as silo_services
from federation.services import updates as update_services

log = logging.getLogger("quorum.agent_ws")

CLOSE_AUTH_FAILED = 4401
CLOSE_HELLO_TIMEOUT = 4408
CLOSE_REPLACED = 4409
# RFC 6455 "try again later": an address refused after too many bad tokens. Not an auth close
# code, so an agent behind the same address reconnects after its backoff instead of stopping.
CLOSE_TRY_AGAIN_LATER = 1013
CLOSE_BAD_HELLO = 4400  # a hello the server cannot accept (its error frame says why)

# Per process, never the database: see federation/throttle.py.
_auth_failures: throttle.AuthFailureLimiter | None = None
_auth_audit: throttle.AuthFailureAudit | None = None


def auth_failure_tracking() -> tuple[throttle.AuthFailureLimiter, throttle.AuthFailureAudit]:
    """This process's token-failure limiter and audit aggregator (built from settings once)."""
    global _auth_failures, _auth_audit
    if _auth_failures is None or _auth_audit is None:
        _auth_failures = throttle.AuthFailureLimiter(
            limit=settings.QUORUM_AGENT_AUTH_FAILURE_LIMIT,
            window=settings.QUORUM_AGENT_AUTH_FAILURE_WINDOW_SECONDS,
            max_pending=settings.QUORUM_AGENT_AUTH_MAX_PENDING,
        )
        _auth_audit = throttle.AuthFailureAudit(
            interval=settings.QUORUM_AGENT_AUTH_AUDIT_INTERVAL_SECONDS
        )
    return _auth_failures, _auth_audit


def reset_auth_failure_tracking() -> None:
    """Forget every address's failures (tests; settings changes)."""
    global _auth_failures, _auth_audit
    _auth_failures = _auth_audit = None


def bearer_token(scope: dict[str, Any]) -> str:
    """The token of an `Authorization: Bearer ...` header, or ''."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer":
                return token.strip()
    return ""


class AgentConsumer(PeerAware, AsyncWebsocketConsumer):
    """One connected site agent.

    An agent that vanishes while the server still answers it (its welcome, a task's frames, an
    ack) ends that handler only: the connection is then handled as closed, like any other
    (federation/peer.py).
    """

    silo_id: int | None = None
    silo_name: str = ""
    hello_done: bool = False
    hello_received: bool = False  # a hello frame arrived (it may still wait for the database)
    replaced: bool = False  # a newer connection of the silo took over
    # Deadlines of a slow peer (docs/security.md, "Hostile input"): hello, and a stalled upload.
    hello_timer: asyncio.TimerHandle | None = None
    upload_timer: asyncio.TimerHandle | None = None
    # Tasks to send again after the server failed to store an update (round id -> attempts).
    asked_again: dict[int, int]
    resend_timers: dict[int, asyncio.TimerHandle]

    async def connect(self) -> None:
        """Accept, then authenticate the silo by its token."""
        dispatch.attach_server_loop(asyncio.get_running_loop())
        await self.accept()
        address = throttle.client_address(self.scope)
        limiter, audit = auth_failure_tracking()
        if limiter.blocked(address) or not limiter.begin(address):
            # No token look-up at all: a flood from one address costs one dict read each.
            await self.record_auth_failure(audit.failed(address, blocked=True))
            await self.close(code=CLOSE_TRY_AGAIN_LATER)
            return
        try:
            silo = await database_sync_to_async(silo_services.silo_authenticate)(
                token=bearer_token(self.scope)
            )
        finally:
            limiter.end(address)
        if silo is None:
            now_blocked = limiter.failed(address)
            log.warning(
                "agent connection from %s refused: unknown or revoked token%s",
                address,
                "; the address is now blocked for a while" if now_blocked else "",
            )
            await self.record_auth_failure(audit.failed(address))
            await self.send_error(
                "auth_failed", "the token is unknown or revoked; ask the consortium admin for one"
            )
            await self.close(code=CLOSE_AUTH_FAILED)
            return
        self.silo_id, self.silo_name = silo.pk, silo.name
        self.reassembler = protocol.Reassembler(
            max_message_bytes=settings.QUORUM_MAX_MESSAGE_BYTES,
            max_frame_bytes=settings.QUORUM_MAX_FRAME_BYTES,
            # Large uploads go to an anonymous file on the blob store's filesystem as they
            # arrive: not held in memory, and stored by linking that file (federation.storage).
            spool_dir=settings.QUORUM_BLOB_DIR,
        )
        self.deadline_tasks: set[asyncio.Future[None]] = set()
        self.asked_again, self.resend_timers = {}, {}
        self.hello_timer = asyncio.get_running_loop().call_later(
            settings.QUORUM_HELLO_TIMEOUT_SECONDS, self.deadline_passed, "hello"
        )

    async def record_auth_failure(self, data: dict[str, Any] | None) -> None:
        """Write the aggregated audit event of refused tokens, when one is due."""
        if data is not None:
            await database_sync_to_async(agent_auth.agent_auth_failures_record)(data=data)

    def deadline_passed(self, what: str) -> None:
        """A slow-peer deadline fired (a loop callback): handle it in a task."""
        handler = self.hello_timed_out if what == "hello" else self.upload_timed_out
        self.in_task(handler())

    def in_task(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a timer's work in a task (referenced until done); a peer gone meanwhile ends it
        quietly, its disconnect handler runs anyway."""

        async def unless_peer_gone() -> None:
            try:
                await work
            except PeerGone:
                log.info("silo %s: gone before the server could answer it", self.silo_name)

        task = asyncio.ensure_future(unless_peer_gone())
        self.deadline_tasks.add(task)
        task.add_done_callback(self.deadline_tasks.discard)

    async def hello_timed_out(self) -> None:
        """No hello in time: close, so idle authenticated sockets cannot pile up.

        A hello that arrived but still waits for the database (a busy server) counts as in
        time: closing it would only start a reconnect storm."""
        if self.hello_done or self.hello_received:
            return
        log.warning("silo %s sent no hello in time: closing", self.silo_name)
        await self.send_error(
            "timeout",
            f"no 'hello' within {settings.QUORUM_HELLO_TIMEOUT_SECONDS:g} s of connecting",
        )
        await self.close(code=CLOSE_HELLO_TIMEOUT)

    async def upload_timed_out(self) -> None:
        """The chunks of a binary message stopped arriving: drop it and free its buffer."""
        self.upload_timer = None
        self.reassembler.reset()
        log.warning("silo %s: chunked upload stalled; dropped", self.silo_name)
        await self.send_error(
            "timeout",
            "the chunked message stalled: no frame for "
            f"{settings.QUORUM_UPLOAD_STALL_SECONDS:g} s; it was dropped, send it again",
        )

    def cancel_deadlines(self) -> None:
        """Stop the hello, upload and resend timers (the connection is going away)."""
        resends = getattr(self, "resend_timers", {})  # none before authentication
        for timer in (self.hello_timer, self.upload_timer, *resends.values()):
            if timer is not None:
                timer.cancel()
        self.hello_timer = self.upload_timer = None

    def ask_again(self, round_id: int, deadline: float) -> None:
        """Send the round's task again after a back-off (doubling, at most 30 s), if that is
        before the round's deadline: the server failed to store the update, not the site.
        (A reconnection gets the task anyway: selectors.pending_work.)"""
        tries = self.asked_again.get(round_id, 0) + 1
        self.asked_again[round_id] = tries
        delay = min(30.0, settings.QUORUM_BLOB_RETRY_SECONDS * 2 ** (tries - 1))
        if time.time() + delay >= deadline:
            log.warning("silo %s: round id %d closes before another try", self.silo_name, round_id)
            return
        log.info(
            "silo %s: asking for the update of round id %d again in %g s",
            self.silo_name,
            round_id,
            delay,
        )
        previous = self.resend_timers.pop(round_id, None)
        if previous is not None:
            previous.cancel()
        self.resend_timers[round_id] = asyncio.get_running_loop().call_later(
            delay, self.resend_task, round_id
        )

    def resend_task(self, round_id: int) -> None:
        """A resend back-off ended (a loop callback): send the task in a task."""
        self.resend_timers.pop(round_id, None)
        self.in_task(self.round_task({"round_id": round_id}))

    async def disconnect(self, code: int) -> None:
        """Forget the connection unless a newer one replaced it."""
        self.cancel_deadlines()
        if self.silo_id is None:
            return
        self.reassembler.reset()  # free a partial upload now, not when the consumer is collected
        await self.channel_layer.group_discard(dispatch.silo_group(self.silo_id), self.channel_name)
        await database_sync_to_async(silo_services.agent_goodbye)(
            silo_id=self.silo_id,
            connection_id=self.channel_name,
            greeted=self.hello_done,
            replaced=self.replaced,
        )
        log.info("silo %s disconnected (code %s)", self.silo_name, code)

    async def send_error(self, code: str, reason: str, **fields: Any) -> None:
        """Send an error control frame."""
        await self.send(text_data=protocol.encode_error(code, reason, **fields))

    async def refuse_frame(self, exc: protocol.ProtocolError) -> None:
        """A frame broke the protocol: audited (within the silo's budget), answered with an error
        frame; the connection goes on."""
        await database_sync_to_async(agent_reports.agent_frame_refused)(
            silo_id=self.silo_id, code=exc.code, reason=str(exc)
        )
        await self.send_error(exc.code, str(exc))

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Channels' dispatch, minus its database clean-up hop before every message.

        Channels runs ``close_old_connections`` in its sync thread before every handler: a
        thread round trip per frame (about 100 for a 100 MB update) and per channel-layer
        event (each round's task, each heartbeat), queued on the one database thread behind
        every other connection's work. No handler here touches the database except through
        ``database_sync_to_async``, which closes stale connections itself before and after,
        so the hop only delayed each message (bench/round_split.py: 6-8 hops a round).

        A handler cut short because the agent vanished meanwhile is not an error: uvicorn has
        queued the disconnect message, which this loop handles next (federation/peer.py).
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"no handler for message type {message['type']}")
        try:
            await handler(message)
        except PeerGone as exc:
            log.info("silo %s: %s (handling %s)", self.silo_name, exc, message["type"])

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        """Route a frame: text frames are control messages, binary frames carry tensors."""
        if self.silo_id is None:
            return
        if text_data is not None:
            await self.receive_control(text_data)
        elif bytes_data is not None:
            await self.receive_binary(bytes_data)

    async def receive_control(self, text: str) -> None:
        """Handle one JSON control message."""
        try:
            msg = protocol.decode_control(text)
        except protocol.ProtocolError as exc:
            await self.refuse_frame(exc)
            return
        kind = msg["type"]
        if not self.hello_done and kind != "hello":
            await self.send_error("invalid_field", f"'{kind}' before 'hello': say hello first")
            return
        handler = getattr(self, f"on_{kind}", None)
        if handler is None:
            await self.send_error(
                "unknown_type", f"the server does not accept '{kind}' from agents"
            )
            return
        await handler(msg)

    async def on_hello(self, msg: dict[str, Any]) -> None:
        """Register the connection, welcome the agent and hand it any work it still owes."""
        assert self.silo_id is not None
        self.hello_received = True
        # Join the silo's group first: the silo looks online once the hello is registered,
        # and the orchestrator may send it work from then on. Whatever it sends now either
        # reaches this channel (handled after the welcome) or was committed before the hello
        # reads the pending work; at worst the agent hears of a task twice, which it tolerates
        # (it reuses the update already built). Joined after the registration, an event sent
        # in between reached no one: a stats request or a round's task the agent never saw,
        # and the run waited for the silo until its deadline.
        try:  # the installed model kinds this site offers (docs/tasks.md)
            kinds = model_kinds.check_announcement(
                (msg.get("capabilities") or {}).get("models", [])
            )
        except ValueError as exc:
            await self.send_error("invalid_field", f"hello: {exc}")
            await self.close(code=CLOSE_BAD_HELLO)
            return
        await self.channel_layer.group_add(dispatch.silo_group(self.silo_id), self.channel_name)
        welcome = await database_sync_to_async(silo_services.agent_hello)(
            silo_id=self.silo_id,
            connection_id=self.channel_name,
            agent_version=msg["agent_version"],
            model_kinds=kinds,
        )
        if welcome.replaced:
            await self.channel_layer.send(welcome.replaced, {"type": "session.replaced"})
        self.hello_done = True
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        await self.send(
            text_data=protocol.encode_control(
                "welcome",
                silo=welcome.silo_name,
                silo_id=welcome.silo_id,
                consortium=welcome.consortium,
                heartbeat_seconds=settings.QUORUM_HEARTBEAT_SECONDS,
            )
        )
        log.info("silo %s connected (agent %s)", welcome.silo_name, msg["agent_version"])
        for event in welcome.pending:
            await self.dispatch(event)

    async def on_heartbeat(self, msg: dict[str, Any]) -> None:
        """Record liveness."""
        assert self.silo_id is not None
        dispatch.heartbeats.record(self.silo_id, self.channel_name)  # batched: dispatch.py
        if not self.replaced:
            # Re-join the silo's group: a Redis channel layer forgets members after its
            # group_expiry (agents stay connected for days) and everything when Redis restarts.
            await self.channel_layer.group_add(dispatch.silo_group(self.silo_id), self.channel_name)
        await self.send(text_data=protocol.encode_control("heartbeat_ack", ts=msg.get("ts", 0.0)))

    async def on_ready(self, msg: dict[str, Any]) -> None:
        """The site accepts work again (a new local decision): runs it refused may select it."""
        assert self.silo_id is not None
        await database_sync_to_async(refusal_services.silo_refusals_lift)(
            silo_id=self.silo_id, why="the agent reported a new local decision (ready)"
        )

    async def on_stats(self, msg: dict[str, Any]) -> None:
        """Store the silo's local statistics."""
        assert self.silo_id is not None
        try:
            await database_sync_to_async(update_services.stats_receive)(
                silo_id=self.silo_id,
                run_id=msg["run"],
                stats=msg["stats"],
                label_counts=msg.get("label_counts"),
            )
        except update_services.Refused as exc:
            await self.send_error(exc.code, exc.reason, run=msg["run"])

    async def on_analysis(self, msg: dict[str, Any]) -> None:
        """The silo's answer to a step of an analysis run."""
        assert self.silo_id is not None
        try:
            await database_sync_to_async(analysis_services.analysis_receive)(
                silo_id=self.silo_id, fields=msg
            )
        except update_services.Refused as exc:
            await self.send_error(exc.code, exc.reason, run=msg["run"])

    async def on_evaluation(self, msg: dict[str, Any]) -> None:
        """The silo's evaluation of the run's final model."""
        assert self.silo_id is not None
        try:
            await database_sync_to_async(evaluation_services.evaluation_receive)(
                silo_id=self.silo_id, fields=msg
            )
        except update_services.Refused as exc:
            log.warning("evaluation from silo %s refused: %s", self.silo_name, exc)
            await self.send_error(exc.code, exc.reason, run=msg["run"])

    async def on_secagg(self, msg: dict[str, Any]) -> None:
        """One secure-aggregation stage reply: to the round attempt's coordinator."""
        assert self.silo_id is not None
        try:
            await database_sync_to_async(secagg_services.secagg_stage_receive)(
                silo_id=self.silo_id, fields=msg
            )
        except update_services.Refused as exc:
            log.warning("secagg message from silo %s refused: %s", self.silo_name, exc)
            await self.send_error(exc.code, exc.reason, run=msg["run"], round=msg["round"])

    async def on_error(self, msg: dict[str, Any]) -> None:
        """An agent reports a problem or a refusal (data that fails the schema, its site policy)."""
        log.warning("silo %s reports %s: %s", self.silo_name, msg["code"], msg["reason"])
        await database_sync_to_async(silo_services.agent_error)(
            silo_id=self.silo_id,
            code=msg["code"],
            reason=msg["reason"],
            run_id=msg.get("run"),
            round_number=msg.get("round"),
        )

    async def receive_binary(self, frame: bytes) -> None:
        """Feed a binary frame to the reassembler; handle a complete update."""
        if not self.hello_done:
            await self.send_error("invalid_field", "binary frame before 'hello': say hello first")
            return
        if self.upload_timer is not None:
            self.upload_timer.cancel()
            self.upload_timer = None
        try:
            message = self.reassembler.feed(frame)
        except protocol.ProtocolError as exc:
            await self.refuse_frame(exc)
            return
        if message is None:
            # A transfer is open: its next frame must come within the stall deadline.
            self.upload_timer = asyncio.get_running_loop().call_later(
                settings.QUORUM_UPLOAD_STALL_SECONDS, self.deadline_passed, "upload"
            )
            return
        if message.type == "masked_update":
            await self.receive_masked_update(message)
            return
        if message.type != "update":
            await self.send_error(
                "unknown_type",
                f"agents may only send 'update' or 'masked_update', not '{message.type}'",
            )
            return
        fields = message.fields
        sent_at = fields.get("sent_at")
        if sent_at is not None and isinstance(fields.get("metrics"), dict):
            # The update's transfer time, agent clock to server clock (one host in a benchmark;
            # across machines it includes their clock offset): recorded as metric
            # transfer.upload_seconds next to what the agent measured.
            fields["metrics"]["transfer"] = {"upload_seconds": max(0.0, time.time() - sent_at)}
        try:
            # Not on the one database thread every connection shares: a receipt's blob write
            # (two fsyncs) and checks would queue the whole round's updates one after another
            # (50 sites: 1.5 s a round, bench/round_split.py). Its own transaction and row lock
            # keep concurrent receipts correct, as with several server processes.
            await database_sync_to_async(update_services.update_receive, thread_sensitive=False)(
                silo_id=self.silo_id, fields=fields, payload=message.payload
            )
        except update_services.Refused as exc:
            log.warning("update from silo %s refused: %s", self.silo_name, exc)
            await self.send_error(exc.code, exc.reason, run=fields["run"], round=fields["round"])
            if exc.ask_again is not None:
                self.ask_again(*exc.ask_again)
            return
        await self.send(
            text_data=protocol.encode_control(
                "update_ack", run=fields["run"], round=fields["round"], status="accepted"
            )
        )

    async def receive_masked_update(self, message: protocol.BinaryMessage) -> None:
        """A secure round's masked vector: accounted for, added to the masked sum, never stored."""
        fields = message.fields
        try:
            await database_sync_to_async(secagg_services.secagg_masked_receive)(
                silo_id=self.silo_id, fields=fields, payload=message.payload
            )
        except update_services.Refused as exc:
            log.warning("masked update from silo %s refused: %s", self.silo_name, exc)
            await self.send_error(exc.code, exc.reason, run=fields["run"], round=fields["round"])
            return
        await self.send(
            text_data=protocol.encode_control(
                "update_ack", run=fields["run"], round=fields["round"], status="accepted"
            )
        )

    # Channel-layer events (dotted types route here: round.task -> round_task).

    async def secagg_message(self, event: dict[str, Any]) -> None:
        """Relay a secure-aggregation request of the round's coordinator to the agent."""
        fields = {k: event[k] for k in ("run", "round", "attempt", "stage", "payload")}
        for optional in ("client", "step"):
            if optional in event:
                fields[optional] = event[optional]
        await self.send(text_data=protocol.encode_control("secagg", **fields))

    async def round_task(self, event: dict[str, Any]) -> None:
        """Send the silo its task for a round, with the global model."""
        if "task" in event:  # signed when the round opened: only the model's bytes to add
            message = await asyncio.to_thread(selectors.prebuilt_task, event)
        else:
            # A read and a grant signature: in the thread pool, so that a round's tasks are
            # built side by side instead of one after another on the shared database thread.
            message = await database_sync_to_async(
                secagg_services.round_task_for, thread_sensitive=False
            )(round_id=event["round_id"], silo_id=self.silo_id)
        if message is None:
            return
        message.fields["sent_at"] = time.time()  # the task's transfer starts (round_split)
        # Hashing and framing megabytes off the event loop: 200 tasks at once stalled it for
        # seconds and every connection's keepalive with it (bench/load.py).
        frames = await asyncio.to_thread(
            protocol.encode_binary, message, max_frame_bytes=settings.QUORUM_MAX_FRAME_BYTES
        )
        for frame in frames:
            await self.send(bytes_data=frame)

    async def run_stats_request(self, event: dict[str, Any]) -> None:
        """Ask the silo for its local statistics."""
        fields = await database_sync_to_async(selectors.stats_request_fields)(
            run_id=event["run_id"], silo_id=self.silo_id
        )
        if fields is not None:
            await self.send(text_data=protocol.encode_control("stats_request", **fields))

    async def run_analysis_request(self, event: dict[str, Any]) -> None:
        """Ask the silo for the current step of an analysis run."""
        fields = await database_sync_to_async(selectors.analysis_request_fields)(
            run_id=event["run_id"], silo_id=self.silo_id
        )
        if fields is not None:
            await self.send(text_data=protocol.encode_control("analysis_request", **fields))

    async def run_evaluate(self, event: dict[str, Any]) -> None:
        """Send the silo the run's final model to evaluate on its held-out rows."""
        message = await database_sync_to_async(selectors.evaluate_message, thread_sensitive=False)(
            run_id=event["run_id"], silo_id=self.silo_id
        )
        if message is None:
            return
        message.fields["sent_at"] = time.time()
        frames = await asyncio.to_thread(
            protocol.encode_binary, message, max_frame_bytes=settings.QUORUM_MAX_FRAME_BYTES
        )
        for frame in frames:
            await self.send(bytes_data=frame)

    async def plan_offer(self, event: dict[str, Any]) -> None:
        """Tell the agent about a plan version that names its silo, for local review."""
        fields = await database_sync_to_async(selectors.plan_offer_fields)(
            version_id=event["version_id"], silo_id=self.silo_id
        )
        if fields is not None:
            await self.send(text_data=protocol.encode_control("plan_offer", **fields))

    async def run_finished(self, event: dict[str, Any]) -> None:
        """Tell the agent a run it took part in is over."""
        await self.send(
            text_data=protocol.encode_control(
                "run_finished", run=event["run_id"], status=event["status"]
            )
        )

    async def session_replaced(self, event: dict[str, Any]) -> None:
        """A newer connection of the same silo took over: close this one."""
        self.replaced = True
        await self.send_error("replaced", "a newer connection of this silo took over")
        await self.close(code=CLOSE_REPLACED)
