"""Uploaded models: a consortium's models no run trained, for evaluation plans to evaluate."""

from __future__ import annotations

import io

from django.http import FileResponse, HttpResponse
from drf_spectacular.utils import extend_schema
from rest_framework import exceptions, status
from rest_framework.request import Request
from rest_framework.response import Response

from federation import permissions, selectors
from federation.api.parsers import LimitedJSONParser, LimitedMultiPartParser
from federation.api.serializers import (
    UploadedModelDetailSerializer,
    UploadedModelSerializer,
    UploadedModelUploadSerializer,
)
from federation.api.views.base import ApiListView, ApiView, validated
from federation.api.views.reports import _BINARY
from federation.models import Consortium, UploadedModel
from federation.services.uploaded_models import read_weights, uploaded_model_create
from federation.storage import blob_store


class ConsortiumUploadedModelListView(ApiListView):
    """Models uploaded to a consortium; a data scientist or the consortium admin uploads one."""

    serializer_class = UploadedModelSerializer
    parser_classes = [LimitedMultiPartParser, LimitedJSONParser]

    def get_queryset(self):
        if self.schema_only:
            return UploadedModel.objects.none()
        consortium = permissions.access_consortium(user=self.request.user, id=self.kwargs["pk"])
        return selectors.uploaded_models(self.request.user, consortium)

    @extend_schema(
        request={"multipart/form-data": UploadedModelUploadSerializer},
        responses={201: UploadedModelDetailSerializer},
        summary="Upload a model (data scientist or consortium admin)",
        description="The model spec, the dataset schema and fitted preprocessing it reads (JSON "
        "text fields) and its weights as a .safetensors file, checked whole "
        "(fedcore.uploaded_model): every tensor's name, dtype and shape must be the model's "
        "the spec builds, every value finite, the file within QUORUM_MAX_UPLOADED_MODEL_BYTES. "
        "A refusal (400) names each faulty field and stores nothing. Audited as "
        "model.uploaded. An evaluation plan evaluates it as "
        '{"model_version": {"uploaded": id, "sha256": checksum}}.',
    )
    def post(self, request: Request, pk: int) -> Response:
        consortium: Consortium = permissions.access_consortium(user=request.user, id=pk)
        data = validated(UploadedModelUploadSerializer, request)
        weights = read_weights(data["weights"])
        uploaded = uploaded_model_create(
            actor=request.user,
            consortium=consortium,
            name=data["name"],
            description=data["description"],
            model=data["model"],
            schema=data["schema"],
            preprocessing=data["preprocessing"],
            weights=weights,
        )
        uploaded = permissions.access_uploaded_model(user=request.user, id=uploaded.pk)
        body = UploadedModelDetailSerializer(uploaded).data
        return Response(body, status=status.HTTP_201_CREATED)


class UploadedModelDetailView(ApiView):
    """An uploaded model: its spec, schema, preprocessing and tensors."""

    @extend_schema(responses=UploadedModelDetailSerializer, summary="An uploaded model")
    def get(self, request: Request, pk: int) -> Response:
        uploaded = permissions.access_uploaded_model(user=request.user, id=pk)
        return Response(UploadedModelDetailSerializer(uploaded).data)


class UploadedModelDownloadView(ApiView):
    """The uploaded safetensors file; header X-Checksum-SHA256 is its recorded SHA-256."""

    @extend_schema(responses=_BINARY, summary="Download an uploaded model (safetensors)")
    def get(self, request: Request, pk: int) -> HttpResponse:
        uploaded = permissions.access_uploaded_model(user=request.user, id=pk)
        try:
            data = blob_store().get(uploaded.blob_key)
        except OSError as exc:
            raise exceptions.APIException(f"the uploaded file is unreadable: {exc}") from exc
        response = FileResponse(
            io.BytesIO(data),
            as_attachment=True,
            filename=f"uploaded-model-{uploaded.pk}.safetensors",
            content_type="application/octet-stream",
        )
        response["Content-Length"] = str(len(data))
        response["X-Checksum-SHA256"] = uploaded.checksum
        return response
