"""The audit log (auditors and consortium admins) and what anyone may pin: its head, the key."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response

from federation import selectors, signing
from federation.api.filters import AuditEventFilter
from federation.api.serializers import (
    AuditEventSerializer,
    AuditHeadSerializer,
    ServerKeySerializer,
)
from federation.api.views.base import ApiListView, ApiView
from federation.models import AuditEvent
from federation.services.audit import audit_head


class AuditEventListView(ApiListView):
    """Audit events of the consortia where the user is an auditor or consortium admin."""

    serializer_class = AuditEventSerializer
    filterset_class = AuditEventFilter

    def get_queryset(self):
        if self.schema_only:
            return AuditEvent.objects.none()
        return selectors.audit_event_list(self.request.user)


class AuditHeadView(ApiView):
    @extend_schema(
        responses=AuditHeadSerializer,
        summary="The newest event's index and hash (keep a copy elsewhere to detect truncation)",
    )
    def get(self, request: Request) -> Response:
        return Response(AuditHeadSerializer(audit_head()).data)


class ServerKeyView(ApiView):
    @extend_schema(
        responses=ServerKeySerializer,
        summary="The server's Ed25519 public key, which site agents pin",
    )
    def get(self, request: Request) -> Response:
        return Response(ServerKeySerializer({"public_key": signing.server_public_key_text()}).data)
