"""Uploaded models: a model no run trained, kept for evaluation plans to evaluate.

A data scientist or the consortium admin uploads a model in the model zoo's format: its spec,
the dataset schema and fitted preprocessing it reads, and its weights as a safetensors file.
:func:`uploaded_model_create` checks it whole with ``fedcore.uploaded_model`` (the same spec
parser as a plan's ``model`` section; the weights parsed without unpickling and compared
tensor by tensor with the model the spec builds), stores the weights in the blob store under
their SHA-256 and records the model, audited as ``model.uploaded``. A refused upload stores
nothing. An evaluation plan then names it as ``{"uploaded": ID, "sha256": ...}``
(``federation.services.evaluation_plans``).
"""

from __future__ import annotations

import secrets
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction

from fedcore.uploaded_model import UploadedModelError, check_uploaded_model, size_problem
from federation import permissions
from federation.models import Consortium, UploadedModel
from federation.services.audit import actor_label, audit_append
from federation.storage import blob_store


def uploaded_key(*, consortium_id: int, sha256: str) -> str:
    """Blob key of an uploaded model's weights: its hash, and a random part so that two
    uploads of the same file never share (and never delete) each other's bytes."""
    return f"uploads/{consortium_id}/{sha256}-{secrets.token_hex(8)}.safetensors"


def read_weights(upload: Any) -> bytes:
    """The bytes of an uploaded weights file (Django's ``UploadedFile``), refused by its size
    before it is read into memory (ValidationError on ``weights``)."""
    if problem := size_problem(int(upload.size), settings.QUORUM_MAX_UPLOADED_MODEL_BYTES):
        raise ValidationError({"weights": problem})
    return bytes(upload.read())


def uploaded_model_create(
    *,
    actor: Any,
    consortium: Consortium,
    name: str,
    description: str,
    model: Any,
    schema: Any,
    preprocessing: Any,
    weights: bytes,
) -> UploadedModel:
    """Check and keep an uploaded model.

    Raises:
        PermissionDenied / Http404: the actor may not upload to this consortium.
        ValidationError: every problem, keyed by field (``name``, ``description``, ``model``
            and ``model.*``, ``schema``, ``preprocessing``, ``weights``); nothing is stored.
    """
    permissions.require_roles(
        actor, consortium.pk, permissions.CAN_UPLOAD_MODELS, "uploading a model"
    )
    errors: dict[str, str] = {}
    name = name.strip() if isinstance(name, str) else ""
    if not name:
        errors["name"] = "required"
    elif len(name) > 200:
        errors["name"] = "at most 200 characters"
    if not isinstance(description, str):
        errors["description"] = "must be text"
        description = ""
    try:
        checked = check_uploaded_model(
            model=model,
            schema=schema,
            preprocessing=preprocessing,
            weights=weights,
            max_bytes=settings.QUORUM_MAX_UPLOADED_MODEL_BYTES,
        )
    except UploadedModelError as exc:
        errors.update(exc.errors)
    if errors:
        raise ValidationError(errors)
    key = uploaded_key(consortium_id=consortium.pk, sha256=checked.sha256)
    store = blob_store()
    store.put(key, weights)
    try:
        with transaction.atomic():
            uploaded = UploadedModel.objects.create(
                consortium=consortium,
                name=name,
                description=description,
                uploaded_by=actor,
                model=checked.model,
                schema=checked.schema.to_dict(),
                preprocessing=checked.preprocessing,
                checksum=checked.sha256,
                size_bytes=checked.size_bytes,
                blob_key=key,
                signature=checked.signature,
            )
            audit_append(
                actor=actor_label(actor),
                action="model.uploaded",
                consortium_id=consortium.pk,
                object_type="uploaded_model",
                object_id=uploaded.pk,
                data={
                    "name": name,
                    "sha256": checked.sha256,
                    "size_bytes": checked.size_bytes,
                    "model": checked.model,
                },
            )
    except BaseException:
        store.delete(key)  # nothing half-saved: no bytes without their record
        raise
    return uploaded
