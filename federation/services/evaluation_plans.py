"""Evaluation plans: evaluate a registered model version, or an uploaded model, on every site's
data.

An evaluation plan (``"kind": "evaluation"``, ``fedcore.plan.evaluation_plan``) is governed
exactly like a training plan (hash, every steward's approval, site policy, signed requests,
audit log, privacy ledger for DP fairness counts); only its run differs, and it reuses the
final evaluation of a training run (``federation.services.evaluation``):

1. at proposal, :func:`source_errors` checks the model version the plan names: it exists in a
   run of the same consortium, its SHA-256 is the plan's, the plan's model spec is the source
   run's, and the plan's schema fits the source run's (the same feature columns with the same
   settings, the same target), else the proposal is refused naming the key or column;
2. when the run starts (:func:`evaluation_plan_begin`, from ``rounds.run_step``), it waits for
   the plan's ``min_silos`` selectable silos, copies the source version's weights as its own
   model version 0 (checked against the plan's SHA-256) and the source run's fitted
   preprocessing, and opens the evaluating phase with ``evaluation.evaluation_begin``: the
   same signed ``evaluate`` message, the same checks of the answers, the same pooling into
   ``Run.evaluation``. No statistics pass, no round.

An uploaded model (``{"uploaded": ID, "sha256": ...}``, ``federation.services.uploaded_models``)
goes the same way: at proposal it must be of the same consortium with the plan's SHA-256, the
plan's model spec must be its spec and the plan's schema must fit its schema; at the start its
weights become the run's version 0 and its own fitted preprocessing the run's.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from django.utils import timezone

from fedcore import tensors
from fedcore.plan import PlanError, parse_evaluation, parse_schema
from fedcore.plan.evaluation_plan import EvaluationPlan, parse_evaluation_plan
from fedcore.tabular import DatasetSchema
from federation import dispatch
from federation.models import ModelVersion, Run, Silo, TrainingPlan, UploadedModel
from federation.selectors import evaluated_source
from federation.services import evaluation as evaluation_service
from federation.services.audit import audit_append
from federation.storage import blob_store, model_key

log = logging.getLogger("quorum.orchestrator")


def _source_version(consortium_id: int, run_id: int, number: int) -> ModelVersion | None:
    return (
        ModelVersion.objects.select_related("run__version", "run__plan")
        .filter(run_id=run_id, number=number, run__plan__consortium_id=consortium_id)
        .first()
    )


def source_errors(consortium_id: int, spec: Mapping[str, Any]) -> dict[str, str]:
    """Why a valid evaluation plan's model version cannot be evaluated (empty when it can).

    Keys are the plan's dotted paths. A version of another consortium reads as one that does
    not exist: its run is not the proposer's to see.
    """
    plan = parse_evaluation_plan(spec)
    ref = plan.model_version
    if ref.uploaded is not None:
        return _uploaded_errors(consortium_id, spec, plan)
    version = _source_version(consortium_id, ref.run, ref.number)
    if version is None:
        return {
            "model_version": (
                f"run {ref.run} of this consortium has no model version {ref.number}; name a "
                "registered version (the model registry lists them)"
            )
        }
    if version.checksum != ref.sha256:
        return {
            "model_version.sha256": (
                f"is {ref.sha256}, but version {ref.number} of run {ref.run} has SHA-256 "
                f"{version.checksum}: the plan must name the exact weights it evaluates"
            )
        }
    source = version.run
    errors: dict[str, str] = {}
    if source.preprocessing is None:
        errors["model_version"] = (
            f"run {ref.run} has no fitted preprocessing, so its model cannot be applied to "
            "rows (an analysis run, or one that ended before its statistics pass)"
        )
        return errors
    source_spec = source.version.spec
    if dict(spec["model"]) != dict(source_spec.get("model") or {}):
        errors["model"] = (
            f"is {dict(spec['model'])}, but run {ref.run} trained {source_spec.get('model')}: "
            "copy the source run's model spec"
        )
    try:
        source_schema = parse_schema(source_spec.get("schema"))
    except PlanError:
        errors["model_version"] = f"run {ref.run}'s schema cannot be read"
        return errors
    errors.update(schema_fit_errors(plan.schema, source_schema, f"run {ref.run}"))
    if plan.rows == "held_out":  # the source's split: its section, or the defaults
        theirs = parse_evaluation(source_spec.get("evaluation"))
        if theirs != plan.evaluation:
            errors["evaluation"] = (
                f"holds out {_split(plan)}, but run {ref.run} held out test_fraction "
                f"{theirs.test_fraction:g}, seed {theirs.seed}, split_column "
                f"{theirs.split_column!r}: with rows 'held_out' the sites would evaluate rows "
                f"the model trained on; copy run {ref.run}'s evaluation section, or use rows "
                "'all' for data the model never saw"
            )
    return errors


def _uploaded_model(consortium_id: int, uploaded_id: int) -> UploadedModel | None:
    return (
        UploadedModel.objects.select_related("uploaded_by")
        .filter(pk=uploaded_id, consortium_id=consortium_id)
        .first()
    )


def _uploaded_errors(
    consortium_id: int, spec: Mapping[str, Any], plan: EvaluationPlan
) -> dict[str, str]:
    """Why an uploaded model cannot be evaluated by this plan (empty when it can): the checks
    a run's version gets, against what was uploaded. One of another consortium reads as one
    that does not exist."""
    ref = plan.model_version
    uploaded = _uploaded_model(consortium_id, int(ref.uploaded or 0))
    if uploaded is None:
        return {
            "model_version.uploaded": (
                f"no model with id {ref.uploaded} was uploaded to this consortium; name one "
                "its uploaded models list"
            )
        }
    label = f"uploaded model {uploaded.pk} ({uploaded.name!r})"
    if uploaded.checksum != ref.sha256:
        return {
            "model_version.sha256": (
                f"is {ref.sha256}, but {label} has SHA-256 {uploaded.checksum}: the plan must "
                "name the exact weights it evaluates"
            )
        }
    errors: dict[str, str] = {}
    if plan.model != uploaded.model:  # both normalised by fedcore.models.validate_model_spec
        errors["model"] = (
            f"is {dict(spec['model'])}, but {label} is {uploaded.model}: copy the uploaded "
            "model's spec"
        )
    errors.update(schema_fit_errors(plan.schema, DatasetSchema.from_dict(uploaded.schema), label))
    return errors


def _split(plan: EvaluationPlan) -> str:
    e = plan.evaluation
    return f"test_fraction {e.test_fraction:g}, seed {e.seed}, split_column {e.split_column!r}"


def schema_fit_errors(schema: DatasetSchema, source: DatasetSchema, model: str) -> dict[str, str]:
    """Where a plan's schema does not fit the schema a model was trained on: the model reads
    the same feature columns in the same order with the same settings (the fitted preprocessing
    turns each into the model's inputs) and predicts the same target. ``model`` names the
    model's source in the messages ("run 4", "uploaded model 2 ('risk')")."""
    errors: dict[str, str] = {}
    ours = [column.to_dict() for column in schema.columns]
    theirs = [column.to_dict() for column in source.columns]
    names, source_names = [c["name"] for c in ours], [c["name"] for c in theirs]
    if names != source_names:
        missing = [n for n in source_names if n not in names]
        extra = [n for n in names if n not in source_names]
        detail = []
        if missing:
            detail.append(f"lacks {missing}")
        if extra:
            detail.append(f"adds {extra}")
        if not detail:
            detail.append(f"orders them {names}, the model reads {source_names}")
        errors["schema.columns"] = (
            f"the model of {model} reads the feature columns {source_names}; this "
            f"schema {' and '.join(detail)}: a model that does not fit the dataset is refused"
        )
    else:
        for index, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            for key in sorted(set(a) | set(b)):
                if a.get(key) != b.get(key):
                    errors[f"schema.columns.{index}.{key}"] = (
                        f"column {a['name']!r} has {key} {a.get(key)!r}, but the model of "
                        f"{model} was trained with {b.get(key)!r}: a model that does not fit "
                        "the dataset is refused"
                    )
                    break
    if schema.target.to_dict() != source.target.to_dict():
        errors["schema.target"] = (
            f"is {schema.target.to_dict()}, but the model of {model} predicts "
            f"{source.target.to_dict()}"
        )
    return errors


def evaluation_plan_begin(run: Run, online: list[Silo]) -> tuple[str, str]:
    """Start an evaluation plan's run, in the caller's transaction with the run locked.

    Returns:
        ``("wait", why)`` while fewer than ``min_silos`` silos are selectable, ``("fail",
        reason)`` when waiting ran out or the model version is gone or changed, else
        ``("evaluating", "")``: the silos are asked (``evaluation.evaluation_begin``).
    """
    plan = parse_evaluation_plan(run.version.spec)
    cfg = plan.run
    now = timezone.now()
    if len(online) < cfg.min_silos:
        return _wait(run, cfg.min_silos, cfg.wait_for_silos_seconds, len(online), now)
    ref = plan.model_version
    source = _evaluated(run.plan.consortium_id, ref)
    if source is None or source[0] != ref.sha256:
        return "fail", f"{ref.label} is gone or no longer has SHA-256 {ref.sha256}"
    _, blob_key, signature, preprocessing = source
    try:
        data = blob_store().get(blob_key)
    except OSError as exc:  # BlobStoreError: gone or unreadable
        return "fail", f"the weights of {ref.label}: {exc}"
    if tensors.sha256_hex(data) != ref.sha256:
        return "fail", (
            f"the stored weights of {ref.label} do not match their SHA-256 {ref.sha256}: "
            "nothing was evaluated"
        )
    # Its own copy (not the source's key): the run's model stays evaluable and auditable
    # whatever later happens to the source run's blobs.
    key = model_key(run_id=run.pk, number=0)
    try:
        blob_store().put(key, data)
    except OSError as exc:
        return "fail", f"the evaluated weights could not be stored for this run: {exc}"
    ModelVersion.objects.update_or_create(
        run=run,
        number=0,
        defaults={
            "round": None,
            "checksum": ref.sha256,
            "size_bytes": len(data),
            "blob_key": key,
            "signature": signature,
        },
    )
    run.preprocessing = preprocessing
    run.started_at = now
    run.save(update_fields=["preprocessing", "started_at"])
    TrainingPlan.objects.filter(pk=run.plan_id).update(status=TrainingPlan.Status.RUNNING)
    audit_append(
        actor="system",
        action="run.evaluation_plan_started",
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data={
            **(
                {"uploaded_model": ref.uploaded}
                if ref.uploaded is not None
                else {"source_run": ref.run, "source_version": ref.number}
            ),
            "sha256": ref.sha256,
            "rows": plan.rows_note,
        },
    )
    evaluation_service.evaluation_begin(run, cfg, online)
    return "evaluating", ""


def _evaluated(consortium_id: int, ref: Any) -> tuple[str, str, Any, Any] | None:
    """The SHA-256, blob key, tensor signature and fitted preprocessing of what a plan
    evaluates (a run's version or an uploaded model), None when it is gone."""
    if ref.uploaded is not None:
        uploaded = _uploaded_model(consortium_id, ref.uploaded)
        if uploaded is None:
            return None
        return uploaded.checksum, uploaded.blob_key, uploaded.signature, uploaded.preprocessing
    version = _source_version(consortium_id, ref.run, ref.number)
    if version is None:
        return None
    return version.checksum, version.blob_key, version.signature, version.run.preprocessing


def _wait(
    run: Run, needed: int, wait_seconds: float, online: int, now: datetime
) -> tuple[str, str]:
    if run.waiting_since is None:
        run.waiting_since = now
        run.save(update_fields=["waiting_since"])
        dispatch.enqueue_advance(run.pk, countdown=wait_seconds + 0.05)
    elif (now - run.waiting_since).total_seconds() >= wait_seconds:
        return "fail", (
            f"{online} site(s) connected after {wait_seconds:g} s; the evaluation needs "
            f"{needed} (min_silos)"
        )
    return "wait", f"{online} of {needed} sites connected"


def evaluation_plan_result(run: Run, pooled: dict[str, Any]) -> dict[str, Any]:
    """The pooled evaluation of an evaluation plan's run, with what it evaluated and on which
    rows (stored as ``Run.evaluation``)."""
    plan = parse_evaluation_plan(run.version.spec)
    ref = plan.model_version
    return {
        **pooled,
        "plan_kind": "evaluation",
        "source": evaluated_source(run.plan.consortium_id, ref),
        "rows": plan.rows,
        "rows_note": plan.rows_note,
    }
