"""Reports: fairness, privacy, model versions (files, ONNX, card), compliance; the API index.

Each endpoint has the permissions of its dashboard page (the same ``permissions.access_*`` and
role checks) and the same content (``federation.reports`` and the selectors build both).
"""

from __future__ import annotations

import io
from typing import Any

from django.http import FileResponse, HttpResponse
from django.urls import URLPattern, reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import exceptions
from rest_framework.permissions import AllowAny
from rest_framework.renderers import BaseRenderer, JSONRenderer
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.settings import api_settings

from federation import compliance_pdf, permissions, reports, selectors
from federation.api.serializers import (
    ApiIndexSerializer,
    ConsortiumPrivacySerializer,
    ModelVersionDetailSerializer,
    RunAnalysisSerializer,
    RunPrivacySerializer,
)
from federation.api.views.base import ApiView

_BINARY = {
    (200, "application/octet-stream"): OpenApiResponse(
        OpenApiTypes.BINARY, description="The file, as an attachment"
    )
}
_REPORT = OpenApiTypes.OBJECT


class NotExportable(exceptions.APIException):
    status_code = 409
    default_detail = "this model version cannot be exported"
    default_code = "conflict"


class ServiceUnavailable(exceptions.APIException):
    status_code = 503
    default_detail = "this server cannot do that yet"
    default_code = "unavailable"


class ApiIndexView(ApiView):
    # Open to anyone, like the schema: a newcomer's first request. Filled by federation.api.urls with its own urlpatterns (no import of the routes here).
    patterns: list[Any] = []
    permission_classes = [AllowAny]

    @extend_schema(responses=ApiIndexSerializer, summary="Every endpoint of the API")
    def get(self, request: Request) -> Response:
        prefix = reverse("api:index")
        endpoints = []
        for pattern in self.patterns:
            view_class = getattr(getattr(pattern, "callback", None), "view_class", None)
            if not isinstance(pattern, URLPattern) or view_class is None or not pattern.name:
                continue
            if pattern.name in ("index", "not-found"):
                continue
            methods = [
                m.upper() for m in view_class.http_method_names if m not in ("head", "options")
            ]
            methods = [m for m in methods if hasattr(view_class, m.lower())]
            url = str(pattern.pattern)
            for converter in ("int:", "str:", "slug:", "uuid:"):
                url = url.replace(f"<{converter}", "{")
            # As the schema and docs/api.md name them: {id} (the route's pk), {number}.
            url = url.replace("<", "{").replace(">", "}").replace("{pk}", "{id}")
            doc = (view_class.__doc__ or "").strip().splitlines()
            endpoints.append(
                {
                    "name": pattern.name,
                    "url": prefix + url,
                    "methods": methods,
                    "summary": doc[0] if doc else "",
                }
            )
        return Response(
            ApiIndexSerializer(
                {
                    "version": "v1",
                    "schema": reverse("schema"),
                    "docs": reverse("api-docs"),
                    "endpoints": endpoints,
                }
            ).data
        )


class RunFairnessView(ApiView):
    """A run's fairness report: every round's and the final one, as the dashboard page shows."""

    @extend_schema(
        responses=_REPORT,
        summary="A run's fairness reports (per round and the latest, by attribute)",
    )
    def get(self, request: Request, pk: int) -> Response:
        run = permissions.access_run(user=request.user, id=pk)
        return Response(reports.run_fairness(run))


class RunPrivacyView(ApiView):
    """The epsilon each silo spent on a run, with the plan's privacy settings."""

    @extend_schema(responses=RunPrivacySerializer, summary="A run's privacy spend per silo")
    def get(self, request: Request, pk: int) -> Response:
        run = permissions.access_run(user=request.user, id=pk)
        return Response(RunPrivacySerializer(reports.run_privacy(run)).data)


class RunAnalysisView(ApiView):
    """An analysis plan's run: its result once released (who may read a run's reports)."""

    @extend_schema(
        responses=RunAnalysisSerializer, summary="An analysis run's steps and released result"
    )
    def get(self, request: Request, pk: int) -> Response:
        run = permissions.access_run(user=request.user, id=pk)
        return Response(RunAnalysisSerializer(reports.run_analysis(run)).data)


class ConsortiumPrivacyView(ApiView):
    """The consortium's privacy budget report: budgets, spend, ledger, projections."""

    @extend_schema(
        responses=ConsortiumPrivacySerializer,
        summary="A consortium's privacy budgets, ledger and projected spend",
    )
    def get(self, request: Request, pk: int) -> Response:
        consortium = permissions.access_consortium(user=request.user, id=pk)
        data = selectors.consortium_privacy(consortium)
        return Response(ConsortiumPrivacySerializer(data).data)


class PdfRenderer(BaseRenderer):
    # ?format=pdf: the view hands over the finished file; errors still render as JSON.
    media_type = "application/pdf"
    format = "pdf"
    charset = None
    render_style = "binary"

    def render(self, data: Any, accepted_media_type: Any = None, renderer_context: Any = None):
        return data


