"""Declarative model zoo: a JSON model spec becomes a torch module.

Every model maps a float32 feature matrix (n, n_features) to outputs (n, n_outputs): one logit
for binary classification, one logit per class for multi-class, one value for regression (the
plan's task decides, ``fedcore.tabular.TargetSpec.n_outputs``). Parameter names are stable (``linear.*`` for logistic regression; ``fc1.*``,
``fc2.*``, ... and ``out.*`` for the MLP) because they are the keys of the state dicts that travel
between server and sites.

Initialisation never changes torch's global RNG: modules are built inside ``fork_rng`` (which
restores the global state afterwards), then re-initialised from a private ``torch.Generator``
with the same distributions PyTorch uses by default for ``nn.Linear``. (Building on the ``meta``
device would avoid the throw-away draws, but its first use imports torch's decomposition tables:
about a second per process, which five agents on two cores pay all at once.)

Beyond the zoo, ``{"kind": "installed", "name", "version", "sha256", "options"}`` names a model
kind a site installed itself (:mod:`fedcore.model_kinds`): built only when that exact
distribution is installed here.
"""

from __future__ import annotations

import json
import math
import re
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedcore import model_kinds

__all__ = [
    "ACTIVATIONS",
    "INSTALLED",
    "MAX_OPTIONS_BYTES",
    "MODEL_KINDS",
    "SPEC_KINDS",
    "ModelSpecError",
    "build_model",
    "validate_model_spec",
]

MODEL_KINDS: tuple[str, ...] = ("logistic_regression", "mlp")  # the built-in zoo
INSTALLED = "installed"  # a kind a site installed (fedcore.model_kinds)
SPEC_KINDS: tuple[str, ...] = (*MODEL_KINDS, INSTALLED)
MAX_OUTPUTS = 256
MAX_OPTIONS_BYTES = 4096
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+!_-]{0,63}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
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


def _init_linear(layer: nn.Linear, generator: torch.Generator) -> None:
    # Same distributions as nn.Linear.reset_parameters (kaiming_uniform with a=sqrt(5) is
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in))), drawn from a private generator.
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1.0 / math.sqrt(layer.in_features)
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)


def build_model(
    spec: Mapping[str, Any],
    n_features: int,
    *,
    n_outputs: int = 1,
    seed: int | None = None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> nn.Module:
    """Build the torch module a model spec describes.

    Args:
        spec: the model spec (see ``validate_model_spec``).
        n_features: width of the input feature matrix (``len(feature_names(...))``), >= 1.
        n_outputs: width of the output: 1 (binary logit, regression value) or the number of
            classes (``TargetSpec.n_outputs``).
        seed: seed of the private generator used for initialisation; the same seed gives the
            same weights. ``None`` draws a fresh non-deterministic seed. The global torch RNG is
            never read or changed.
        kinds: for an installed kind, the installed kinds to take it from
            (``fedcore.model_kinds.installed_kinds()`` when None).

    Returns:
        A module on the CPU, float32, mapping (n, n_features) to outputs (n, n_outputs); the
        zoo's are ``nn.Sequential``.

    Raises:
        ModelSpecError: the spec, ``n_features`` or ``n_outputs`` is invalid, or an installed
            kind is missing, of another version or digest, or refuses its options.
    """
    normalised = validate_model_spec(spec)
    if not _is_int(n_features) or n_features < 1:
        raise ModelSpecError(
            f"n_features must be a positive integer, got {n_features!r}; "
            "it is the number of columns of the transformed feature matrix"
        )
    if not _is_int(n_outputs) or not 1 <= n_outputs <= MAX_OUTPUTS:
        raise ModelSpecError(
            f"n_outputs must be an integer in [1, {MAX_OUTPUTS}], got {n_outputs!r}"
        )
    if seed is not None and not _is_int(seed):
        raise ModelSpecError(f"seed must be an integer or None, got {seed!r}")

    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    model: nn.Module
    with torch.random.fork_rng(devices=[]):
        if normalised["kind"] == INSTALLED:
            # Any initialiser of the kind's own that draws from the global RNG draws from this
            # fork, seeded from the private generator: the same seed, the same weights.
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
            model = _build_installed(normalised, n_features, n_outputs, kinds)
        else:
            model = nn.Sequential(_zoo_layers(normalised, n_features, n_outputs))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                _init_linear(module, generator)
    return model


def _zoo_layers(
    normalised: Mapping[str, Any], n_features: int, n_outputs: int
) -> OrderedDict[str, nn.Module]:
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if normalised["kind"] == "logistic_regression":
        layers["linear"] = nn.Linear(n_features, n_outputs)
        return layers
    width_in = n_features
    activation = ACTIVATIONS[normalised["activation"]]
    for index, width in enumerate(normalised["hidden"], start=1):
        layers[f"fc{index}"] = nn.Linear(width_in, width)
        layers[f"act{index}"] = activation()
        if normalised["dropout"] > 0.0:
            layers[f"drop{index}"] = nn.Dropout(normalised["dropout"])
        width_in = width
    layers["out"] = nn.Linear(width_in, n_outputs)
    return layers


def _build_installed(
    spec: Mapping[str, Any],
    n_features: int,
    n_outputs: int,
    kinds: Mapping[str, model_kinds.InstalledKind] | None,
) -> nn.Module:
    try:
        kind = model_kinds.resolve(spec, kinds)
    except model_kinds.KindUnavailable as exc:
        raise ModelSpecError(str(exc)) from None
    try:
        options = kind.validate(spec["options"])
    except (ValueError, TypeError) as exc:
        raise ModelSpecError(f"model kind {spec['name']!r}: options: {exc}") from None
    model = kind.build(options, n_features=n_features, n_outputs=n_outputs)
    if not isinstance(model, nn.Module):
        raise ModelSpecError(
            f"model kind {spec['name']!r} built {type(model).__name__}, not a module"
        )
    return model
