"""What the agent does with a server request, without any network: pure and testable.

:func:`handle_stats_request` answers a ``stats_request`` with aggregate statistics of the local
train split; :func:`handle_task` trains the global model of a ``task`` on the local data and
builds the ``update``. Both raise :class:`TaskError` (code + reason, ready for an ``error`` frame)
for anything the server or the site operator must fix. Models come only from the plan's
declarative spec (:func:`fedcore.models.build_model`); weights only from safetensors.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
from torch import nn

from clientagent.data import DataFileError, LocalData, LocalSplit, PlanError
from fedcore import models, protocol, tabular, tensors, training

# Error codes of the ``error`` frames the agent sends (data_invalid is in protocol.ERROR_CODES).
DATA_INVALID = "data_invalid"  # the local data does not match the plan's schema
INVALID_TASK = "invalid_task"  # plan, preprocessing or global weights unusable for this site
TRAINING_FAILED = "training_failed"  # local training diverged (NaN/Inf)


class TaskError(Exception):
    """A request the agent refuses; ``code`` and ``reason`` go into an ``error`` frame."""

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        run: int | None = None,
        round: int | None = None,
        shared_reason: str | None = None,
    ):
        """Args:
        code: machine-readable error code (``data_invalid``, ``invalid_task``, ...).
        reason: human-readable message for the site operator's log.
        run: the run the request belonged to, if known.
        round: the round the request belonged to, if known.
        shared_reason: what the server is told, when ``reason`` holds local detail (a cell
            value, a file path) that must not leave the site; defaults to ``reason``.
        """
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.shared_reason = reason if shared_reason is None else shared_reason
        self.run = run
        self.round = round

    def to_fields(self) -> dict[str, Any]:
        """The fields of the ``error`` control message for this refusal."""
        reason = self.shared_reason
        if len(reason) > protocol.MAX_ERROR_REASON_CHARS:
            reason = reason[: protocol.MAX_ERROR_REASON_CHARS - 3] + "..."
        fields: dict[str, Any] = {"code": self.code, "reason": reason}
        if self.run is not None:
            fields["run"] = self.run
        if self.round is not None:
            fields["round"] = self.round
        return fields


def _data_invalid(exc: Exception, *, run: int | None, round: int | None = None) -> TaskError:
    """A data_invalid refusal: the full message for the local log, no cell value for the server."""
    if isinstance(exc, tabular.DataValidationError):
        shared = exc.shareable
    else:
        shared = "the site's data file could not be read (details in the site agent's log)"
    return TaskError(DATA_INVALID, str(exc), run=run, round=round, shared_reason=shared)


class TrainingCancelled(Exception):
    """Local training was interrupted because the agent is shutting down."""


class TrainingObserver(Protocol):
    """Receives progress of local training (e.g. a progress bar); called from a worker thread."""

    def started(self, *, rows: int, epochs: int, steps: int) -> None:
        """Training is about to start: ``steps`` optimizer steps over ``rows`` rows."""

    def step(self, step: int, total: int) -> None:
        """Optimizer step ``step`` of ``total`` is done."""

    def finished(self, *, train_loss: float) -> None:
        """Training finished with this mean loss over the last epoch."""


@dataclass(frozen=True)
class TrainingSettings:
    """The checked ``training`` section of a plan."""

    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    weight_decay: float

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> TrainingSettings:
        """Read and type-check ``plan["training"]``; PlanError names the bad key."""
        section = plan.get("training")
        if not isinstance(section, Mapping):
            raise PlanError("plan has no 'training' object")

        def number(key: str, default: float | None) -> float:
            value = section.get(key, default)
            if value is None:
                raise PlanError(f"plan training.{key} is missing")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise PlanError(f"plan training.{key} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise PlanError(f"plan training.{key} must be finite, got {value!r}")
            return float(value)

        def integer(key: str) -> int:
            value = section.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PlanError(f"plan training.{key} must be an integer >= 1, got {value!r}")
            return value

        optimizer = section.get("optimizer", "adam")
        if optimizer not in training.OPTIMIZERS:
            raise PlanError(
                f"plan training.optimizer {optimizer!r} is not supported; "
                f"allowed: {', '.join(training.OPTIMIZERS)}"
            )
        settings = cls(
            epochs=integer("local_epochs"),
            batch_size=integer("batch_size"),
            optimizer=optimizer,
            lr=number("lr", None),
            momentum=number("momentum", 0.0),
            weight_decay=number("weight_decay", 0.0),
        )
        if settings.lr <= 0:
            raise PlanError(f"plan training.lr must be > 0, got {settings.lr!r}")
        if not 0.0 <= settings.momentum < 1.0:
            raise PlanError(f"plan training.momentum must be in [0, 1), got {settings.momentum!r}")
        if settings.momentum and settings.optimizer != "sgd":
            raise PlanError("plan training.momentum applies to optimizer 'sgd' only")
        if settings.weight_decay < 0:
            raise PlanError(
                f"plan training.weight_decay must be >= 0, got {settings.weight_decay!r}"
            )
        return settings


def _run_and_round(fields: Mapping[str, Any]) -> tuple[int | None, int | None]:
    run, rnd = fields.get("run"), fields.get("round")
    return (run if isinstance(run, int) else None, rnd if isinstance(rnd, int) else None)


def _json_metrics(value: Any) -> Any:
    """Metrics as strict JSON: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _json_metrics(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_metrics(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _prepare(
    plan: Mapping[str, Any], data: LocalData, run: int | None, rnd: int | None
) -> LocalSplit:
    try:
        return data.split(plan)
    except (tabular.DataValidationError, DataFileError) as exc:
        raise _data_invalid(exc, run=run, round=rnd) from None


def handle_stats_request(fields: Mapping[str, Any], data: LocalData) -> dict[str, Any]:
    """Answer a ``stats_request``: statistics of the local TRAIN split for the plan's schema.

    Args:
        fields: the decoded ``stats_request`` (``run``, ``plan_hash``, ``plan``).
        data: the site's data.

    Returns:
        The fields of the ``stats`` reply: ``{"run", "stats"}``.

    Raises:
        TaskError: ``data_invalid`` (the local data does not match the schema; the reason names
            the column and row) or ``invalid_task`` (the plan's schema is unusable).
    """
    run, _ = _run_and_round(fields)
    plan = fields.get("plan")
    if not isinstance(plan, Mapping):
        raise TaskError(INVALID_TASK, "stats_request has no plan object", run=run)
    try:
        split = _prepare(plan, data, run, None)
    except PlanError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run) from None
    # Only the train split: the preprocessing fitted from these statistics must not have seen
    # the rows each site later evaluates on.
    try:
        stats = tabular.local_statistics(split.train, split.schema)
    except tabular.DataValidationError as exc:
        raise _data_invalid(exc, run=run) from None
    return {"run": run, "stats": stats}


def _load_global(
    payload: bytes, plan: Mapping[str, Any], n_features: int, run: int, rnd: int
) -> nn.Module:
    try:
        model = models.build_model(plan["model"], n_features, seed=0)
    except KeyError:
        raise TaskError(
            INVALID_TASK, "the task's plan has no 'model' spec", run=run, round=rnd
        ) from None
    except models.ModelSpecError as exc:
        raise TaskError(INVALID_TASK, f"model spec: {exc}", run=run, round=rnd) from None
    try:
        state = tensors.decode_state_dict(payload)
    except tensors.TensorCodecError as exc:
        raise TaskError(INVALID_TASK, f"global model: {exc}", run=run, round=rnd) from None
    try:
        # load_state_dict would silently cast dtypes: check them first, with a clear message.
        tensors.check_compatible(state, model.state_dict())
        model.load_state_dict(state, strict=True)
    except (tensors.IncompatibleStateDict, RuntimeError) as exc:
        raise TaskError(
            INVALID_TASK,
            f"the global model does not fit the plan's model spec with {n_features} features: "
            f"{exc}",
            run=run,
            round=rnd,
        ) from None
    bad = tensors.first_non_finite(state)
    if bad is not None:
        raise TaskError(
            INVALID_TASK, f"global model tensor {bad!r} holds NaN or Inf", run=run, round=rnd
        )
    return model


def handle_task(
    task: protocol.BinaryMessage,
    data: LocalData,
    *,
    silo: str | None = None,
    observer: TrainingObserver | None = None,
    cancel: threading.Event | None = None,
    nonce: Callable[[], str] = lambda: secrets.token_hex(16),
) -> protocol.BinaryMessage:
    """Train the task's global model on the local data and build the ``update`` message.

    Steps: split the local data (cached), transform it with the task's fitted preprocessing,
    build the model from the plan's spec and load the global weights (strict: same keys, shapes
    and dtypes), evaluate it on the local test split (``metrics["global"]``), train on the train
    split with ``plan["training"]`` and seed ``plan["seed"] * 1000 + round``, evaluate again
    (``metrics["local"]``).

    Args:
        task: a reassembled ``task`` message (fields validated by fedcore.protocol).
        data: the site's data.
        silo: the silo name from the server's ``welcome``, echoed in the update.
        observer: receives training progress (called from the calling thread).
        cancel: when set, training stops at the next optimizer step (TrainingCancelled).
        nonce: source of the update's nonce (tests inject a fixed one).

    Returns:
        The ``update`` BinaryMessage: fields ``run``, ``round``, ``nonce``, ``num_examples``
        (train rows), ``metrics`` (``global``, ``local``, ``train_loss``), ``silo``; payload the
        trained weights as safetensors.

    Raises:
        TaskError: ``invalid_task`` (the plan, preprocessing or global weights are unusable),
            ``data_invalid`` (the local data does not fit) or ``training_failed`` (diverged).
        TrainingCancelled: ``cancel`` was set.
    """
    fields = task.fields
    run, rnd = fields["run"], fields["round"]
    plan = fields["plan"]
    seed = plan.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TaskError(
            INVALID_TASK, f"plan seed must be an integer, got {seed!r}", run=run, round=rnd
        )

    try:
        settings = TrainingSettings.from_plan(plan)
        split = _prepare(plan, data, run, rnd)
        arrays = data.arrays(split, fields["preprocessing"])
    except PlanError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run, round=rnd) from None
    except tabular.DataValidationError as exc:
        raise _data_invalid(exc, run=run, round=rnd) from None
    train, test = arrays.train, arrays.test
    n_train = int(train.X.shape[0])
    if n_train == 0:
        raise TaskError(
            DATA_INVALID,
            "no training rows left after validation and the holdout split",
            run=run,
            round=rnd,
        )

    model = _load_global(task.payload, plan, int(train.X.shape[1]), run, rnd)
    global_metrics = training.evaluate(model, test.X, test.y)

    def on_batch(step: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise TrainingCancelled(f"round {rnd}: training cancelled at step {step}/{total}")
        if observer is not None:
            observer.step(step, total)

    if observer is not None:
        steps = settings.epochs * math.ceil(n_train / settings.batch_size)
        observer.started(rows=n_train, epochs=settings.epochs, steps=steps)
    try:
        result = training.train_local(
            model,
            train.X,
            train.y,
            epochs=settings.epochs,
            batch_size=settings.batch_size,
            lr=settings.lr,
            optimizer=settings.optimizer,
            momentum=settings.momentum,
            weight_decay=settings.weight_decay,
            seed=seed * 1000 + rnd,
            on_batch=on_batch,
        )
    except training.TrainingError as exc:
        raise TaskError(TRAINING_FAILED, str(exc), run=run, round=rnd) from None
    if observer is not None:
        observer.finished(train_loss=float(result["train_loss"]))

    state = model.state_dict()
    bad = tensors.first_non_finite(state)
    if bad is not None:
        raise TaskError(
            TRAINING_FAILED,
            f"tensor {bad!r} holds NaN or Inf after local training; lower lr",
            run=run,
            round=rnd,
        )
    metrics = _json_metrics(
        {
            "global": global_metrics,
            "local": training.evaluate(model, test.X, test.y),
            "train_loss": result["train_loss"],
        }
    )
    update_fields: dict[str, Any] = {
        "run": run,
        "round": rnd,
        "nonce": nonce(),
        "num_examples": n_train,
        "metrics": metrics,
    }
    if silo is not None:
        update_fields["silo"] = silo
    return protocol.BinaryMessage(
        type="update", fields=update_fields, payload=tensors.encode_state_dict(state)
    )
