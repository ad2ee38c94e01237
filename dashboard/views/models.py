"""The model registry: global model versions, downloads and model cards."""

from __future__ import annotations

import io
from typing import Any

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import FileResponse, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import redirect

from dashboard.forms import ModelUploadForm
from dashboard.views.common import page
from federation import permissions, reports, selectors
from federation.services.uploaded_models import read_weights, uploaded_model_create
from federation.storage import blob_store


@login_required
def model_list(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """Every global model of the consortium's runs, grouped by run, newest run and newest
    version first; a completed run's last version is marked final."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    groups: dict[int, dict[str, Any]] = {}
    for version in selectors.consortium_model_versions(consortium):
        group = groups.setdefault(version.run_id, {"run": version.run, "versions": []})
        group["versions"].append(version)
    for group in groups.values():
        group["versions"].sort(key=lambda v: -v.number)
        group["final"] = group["run"].status == "completed"
    roles = permissions.roles_in(request.user, consortium.pk)
    return page(
        request,
        "dashboard/model_list.html",
        consortium=consortium,
        section="models",
        groups=list(groups.values()),
        uploaded=list(selectors.uploaded_models(request.user, consortium)),
        may_upload=bool(roles & permissions.CAN_UPLOAD_MODELS),
        may_evaluate=bool(roles & permissions.CAN_PROPOSE_PLANS),
    )


@login_required
def model_upload(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """Upload a model trained elsewhere; the service's refusal shows field by field, and
    nothing is stored then."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    permissions.require_roles(
        request.user, consortium.pk, permissions.CAN_UPLOAD_MODELS, "uploading a model"
    )
    form = ModelUploadForm(request.POST or None, request.FILES or None)
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
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
        except ValidationError as exc:
            form.apply_service_errors(exc)
        else:
            messages.success(
                request,
                f"Model '{uploaded.name}' uploaded (SHA-256 {uploaded.checksum}); an evaluation "
                "plan can now evaluate it on the sites.",
            )
            return redirect("dashboard:model_list", consortium_id=consortium.pk)
    return page(
        request,
        "dashboard/model_upload.html",
        consortium=consortium,
        section="models",
        status=400 if form.errors else 200,
        form=form,
    )


@login_required
def uploaded_model_download(request: HttpRequest, uploaded_id: int) -> HttpResponse:
    """An uploaded model's safetensors file, as stored."""
    uploaded = permissions.access_uploaded_model(user=request.user, id=uploaded_id)
    data = blob_store().get(uploaded.blob_key)
    response = FileResponse(
        io.BytesIO(data),
        as_attachment=True,
        filename=f"uploaded-model-{uploaded.pk}.safetensors",
        content_type="application/octet-stream",
    )
    response["Content-Length"] = str(len(data))
    response["X-Checksum-SHA256"] = uploaded.checksum
    return response


@login_required
def model_download(request: HttpRequest, model_id: int) -> HttpResponse:
    """The model's safetensors file, as stored (its SHA-256 is the registry's checksum)."""
    version = permissions.access_model_version(user=request.user, id=model_id)
    try:
        data = reports.model_file(version)
    except reports.ModelFileMismatch as exc:
        return page(request, "500.html", status=500, reason=str(exc))
    response = FileResponse(
        io.BytesIO(data),
        as_attachment=True,
        filename=f"{reports.model_file_stem(version)}.safetensors",
        content_type="application/octet-stream",
    )
    response["Content-Length"] = str(len(data))
    response["X-Checksum-SHA256"] = version.checksum
    return response


@login_required
def model_card(request: HttpRequest, model_id: int) -> HttpResponse:
    """The model card as a readable page."""
    version = permissions.access_model_version(user=request.user, id=model_id)
    return page(
        request,
        "dashboard/model_card.html",
        consortium=version.run.plan.consortium,
        section="models",
        version=version,
        card=reports.model_card(version),
        # a data scientist can propose an evaluation plan of this version
        may_evaluate=bool(
            permissions.roles_in(request.user, version.run.plan.consortium_id)
            & permissions.CAN_PROPOSE_PLANS
        ),
    )


@login_required
def model_card_json(request: HttpRequest, model_id: int) -> JsonResponse:
    """The model card as JSON."""
    version = permissions.access_model_version(user=request.user, id=model_id)
    response = JsonResponse(reports.model_card(version), json_dumps_params={"indent": 2})
    response["Content-Disposition"] = (
        f'inline; filename="model-card-run{version.run_id}-v{version.number}.json"'
    )
    return response


@login_required
def model_onnx(request: HttpRequest, model_id: int) -> HttpResponse:
    """The model as ONNX for deployment at a site (input ``features``, output ``logit``)."""
    from fedcore.onnx_export import OnnxUnavailable

    version = permissions.access_model_version(user=request.user, id=model_id)
    try:
        data = selectors.model_version_onnx(version)
    except OnnxUnavailable as exc:
        return page(
            request,
            "500.html",
            status=503,
            code=503,
            heading="This server cannot export ONNX yet",
            reason=str(exc),
        )
    except ValueError as exc:
        return page(
            request,
            "500.html",
            status=500,
            reason=f"model v{version.number} was not exported: {exc}",
        )
    name = reports.model_file_stem(version)
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = f'attachment; filename="{name}.onnx"'
    response["X-Source-Checksum-SHA256"] = version.checksum
    return response
