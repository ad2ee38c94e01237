"""Fixed-point quantisation of float vectors into Z_{2^32}, where the masks live.

A coordinate is clipped to [-c, c], shifted to [0, 2c] and scaled to an integer level in
[0, L] with ``L = floor((2^32 - 1) / n)`` for a round of n clients, so the sum of any n quantised
vectors is at most ``n * L <= 2^32 - 1``: the true sum never wraps modulo 2^32 and the unmasked
modular sum *is* the integer sum. ``scale = L / (2c)`` is the largest that guarantees this, giving a
step of ``2c / L`` (about ``2c * n / 2^32``; 4.7e-8 for c = 1, n = 100). Rounding is to the nearest
level, so each quantised coordinate is within half a step, ``c / L``, of its clipped value, and a
sum of m dequantised vectors is within ``m * c / L``. Four bytes per parameter on the wire.

Masking floats directly (as Flower's SecAgg+ does with float64) never cancels exactly and leaks the
magnitude of the input through the float exponent; a finite ring makes masks one-time pads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

WORD_MODULUS = 2**32


def as_float_vector(vector: np.ndarray | torch.Tensor | Any) -> np.ndarray:
    """A flat float64 numpy copy of an array or tensor (torch is duck-typed, never imported)."""
    if hasattr(vector, "detach"):
        vector = vector.detach().cpu().numpy()
    array = np.asarray(vector, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(array)):
        raise ValueError("a vector to aggregate must be finite (no NaN or infinity)")
    return array


@dataclass(frozen=True)
class Quantizer:
    """Clip-shift-scale quantiser for a round of ``n_clients`` (see the module docstring).

    Attributes:
        clip: c > 0; every coordinate is clipped to [-c, c] before quantisation.
        n_clients: the most vectors that can ever be summed (the round's roster size).
    """

    clip: float
    n_clients: int

    def __post_init__(self) -> None:
        """Refuse parameters that would wrap or are meaningless."""
        if not (isinstance(self.clip, int | float) and math.isfinite(self.clip) and self.clip > 0):
            raise ValueError("clip must be a finite positive number")
        if not isinstance(self.n_clients, int) or self.n_clients < 1:
            raise ValueError("n_clients must be a positive integer")
        if self.levels < 2:
            raise ValueError(f"{self.n_clients} clients leave no room in 32 bits for a value")

    @property
    def levels(self) -> int:
        """L, the top quantisation level: n * L <= 2^32 - 1 so sums never wrap."""
        return (WORD_MODULUS - 1) // self.n_clients

    @property
    def scale(self) -> float:
        """Levels per unit of input: L / (2c)."""
        return self.levels / (2.0 * self.clip)

    @property
    def max_error(self) -> float:
        """Largest error of one dequantised coordinate of a clipped input: half a step, c / L."""
        return self.clip / self.levels

    def quantize(self, vector: np.ndarray | torch.Tensor) -> np.ndarray:
        """Clip to [-c, c] and map to uint32 levels in [0, L]."""
        array = as_float_vector(vector)
        shifted = (np.clip(array, -self.clip, self.clip) + self.clip) * self.scale
        return np.minimum(np.floor(shifted + 0.5), self.levels).astype(np.uint32)

    def dequantize_sum(self, total: np.ndarray, n_summed: int) -> np.ndarray:
        """Float64 sum of ``n_summed`` vectors from the sum of their levels: total/scale - n*c."""
        if not 0 <= n_summed <= self.n_clients:
            raise ValueError(f"cannot have summed {n_summed} of {self.n_clients} vectors")
        return np.asarray(total, dtype=np.float64) / self.scale - n_summed * self.clip