def _compliance_pdf_response(run: Any) -> HttpResponse:
    """The compliance report as a PDF attachment (the same facts as the JSON)."""
    response = HttpResponse(
        compliance_pdf.compliance_report_pdf(run), content_type="application/pdf"
    )
    response["Content-Disposition"] = f'attachment; filename="{compliance_pdf.filename(run)}"'
    response["Cache-Control"] = "no-store"
    return response


class RunComplianceView(ApiView):
    """A run's compliance report (auditors and consortium admins), with its printable page;
    ``?format=pdf`` (or ``compliance.pdf``) gives it as a PDF."""

    renderer_classes = [*api_settings.DEFAULT_RENDERER_CLASSES, PdfRenderer]

    def finalize_response(self, request: Request, response: Any, *args: Any, **kwargs: Any) -> Any:
        # A refusal asked for as PDF is still a JSON error body, not a broken PDF.
        if isinstance(response, Response) and getattr(request, "accepted_renderer", None):
            if request.accepted_renderer.format == "pdf":
                request.accepted_renderer = JSONRenderer()
                request.accepted_media_type = JSONRenderer.media_type
        return super().finalize_response(request, response, *args, **kwargs)

    def _run(self, request: Request, pk: int) -> Any:
        run = permissions.access_run(user=request.user, id=pk)
        permissions.require_roles(
            request.user,
            run.plan.consortium_id,
            permissions.CAN_READ_AUDIT,
            "reading a compliance report",
        )
        return run

    @extend_schema(
        responses={
            (200, "application/json"): _REPORT,
            (200, "application/pdf"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The report as a PDF (?format=pdf)"
            ),
        },
        summary="A run's compliance report (auditor, admin), as JSON or PDF",
    )
    def get(self, request: Request, pk: int) -> Response | HttpResponse:
        run = self._run(request, pk)
        if request.accepted_renderer.format == "pdf":
            return _compliance_pdf_response(run)
        return Response(
            {
                **reports.compliance_report_json(run),
                "printable": reverse("dashboard:compliance_report", args=[run.pk]),
                "pdf": reverse("api:run-compliance-pdf", args=[run.pk]),
            }
        )


class RunCompliancePdfView(RunComplianceView):
    """A run's compliance report as a PDF (auditors and consortium admins)."""

    renderer_classes = [*api_settings.DEFAULT_RENDERER_CLASSES]

    @extend_schema(
        responses={(200, "application/pdf"): OpenApiResponse(OpenApiTypes.BINARY)},
        summary="A run's compliance report as a PDF (auditor, admin)",
    )
    def get(self, request: Request, pk: int) -> HttpResponse:
        return _compliance_pdf_response(self._run(request, pk))


class ModelVersionDetailView(ApiView):
    """A global model version and the URLs of its files and card."""

    @extend_schema(responses=ModelVersionDetailSerializer, summary="A model version")
    def get(self, request: Request, pk: int) -> Response:
        version = permissions.access_model_version(user=request.user, id=pk)
        return Response(ModelVersionDetailSerializer(version).data)


class ModelVersionDownloadView(ApiView):
    """The model's safetensors file; header X-Checksum-SHA256 is the registry's checksum."""

    @extend_schema(responses=_BINARY, summary="Download a model version (safetensors)")
    def get(self, request: Request, pk: int) -> HttpResponse:
        version = permissions.access_model_version(user=request.user, id=pk)
        try:
            data = reports.model_file(version)
        except reports.ModelFileMismatch as exc:
            raise exceptions.APIException(str(exc)) from exc
        response = FileResponse(
            io.BytesIO(data),
            as_attachment=True,
            filename=f"{reports.model_file_stem(version)}.safetensors",
            content_type="application/octet-stream",
        )
        response["Content-Length"] = str(len(data))
        response["X-Checksum-SHA256"] = version.checksum
        return response


class ModelVersionOnnxView(ApiView):
    """The model as ONNX (input ``features``, output ``logit``); 503 if ONNX is not installed."""

    @extend_schema(responses=_BINARY, summary="Export a model version as ONNX")
    def get(self, request: Request, pk: int) -> HttpResponse:
        from fedcore.onnx_export import OnnxUnavailable

        version = permissions.access_model_version(user=request.user, id=pk)
        try:
            data = selectors.model_version_onnx(version)
        except OnnxUnavailable as exc:
            raise ServiceUnavailable(str(exc)) from exc
        except ValueError as exc:
            raise NotExportable(f"model v{version.number} was not exported: {exc}") from exc
        response = HttpResponse(data, content_type="application/octet-stream")
        response["Content-Disposition"] = (
            f'attachment; filename="{reports.model_file_stem(version)}.onnx"'
        )
        response["X-Source-Checksum-SHA256"] = version.checksum
        return response


class ModelVersionCardView(ApiView):
    """The model card as JSON (the same dict as the dashboard's card page)."""

    @extend_schema(responses=_REPORT, summary="A model version's model card")
    def get(self, request: Request, pk: int) -> Response:
        version = permissions.access_model_version(user=request.user, id=pk)
        return Response(reports.model_card(version))
