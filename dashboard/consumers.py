"""/ws/live/: live dashboard events for a logged-in user, only of runs the user may see."""

from __future__ import annotations

from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from federation import dispatch, permissions
from federation.peer import PeerAware

# Close codes (4000-4999 are the application's): the page shows "sign in again" for this one.
CLOSE_UNAUTHENTICATED = 4401


@database_sync_to_async
def _may_see_run(user: Any, run_id: Any) -> bool:
    """Whether the run belongs to one of the user's consortia, as of now."""
    if isinstance(run_id, bool) or not isinstance(run_id, int):
        return False
    return permissions.runs_visible_to(user).filter(pk=run_id).exists()


class LiveConsumer(PeerAware, AsyncJsonWebsocketConsumer):
    """Forwards the orchestrator's ``live.event`` messages (published after commit to the
    ``live`` group) to a dashboard, dropping events of runs outside the user's consortia.

    Membership is re-checked per event, so a removed member stops receiving at once. A page
    closed while an event was on its way still leaves the group (federation/peer.py).
    """

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated:
            await self.close(code=CLOSE_UNAUTHENTICATED)
            return
        self.user = user
        await self.channel_layer.group_add(dispatch.LIVE_GROUP, self.channel_name)
        await self.accept()

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(dispatch.LIVE_GROUP, self.channel_name)

    async def receive_json(self, content: Any, **kwargs: Any) -> None:
        """Browsers only listen; a ping gets a pong so a page can check the connection."""
        if isinstance(content, dict) and content.get("type") == "ping":
            await self.send_json({"type": "pong"})

    async def live_event(self, event: dict[str, Any]) -> None:
        """Forward one orchestrator event if the user may see its run."""
        if await _may_see_run(self.user, event.get("run")):
            await self.send_json({key: value for key, value in event.items() if key != "type"})
