"""The model spec of a plan, checked without torch: kinds, activations, limits and
:func:`validate_model_spec`.

The plan language (:mod:`fedcore.plan`) validates a plan's ``model`` with these, and
:mod:`fedcore.models` builds the torch module from the same rules; they live here so that
reading or checking a plan (an operator's command line, an agent's ``--help``) does not load
torch.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from fedcore import model_kinds

__all__ = [
    "ACTIVATION_NAMES",
    "INSTALLED",
    "MAX_HIDDEN_LAYERS",
    "MAX_HIDDEN_UNITS",
    "MAX_OPTIONS_BYTES",
    "MAX_OUTPUTS",
    "MODEL_KINDS",
    "SPEC_KINDS",
    "ModelSpecError",
    "validate_model_spec",
]

MODEL_KINDS: tuple[str, ...] = ("logistic_regression", "mlp")  # the built-in zoo
INSTALLED = "installed"  # a kind a site installed (fedcore.model_kinds)
SPEC_KINDS: tuple[str, ...] = (*MODEL_KINDS, INSTALLED)
MAX_OUTPUTS = 256
MAX_OPTIONS_BYTES = 4096
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
ACTIVATION_NAMES: tuple[str, ...] = ("relu", "tanh", "gelu", "sigmoid", "leaky_relu")
MAX_HIDDEN_LAYERS = 8
MAX_HIDDEN_UNITS = 4096

_ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "logistic_regression": ("kind",),
    "mlp": ("kind", "hidden", "activation", "dropout"),
    INSTALLED: ("kind", "name", "version", "sha256", "options"),
}


class ModelSpecError(ValueError):
    """A model spec is invalid; the message names the key and the allowed values."""


def _is_int(value: object) -> bool:
    # bool is a subclass of int: True would otherwise pass as a layer of width 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def validate_model_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a model spec and return a normalised copy with defaults filled in.

    Args:
        spec: JSON-like mapping with a ``kind`` ("logistic_regression" or "mlp") and, for "mlp",
            ``hidden`` (list of 1..8 positive ints, each <= 4096), ``activation`` (one of
            relu, tanh, gelu, sigmoid, leaky_relu; default relu) and ``dropout`` (0 <= p < 1;
            default 0).

    Returns:
        A new dict: ``{"kind": "logistic_regression"}`` or
        ``{"kind": "mlp", "hidden": [...], "activation": ..., "dropout": float}``.

    Raises:
        ModelSpecError: the spec is not a mapping, or a key is unknown, missing or out of range.
    """
    if not isinstance(spec, Mapping):
        raise ModelSpecError(
            f"model spec must be a JSON object, got {type(spec).__name__}; "
            f'write e.g. {{"kind": "mlp", "hidden": [32, 16]}}'
        )
    kind = spec.get("kind")
    if kind not in SPEC_KINDS:
        raise ModelSpecError(
            f"model spec key 'kind': {kind!r} is not a known model kind; "
            f"allowed: {', '.join(SPEC_KINDS)}"
        )
    allowed = _ALLOWED_KEYS[kind]
    unknown = sorted(str(key) for key in spec if key not in allowed)
    if unknown:
        raise ModelSpecError(
            f"model spec for kind {kind!r}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    if kind == "logistic_regression":
        return {"kind": kind}
    if kind == INSTALLED:
        return _validate_installed(spec)

    if "hidden" not in spec:
        raise ModelSpecError(
            "model spec for kind 'mlp': key 'hidden' is required, "
            "a list of 1 to 8 layer widths such as [32, 16]"
        )
    hidden = spec["hidden"]
    if not isinstance(hidden, list | tuple) or not 1 <= len(hidden) <= MAX_HIDDEN_LAYERS:
        raise ModelSpecError(
            f"model spec key 'hidden': {hidden!r} must be a list of 1 to {MAX_HIDDEN_LAYERS} "
            "layer widths such as [32, 16]"
        )
    for index, width in enumerate(hidden):
        if not _is_int(width) or not 1 <= width <= MAX_HIDDEN_UNITS:
            raise ModelSpecError(
                f"model spec key 'hidden': entry {index} is {width!r}; each layer width must be "
                f"an integer from 1 to {MAX_HIDDEN_UNITS} (booleans and floats are refused)"
            )

    activation = spec.get("activation", "relu")
    if activation not in ACTIVATION_NAMES:
        raise ModelSpecError(
            f"model spec key 'activation': {activation!r} is not supported; "
            f"allowed: {', '.join(ACTIVATION_NAMES)}"
        )

    dropout = spec.get("dropout", 0.0)
    if not _is_number(dropout) or not math.isfinite(dropout) or not 0.0 <= dropout < 1.0:
        raise ModelSpecError(
            f"model spec key 'dropout': {dropout!r} must be a number p with 0 <= p < 1"
        )
    return {
        "kind": kind,
        "hidden": [int(width) for width in hidden],
        "activation": activation,
        "dropout": float(dropout),
    }


def _validate_installed(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The shape of an installed kind's spec; its options are the kind's to check, where it is
    installed (the plan language cannot know them)."""
    for key in ("name", "version", "sha256"):
        if key not in spec:
            raise ModelSpecError(
                f"model spec for kind 'installed': key {key!r} is required (name, version and "
                "sha256 of the distribution the sites installed)"
            )
    name, version, digest = spec["name"], spec["version"], spec["sha256"]
    if not isinstance(name, str) or not model_kinds.NAME_PATTERN.match(name):
        raise ModelSpecError(
            f"model spec key 'name': {name!r} must be an entry-point name of the group "
            f"{model_kinds.ENTRY_POINT_GROUP!r} ({model_kinds.NAME_PATTERN.pattern})"
        )
    if not isinstance(version, str) or not _VERSION.match(version):
        raise ModelSpecError(
            f"model spec key 'version': {version!r} must be the distribution's version, "
            "e.g. '0.1.0'"
        )
    if not isinstance(digest, str) or not _SHA256.match(digest):
        raise ModelSpecError(
            f"model spec key 'sha256': {str(digest)[:80]!r} must be 64 lower-case hex digits: "
            "the distribution's digest (docs/tasks.md, 'Model kinds a site installs')"
        )
    options = spec.get("options", {})
    if not isinstance(options, Mapping):
        raise ModelSpecError("model spec key 'options' must be an object (the kind's settings)")
    try:
        size = len(json.dumps(options, allow_nan=False).encode("utf-8"))
    except (TypeError, ValueError):
        raise ModelSpecError("model spec key 'options' must be plain JSON (no NaN)") from None
    if size > MAX_OPTIONS_BYTES:
        raise ModelSpecError(
            f"model spec key 'options' is {size} bytes of JSON, above {MAX_OPTIONS_BYTES}"
        )
    return {
        "kind": INSTALLED,
        "name": name,
        "version": version,
        "sha256": digest,
        "options": dict(options),
    }
