"""The agent websocket at /ws/agent/: token auth, hello/heartbeat, task dispatch, update receipt.

Thin: every decision is in services, selectors and the orchestrator. Every refused message gets
an ``error`` frame with a code and a reason, and the connection (and the round) goes on.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings

from fedcore import protocol
from federation import dispatch, secagg_rounds, selectors
from federation.services import silos as silo_services
from federation.services import updates as update_services

log = logging.getLogger("quorum.agent_ws")

CLOSE_AUTH_FAILED = 4401
CLOSE_REPLACED = 4409


def bearer_token(scope: dict[str, Any]) -> str:
    """The token of an `Authorization: Bearer ...` header, or ''."""
    for name, value in scope.get("headers", []):
        if name.lower() == b"authorization":
            kind, _, token = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer":
                return token.strip()
    return ""


class AgentConsumer(AsyncWebsocketConsumer):
    """One connected site agent."""

    silo_id: int | None = None
    silo_name: str = ""
    hello_done: bool = False
    replaced: bool = False  # a newer connection of the silo took over

    async def connect(self) -> None:
        """Accept, then authenticate the silo by its token."""
        if settings.QUORUM_PROFILE == "embedded" and settings.QUORUM_EMBEDDED_ORCHESTRATOR:
            dispatch.embedded.attach(asyncio.get_running_loop())
        await self.accept()
        silo = await database_sync_to_async(silo_services.silo_authenticate)(
            token=bearer_token(self.scope)
        )
        if silo is None:
            log.warning("agent connection refused: unknown or revoked token")
            await self.send_error(
                "auth_failed", "the token is unknown or revoked; ask the consortium admin for one"
            )
            await self.close(code=CLOSE_AUTH_FAILED)
            return
        self.silo_id, self.silo_name = silo.pk, silo.name
        self.reassembler = protocol.Reassembler(
            max_message_bytes=settings.QUORUM_MAX_MESSAGE_BYTES,
            max_frame_bytes=settings.QUORUM_MAX_FRAME_BYTES,
        )

    async def disconnect(self, code: int) -> None:
        """Forget the connection unless a newer one replaced it."""
        if self.silo_id is None:
            return
        await self.channel_layer.group_discard(dispatch.silo_group(self.silo_id), self.channel_name)
        await database_sync_to_async(silo_services.silo_disconnect)(
            silo_id=self.silo_id, connection_id=self.channel_name
        )
        if self.hello_done and not self.replaced:  # its secagg secrets went with the session
            await database_sync_to_async(secagg_rounds.silo_gone)(self.silo_id)
        log.info("silo %s disconnected (code %s)", self.silo_name, code)

    async def send_error(self, code: str, reason: str, **fields: Any) -> None:
        """Send an error control frame."""
        await self.send(text_data=protocol.encode_error(code, reason, **fields))

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
            await self.send_error(exc.code, str(exc))
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
        replaced = await database_sync_to_async(silo_services.silo_connect)(
            silo_id=self.silo_id,
            connection_id=self.channel_name,
            agent_version=msg["agent_version"],
        )
        if replaced:
            await self.channel_layer.send(replaced, {"type": "session.replaced"})
        # A (re)connection starts with no secure-aggregation state at the agent: the silo is a
        # dropout of any secure round attempt in progress.
        await database_sync_to_async(secagg_rounds.silo_gone)(self.silo_id)
        await self.channel_layer.group_add(dispatch.silo_group(self.silo_id), self.channel_name)
        self.hello_done = True
        silo = await database_sync_to_async(
            lambda: selectors.Silo.objects.select_related("consortium").get(pk=self.silo_id)
        )()
        await self.send(
            text_data=protocol.encode_control(
                "welcome",
                silo=silo.name,
                silo_id=silo.pk,
                consortium=silo.consortium.name,
                heartbeat_seconds=settings.QUORUM_HEARTBEAT_SECONDS,
            )
        )
        log.info("silo %s connected (agent %s)", silo.name, msg["agent_version"])
        for event in await database_sync_to_async(selectors.pending_work)(silo_id=self.silo_id):
            await self.dispatch(event)

    async def on_heartbeat(self, msg: dict[str, Any]) -> None:
        """Record liveness."""
        assert self.silo_id is not None
        await database_sync_to_async(silo_services.silo_heartbeat)(
            silo_id=self.silo_id, connection_id=self.channel_name
        )
        if not self.replaced:
            # Re-join the silo's group: a Redis channel layer forgets members after its
            # group_expiry (agents stay connected for days) and everything when Redis restarts.
            await self.channel_layer.group_add(dispatch.silo_group(self.silo_id), self.channel_name)
        await self.send(text_data=protocol.encode_control("heartbeat_ack", ts=msg.get("ts", 0.0)))

    async def on_stats(self, msg: dict[str, Any]) -> None:
        """Store the silo's local statistics."""
        assert self.silo_id is not None
        try:
            await database_sync_to_async(update_services.stats_receive)(
                silo_id=self.silo_id, run_id=msg["run"], stats=msg["stats"]
            )
        except update_services.Refused as exc:
            await self.send_error(exc.code, exc.reason, run=msg["run"])

    async def on_secagg(self, msg: dict[str, Any]) -> None:
        """One secure-aggregation stage reply: to the round attempt's coordinator."""
        assert self.silo_id is not None
        try:
            await database_sync_to_async(secagg_rounds.receive)(silo_id=self.silo_id, fields=msg)
        except update_services.Refused as exc:
            log.warning("secagg message from silo %s refused: %s", self.silo_name, exc)
            await self.send_error(exc.code, exc.reason, run=msg["run"], round=msg["round"])

    async def on_error(self, msg: dict[str, Any]) -> None:
        """An agent reports a problem or a refusal (data that fails the schema, its site policy)."""
        log.warning("silo %s reports %s: %s", self.silo_name, msg["code"], msg["reason"])
        if msg.get("run") is not None and msg.get("round") is not None:
            # It will not contribute to that round: a secure round stops waiting for it.
            await database_sync_to_async(secagg_rounds.silo_gone)(
                self.silo_id, run_id=msg["run"], number=msg["round"]
            )
        await database_sync_to_async(update_services.agent_report)(
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
        try:
            message = self.reassembler.feed(frame)
        except protocol.ProtocolError as exc:
            await self.send_error(exc.code, str(exc))
            return
        if message is None:
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
        try:
            await database_sync_to_async(update_services.update_receive)(
                silo_id=self.silo_id, fields=fields, payload=message.payload
            )
        except update_services.Refused as exc:
            log.warning("update from silo %s refused: %s", self.silo_name, exc)
            await self.send_error(exc.code, exc.reason, run=fields["run"], round=fields["round"])
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
            await database_sync_to_async(secagg_rounds.receive_masked)(
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
        if "client" in event:
            fields["client"] = event["client"]
        await self.send(text_data=protocol.encode_control("secagg", **fields))

    async def round_task(self, event: dict[str, Any]) -> None:
        """Send the silo its task for a round, with the global model."""
        if secagg_rounds.is_dropout(event["round_id"], self.silo_id):
            return  # it dropped out of the attempt's secure aggregation: nothing to train for
        message = await database_sync_to_async(selectors.task_message)(
            round_id=event["round_id"], silo_id=self.silo_id
        )
        if message is None:
            return
        for frame in protocol.encode_binary(
            message, max_frame_bytes=settings.QUORUM_MAX_FRAME_BYTES
        ):
            await self.send(bytes_data=frame)

    async def run_stats_request(self, event: dict[str, Any]) -> None:
        """Ask the silo for its local statistics."""
        fields = await database_sync_to_async(selectors.stats_request_fields)(
            run_id=event["run_id"], silo_id=self.silo_id
        )
        if fields is not None:
            await self.send(text_data=protocol.encode_control("stats_request", **fields))

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
