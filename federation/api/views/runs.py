"""Runs of approved plans: starting, stopping, rounds and model versions."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from federation import permissions, selectors
from federation.api.filters import RunFilter
from federation.api.serializers import (
    ModelVersionSerializer,
    RoundSerializer,
    RunDetailSerializer,
    RunSerializer,
    RunStartSerializer,
)
from federation.api.views.base import ApiListView, ApiView, NoBodySerializer, validated
from federation.models import ModelVersion, Round
from federation.services import runs as services


class RunListView(ApiListView):
    """Runs of the user's consortia; the plan's proposer or a consortium admin starts one."""

    serializer_class = RunSerializer
    filterset_class = RunFilter

    def get_queryset(self):
        return selectors.run_list(self.request.user)

    @extend_schema(
        request=RunStartSerializer,
        responses={201: RunDetailSerializer},
        summary="Start a run of an approved plan",
    )
    def post(self, request: Request) -> Response:
        data = validated(RunStartSerializer, request)
        run = services.run_start(actor=request.user, plan=data["plan"])
        run = permissions.access_run(user=request.user, id=run.pk)
        return Response(RunDetailSerializer(run).data, status=status.HTTP_201_CREATED)


class RunDetailView(ApiView):
    @extend_schema(responses=RunDetailSerializer, summary="A run and the state of its rounds")
    def get(self, request: Request, pk: int) -> Response:
        run = permissions.access_run(user=request.user, id=pk)
        return Response(RunDetailSerializer(run).data)


class RunStopView(ApiView):
    @extend_schema(request=None, responses=RunDetailSerializer, summary="Stop an active run")
    def post(self, request: Request, pk: int) -> Response:
        run = permissions.access_run(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        services.run_stop(actor=request.user, run=run)
        run = permissions.access_run(user=request.user, id=pk)
        return Response(RunDetailSerializer(run).data)


class RunRoundListView(ApiListView):
    """A run's rounds: selected and answering silos, round-level metrics."""

    serializer_class = RoundSerializer

    def get_queryset(self):
        if self.schema_only:
            return Round.objects.none()
        run = permissions.access_run(user=self.request.user, id=self.kwargs["pk"])
        return selectors.run_rounds(run, summary_metrics=True)


class RunModelListView(ApiListView):
    """A run's global model versions (checksum and size; the weights stay on the server)."""

    serializer_class = ModelVersionSerializer

    def get_queryset(self):
        if self.schema_only:
            return ModelVersion.objects.none()
        run = permissions.access_run(user=self.request.user, id=self.kwargs["pk"])
        return selectors.run_model_versions(run)
