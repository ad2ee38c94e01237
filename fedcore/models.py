"""Declarative model zoo: a JSON model spec becomes a torch module with one output logit.

Every model maps a float32 feature matrix (n, n_features) to logits (n, 1) for binary
classification. Parameter names are stable (``linear.*`` for logistic regression; ``fc1.*``,
``fc2.*``, ... and ``out.*`` for the MLP) because they are the keys of the state dicts that travel
between server and sites.

Initialisation never changes torch's global RNG: modules are built inside ``fork_rng`` (which
restores the global state afterwards), then re-initialised from a private ``torch.Generator``
with the same distributions PyTorch uses by default for ``nn.Linear``. (Building on the ``meta``
device would avoid the throw-away draws, but its first use imports torch's decomposition tables:
about a second per process, which five agents on two cores pay all at once.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "ACTIVATIONS",
    "MODEL_KINDS",
    "ModelSpecError",
    "build_model",
    "validate_model_spec",
]

MODEL_KINDS: tuple[str, ...] = ("logistic_regression", "mlp")
ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}
MAX_HIDDEN_LAYERS = 8
MAX_HIDDEN_UNITS = 4096

_ALLOWED_KEYS: dict[str, tuple[str, ...]] = {
    "logistic_regression": ("kind",),
    "mlp": ("kind", "hidden", "activation", "dropout"),
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
    if kind not in MODEL_KINDS:
        raise ModelSpecError(
            f"model spec key 'kind': {kind!r} is not a known model kind; "
            f"allowed: {', '.join(MODEL_KINDS)}"
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
    if activation not in ACTIVATIONS:
        raise ModelSpecError(
            f"model spec key 'activation': {activation!r} is not supported; "
            f"allowed: {', '.join(ACTIVATIONS)}"
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


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    # Same distributions as nn.Linear.reset_parameters (kaiming_uniform with a=sqrt(5) is
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn from a private generator.
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_model(spec: Mapping[str, Any], n_features: int, *, seed: int | None = None) -> nn.Module:
    """Build the torch module a model spec describes.

    Args:
        spec: the model spec (see ``validate_model_spec``).
        n_features: width of the input feature matrix (``len(feature_names(...))``), >= 1.
        seed: seed of the private generator used for initialisation; the same seed gives the
            same weights. ``None`` draws a fresh non-deterministic seed. The global torch RNG is
            never read or changed.

    Returns:
        An ``nn.Sequential`` on the CPU, float32, mapping (n, n_features) to logits (n, 1).

    Raises:
        ModelSpecError: the spec or ``n_features`` is invalid.
    """
    normalised = validate_model_spec(spec)
    if not _is_int(n_features) or n_features < 1:
        raise ModelSpecError(
            f"n_features must be a positive integer, got {n_features!r}; "
            "it is the number of columns of the transformed feature matrix"
        )
    if seed is not None and not _is_int(seed):
        raise ModelSpecError(f"seed must be an integer or None, got {seed!r}")

    layers: OrderedDict[str, nn.Module] = OrderedDict()
    with torch.random.fork_rng(devices=[]):
        if normalised["kind"] == "logistic_regression":
            layers["linear"] = nn.Linear(n_features, 1)
        else:
            width_in = n_features
            activation = ACTIVATIONS[normalised["activation"]]
            for index, width in enumerate(normalised["hidden"], start=1):
                layers[f"fc{index}"] = nn.Linear(width_in, width)
                layers[f"act{index}"] = activation()
                if normalised["dropout"] > 0.0:
                    layers[f"drop{index}"] = nn.Dropout(normalised["dropout"])
                width_in = width
            layers["out"] = nn.Linear(width_in, 1)
    model = nn.Sequential(layers)

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, generator)
    return model
