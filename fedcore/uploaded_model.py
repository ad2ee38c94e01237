"""Uploaded models: a model trained outside Quorum, in the model zoo's format, checked whole.

An evaluation plan may evaluate a model no Quorum run trained (docs/fairness.md, "Evaluation
plans"). A consortium member uploads it in the form a run's model version has:

* ``model``: the model spec of the plan language (``fedcore.models``), parsed by the same code
  that parses a plan's ``model`` section;
* ``schema``: the dataset schema the model reads (``fedcore.tabular.DatasetSchema``);
* ``preprocessing``: the fitted preprocessing that turns rows into the model's inputs (the form
  ``fedcore.tabular.merge_statistics`` returns: numeric means and standard deviations, category
  lists), which a run computes in its statistics pass and an uploaded model brings with it;
* its weights as a safetensors file: parsed by ``fedcore.tensors.decode_state_dict`` (a JSON
  header and raw tensor data: nothing is ever unpickled), whose tensor names, dtypes and shapes
  must be exactly those of the model the spec builds for that schema and preprocessing, every
  value finite.

:func:`check_uploaded_model` is the one check; it returns every problem at once, keyed by the
part it is about (``model``, ``schema``, ``preprocessing``, ``weights``), so nothing is stored
unless the whole upload is usable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcore import tabular, tensors
from fedcore.model_kinds import KindUnavailable
from fedcore.models import ModelSpecError, build_model
from fedcore.plan.spec import PlanError, _model, parse_schema

__all__ = [
    "MAX_WEIGHTS_BYTES",
    "CheckedModel",
    "UploadedModelError",
    "check_uploaded_model",
    "size_problem",
]

MAX_WEIGHTS_BYTES = 64 << 20  # the default limit of an uploaded weights file (a server setting)
_PICKLE = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")
_ZIP = b"PK\x03\x04"
_SAVE_HINT = (
    "save the weights with safetensors: safetensors.torch.save_file(model.state_dict(), "
    "'model.safetensors')"
)


class UploadedModelError(ValueError):
    """An upload is refused; ``errors`` maps each faulty part to what is wrong with it."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        self.errors = dict(errors)
        super().__init__("; ".join(f"{key}: {message}" for key, message in self.errors.items()))


@dataclass(frozen=True)
class CheckedModel:
    """An upload that passed every check: what the server keeps of it."""

    model: dict[str, Any]  # the spec, normalised as a plan's model section is
    schema: tabular.DatasetSchema
    preprocessing: dict[str, Any]
    sha256: str
    size_bytes: int
    signature: dict[str, list[Any]]  # tensor name -> [dtype, shape], as ModelVersion keeps it
    n_features: int


def check_uploaded_model(
    *,
    model: Any,
    schema: Any,
    preprocessing: Any,
    weights: bytes,
    max_bytes: int = MAX_WEIGHTS_BYTES,
) -> CheckedModel:
    """Check an uploaded model whole.

    Args:
        model: the model spec (a plan's ``model`` section).
        schema: the dataset schema the model reads.
        preprocessing: the fitted preprocessing for that schema.
        weights: the bytes of the uploaded safetensors file.
        max_bytes: the largest weights file accepted.

    Returns:
        The checked model, with the weights' SHA-256 and tensor signature.

    Raises:
        UploadedModelError: every problem found, keyed by ``model``, ``schema``,
            ``preprocessing`` or ``weights``.
    """
    errors: dict[str, str] = {}
    spec = _model({"model": model}, errors)
    parsed: tabular.DatasetSchema | None = None
    try:
        parsed = parse_schema(schema)
    except PlanError as exc:
        errors.update(exc.errors)
    n_features = 0
    if parsed is not None:
        try:
            n_features = len(tabular.feature_names(parsed, preprocessing))
        except (tabular.SchemaError, TypeError, KeyError, AttributeError) as exc:
            errors["preprocessing"] = (
                f"{exc}; it must be the fitted preprocessing of this schema "
                "(fedcore.tabular.merge_statistics' form: version, schema_hash, columns, numeric "
                "means and stds, categories)"
            )
        else:
            if n_features == 0:
                errors["preprocessing"] = "gives the model no input column (no feature at all)"
    state = _weights(weights, max_bytes, errors)
    if state is not None and spec is not None and parsed is not None and n_features > 0:
        try:
            reference = build_model(spec, n_features, n_outputs=parsed.target.n_outputs, seed=0)
        except (ModelSpecError, KindUnavailable) as exc:
            errors["model"] = f"cannot be built on this server: {exc}"
        else:
            try:
                tensors.check_compatible(state, reference.state_dict())
            except tensors.IncompatibleStateDict as exc:
                errors["weights"] = (
                    f"do not fit the model {spec['kind']!r} on {n_features} input(s) and "
                    f"{parsed.target.n_outputs} output(s): {exc}"
                )
    if state is not None and "weights" not in errors:
        bad = tensors.first_non_finite(state)
        if bad is not None:
            errors["weights"] = f"tensor {bad!r} holds NaN or infinite values"
    if errors:
        raise UploadedModelError(errors)
    assert spec is not None and parsed is not None and state is not None
    return CheckedModel(
        model=spec,
        schema=parsed,
        preprocessing=dict(preprocessing),
        sha256=tensors.sha256_hex(weights),
        size_bytes=len(weights),
        signature={
            name: [dtype, list(shape)] for name, (dtype, shape) in tensors.signature(state).items()
        },
        n_features=n_features,
    )


def size_problem(size: int, max_bytes: int) -> str | None:
    """Why a weights file of ``size`` bytes is refused before it is read, or None (a server
    checks an upload's declared size with it before reading the file)."""
    if size > max_bytes:
        return f"the file is {size:,} bytes, above this server's limit of {max_bytes:,} bytes"
    return None


def _weights(data: Any, max_bytes: int, errors: dict[str, str]) -> dict[str, Any] | None:
    if not isinstance(data, bytes | bytearray):
        errors["weights"] = "required: a .safetensors file"
        return None
    if problem := size_problem(len(data), max_bytes):
        errors["weights"] = problem
        return None
    if not data:
        errors["weights"] = "the file is empty: " + _SAVE_HINT
        return None
    head = bytes(data[:4])
    if head.startswith(_PICKLE):
        errors["weights"] = (
            "is a pickle file (pickle.dump or an old torch.save): Quorum never unpickles an "
            "upload, which could run code; " + _SAVE_HINT
        )
        return None
    if head == _ZIP:
        errors["weights"] = (
            "is a ZIP archive (torch.save's format, which holds a pickle): Quorum never "
            "unpickles an upload, which could run code; " + _SAVE_HINT
        )
        return None
    try:
        return tensors.decode_state_dict(bytes(data))
    except tensors.TensorCodecError as exc:
        errors["weights"] = f"{exc}; {_SAVE_HINT}"
        return None
