"""A residual MLP for tabular data, as a Quorum model kind (entry point ``quorum.models:resmlp``).

Quorum's agent builds it from the plan's declarative ``options`` with :meth:`ResMLPKind.build`;
this package reads no file, no network and no clock, and imports nothing but torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

__all__ = ["KIND", "ResMLP", "ResMLPKind"]

__version__ = "0.1.0"

ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}
DEFAULTS: dict[str, Any] = {
    "width": 64,
    "blocks": 2,
    "activation": "relu",
    "layer_norm": True,
    "dropout": 0.0,
}


def _integer(options: Mapping[str, Any], key: str, low: int, high: int) -> int:
    value = options[key]
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{key!r} must be an integer from {low} to {high}, got {value!r}")
    return value


class Block(nn.Module):
    """x + Linear(act(Linear(norm(x)))): a pre-norm residual block."""

    def __init__(self, width: int, activation: type[nn.Module], norm: bool, dropout: float):
        super().__init__()
        self.norm: nn.Module = nn.LayerNorm(width) if norm else nn.Identity()
        self.fc1 = nn.Linear(width, width)
        self.act = activation()
        self.drop: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.drop(self.act(self.fc1(self.norm(x)))))


class ResMLP(nn.Module):
    """Input projection, residual blocks, output layer."""

    def __init__(self, n_features: int, n_outputs: int, options: Mapping[str, Any]):
        super().__init__()
        width = options["width"]
        activation = ACTIVATIONS[options["activation"]]
        self.inp = nn.Linear(n_features, width)
        self.blocks = nn.Sequential(
            *(
                Block(width, activation, options["layer_norm"], options["dropout"])
                for _ in range(options["blocks"])
            )
        )
        self.act = activation()
        self.out = nn.Linear(width, n_outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.blocks(self.inp(x))))


class ResMLPKind:
    """The model kind: name, version, ``validate`` and ``build`` (fedcore.model_kinds)."""

    name = "resmlp"
    version = __version__

    def validate(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options with defaults filled in; ValueError naming the first bad one."""
        if not isinstance(options, Mapping):
            raise ValueError("options must be an object")
        unknown = sorted(str(key) for key in options if key not in DEFAULTS)
        if unknown:
            raise ValueError(f"unknown option(s) {unknown}; allowed: {', '.join(DEFAULTS)}")
        merged = {**DEFAULTS, **options}
        _integer(merged, "width", 8, 1024)
        _integer(merged, "blocks", 1, 8)
        if merged["activation"] not in ACTIVATIONS:
            raise ValueError(
                f"'activation' must be one of {', '.join(ACTIVATIONS)}, got {merged['activation']!r}"
            )
        if not isinstance(merged["layer_norm"], bool):
            raise ValueError(f"'layer_norm' must be true or false, got {merged['layer_norm']!r}")
        dropout = merged["dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, int | float):
            raise ValueError(f"'dropout' must be a number, got {dropout!r}")
        if not 0 <= dropout < 1:
            raise ValueError(f"'dropout' must be in [0, 1), got {dropout!r}")
        merged["dropout"] = float(dropout)
        return merged

    def build(self, options: Mapping[str, Any], *, n_features: int, n_outputs: int) -> nn.Module:
        """The module for validated options: (n, n_features) -> (n, n_outputs)."""
        return ResMLP(n_features, n_outputs, self.validate(options))


KIND = ResMLPKind()
