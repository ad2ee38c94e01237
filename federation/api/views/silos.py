"""Silos: registration by a data steward, admission by the consortium admin, agent tokens."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from federation import permissions, selectors
from federation.api.filters import SiloFilter
from federation.api.serializers import (
    AgentTokenSerializer,
    SiloBudgetReportSerializer,
    SiloBudgetSerializer,
    SiloDetailSerializer,
    SiloRegisterSerializer,
    SiloRejectSerializer,
    SiloSerializer,
)
from federation.api.views.base import ApiListView, ApiView, NoBodySerializer, validated
from federation.services import silos as services


class SiloListView(ApiListView):
    """Silos of the user's consortia; a data steward registers a new one (pending admission)."""

    serializer_class = SiloSerializer
    filterset_class = SiloFilter

    def get_queryset(self):
        return selectors.silo_list(self.request.user)

    @extend_schema(
        request=SiloRegisterSerializer,
        responses={201: SiloDetailSerializer},
        summary="Register a silo of your organisation",
    )
    def post(self, request: Request) -> Response:
        data = validated(SiloRegisterSerializer, request)
        silo = services.silo_register(actor=request.user, **data)
        return Response(SiloDetailSerializer(silo).data, status=status.HTTP_201_CREATED)


class SiloDetailView(ApiView):
    @extend_schema(responses=SiloDetailSerializer, summary="A silo (never its token)")
    def get(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        return Response(SiloDetailSerializer(silo).data)


class SiloAdmitView(ApiView):
    @extend_schema(
        request=None,
        responses=AgentTokenSerializer,
        summary="Admit a silo; returns its agent token, shown only this once",
    )
    def post(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        token = services.silo_admit(actor=request.user, silo=silo)
        return Response(AgentTokenSerializer({"token": token}).data)


class SiloRejectView(ApiView):
    @extend_schema(
        request=SiloRejectSerializer, responses=SiloDetailSerializer, summary="Reject a silo"
    )
    def post(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        data = validated(SiloRejectSerializer, request)
        silo = services.silo_reject(actor=request.user, silo=silo, reason=data["reason"])
        return Response(SiloDetailSerializer(silo).data)


class SiloTokenRotateView(ApiView):
    @extend_schema(
        request=None,
        responses=AgentTokenSerializer,
        summary="Replace a silo's agent token; the old one stops working at once",
    )
    def post(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        token = services.silo_rotate_token(actor=request.user, silo=silo)
        return Response(AgentTokenSerializer({"token": token}).data)


class SiloTokenRevokeView(ApiView):
    @extend_schema(
        request=None,
        responses=SiloDetailSerializer,
        summary="Revoke a silo's agent token (a connected agent is closed)",
    )
    def post(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        silo = services.silo_revoke_token(actor=request.user, silo=silo)
        return Response(SiloDetailSerializer(silo).data)


class SiloBudgetView(ApiView):
    @extend_schema(
        responses=SiloBudgetReportSerializer,
        summary="A silo's privacy budget, its spend over its whole history and its ledger",
    )
    def get(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        return Response(SiloBudgetReportSerializer(selectors.silo_budget_report(silo)).data)

    @extend_schema(
        request=SiloBudgetSerializer,
        responses=SiloBudgetReportSerializer,
        summary="Set or clear a silo's privacy budget (consortium admin)",
    )
    def put(self, request: Request, pk: int) -> Response:
        silo = permissions.access_silo(user=request.user, id=pk)
        data = validated(SiloBudgetSerializer, request)
        silo = services.silo_set_budget(
            actor=request.user, silo=silo, epsilon=data["epsilon"], delta=data["delta"]
        )
        return Response(SiloBudgetReportSerializer(selectors.silo_budget_report(silo)).data)
