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

import math
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from fedcore import model_kinds
from fedcore.model_spec import (
    ACTIVATION_NAMES,
    INSTALLED,
    MAX_HIDDEN_LAYERS,
    MAX_HIDDEN_UNITS,
    MAX_OPTIONS_BYTES,
    MAX_OUTPUTS,
    MODEL_KINDS,
    SPEC_KINDS,
    ModelSpecError,
    _is_int,
    validate_model_spec,
)

__all__ = [
    "ACTIVATIONS",
    "INSTALLED",
    "MAX_HIDDEN_LAYERS",
    "MAX_HIDDEN_UNITS",
    "MAX_OPTIONS_BYTES",
    "MAX_OUTPUTS",
    "MODEL_KINDS",
    "SPEC_KINDS",
    "ModelSpecError",
    "build_model",
    "validate_model_spec",
]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "sigmoid": nn.Sigmoid,
    "leaky_relu": nn.LeakyReLU,
}
# The names are the plan language's (fedcore.model_spec, checked without torch).
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "activations drifted from fedcore.model_spec"


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
