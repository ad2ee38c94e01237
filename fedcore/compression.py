"""Update compression: what an agent sends instead of dense float32 weights, and its decoding.

A plan may choose ``"compression": {"method": ...}``:

- ``none`` (default): the update is the trained weights, dense, as before;
- ``float16``: the change of every floating tensor, ``local - global``, in half precision;
- ``int8``: that change quantised to 8 bits per coordinate, symmetric with one scale per tensor
  (``value = q * scale``, ``q`` in [-127, 127], ``scale = max|delta| / 127``) with unbiased
  stochastic rounding (``E[q * scale] = delta``), the rounding noise drawn from the OS;
- ``topk`` with ``ratio`` in (0, 1]: of the model's change, only the ``k = ceil(ratio * N)``
  coordinates largest in magnitude (N: all floating coordinates), as (index, value) pairs. What is
  not sent is kept at the site (:class:`ErrorFeedback`) and added to the next round's change
  (error feedback, Stich et al. 2018; Karimireddy et al. 2019), so nothing is lost, only delayed.

Compressed methods always send the change relative to the global model the task carried, never
the weights: half precision or 8 bits of a weight would swamp a small update, of its change they
do not. Integer buffers (e.g. BatchNorm's ``num_batches_tracked``) are never compressed: they
travel as the full local value under their own name.

Wire layout (a safetensors state dict; the ``update`` header's ``compression`` field names the
method, no field meaning dense weights). The change of the floating tensors of the global model
is one flat vector of N coordinates, the tensors in sorted name order (each flattened in row-major
order), so the header costs the same whatever the number of tensors; T is the number of floating
tensors:

============  ==========================================================================
method        tensors
============  ==========================================================================
``float16``   ``@delta``: float16, (N,)
``int8``      ``@q``: int8, (N,) in [-127, 127]; ``@scales``: float32, (T,), one per tensor
              (``change = q * scale`` of the tensor the coordinate belongs to)
``topk``      ``@indices``: int32, (m,), flat indices strictly increasing, m <= k;
              ``@values``: float32, (m,); ``k = ceil(ratio * N)`` over the whole model
============  ==========================================================================

:func:`decode_delta` checks all of it against the global model's signature before any value is
used and raises a :class:`CompressionError` subclass naming the tensor and the problem; its
``code`` is the ``error`` frame's code. Pure: torch and numpy only.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

from fedcore.compression_spec import (
    COMPRESSED_METHODS,
    METHODS,
    CompressionError,
    CompressionSpec,
    CompressionSpecError,
)

__all__ = [
    "COMPRESSED_METHODS",
    "METHODS",
    "BadScale",
    "CompressedUpdate",
    "CompressionError",
    "CompressionSpec",
    "CompressionSpecError",
    "ErrorFeedback",
    "IndexOutOfRange",
    "LayoutMismatch",
    "NonFiniteValues",
    "TooManyValues",
    "apply_delta",
    "compress_update",
    "decode_delta",
    "decompress_update",
    "encode_delta",
    "secure_rng",
    "wire_keys",
]

INT8_LEVELS = 127  # symmetric: -128 is never produced, and refused on receipt
INDEX_MAX = 2**31 - 1  # top-k indices are int32
FLOAT16_MAX = float(torch.finfo(torch.float16).max)
# Wire tensor names. "@" cannot start a module attribute, so no model tensor is named so.
FLOAT16_KEY = "@delta"
INT8_Q_KEY, INT8_SCALES_KEY = "@q", "@scales"
TOPK_INDICES_KEY, TOPK_VALUES_KEY = "@indices", "@values"
WIRE_TENSORS: dict[str, tuple[str, ...]] = {
    "float16": (FLOAT16_KEY,),
    "int8": (INT8_Q_KEY, INT8_SCALES_KEY),
    "topk": (TOPK_INDICES_KEY, TOPK_VALUES_KEY),
}


class LayoutMismatch(CompressionError):
    """Tensors missing, unexpected, or of the wrong dtype or shape for the global model."""

    code = "incompatible_update"


class IndexOutOfRange(CompressionError):
    """A top-k index outside the tensor, or indices not strictly increasing (duplicates)."""


class TooManyValues(CompressionError):
    """A top-k tensor carries more coordinates than the plan's ratio allows."""


class BadScale(CompressionError):
    """An int8 scale that is negative or not finite, or a quantised value of -128."""


class NonFiniteValues(CompressionError):
    """Values (or the decoded change) hold NaN or Inf."""

    code = "non_finite"


# (name, shape, offset in the flat vector) of each floating tensor, in sorted name order
Layout = list[tuple[str, tuple[int, ...], int]]


def secure_rng() -> np.random.Generator:
    """A numpy generator seeded from the OS (rounding noise an observer cannot predict)."""
    return np.random.Generator(np.random.PCG64(int.from_bytes(os.urandom(32), "little")))


def _layout(reference: Mapping[str, torch.Tensor]) -> Layout:
    """(name, shape, offset) of every floating tensor, in sorted name order: the flat vector."""
    layout: Layout = []
    offset = 0
    for name in sorted(reference):
        if reference[name].is_floating_point():
            shape = tuple(int(n) for n in reference[name].shape)
            layout.append((name, shape, offset))
            offset += math.prod(shape)
    return layout


def _size(layout: Layout) -> int:
    return layout[-1][2] + math.prod(layout[-1][1]) if layout else 0


def _flatten(values: Mapping[str, torch.Tensor], layout: Layout) -> torch.Tensor:
    parts = [values[name].detach().to("cpu", torch.float32).reshape(-1) for name, _, _ in layout]
    return torch.cat(parts) if parts else torch.zeros(0)


def _unflatten(vector: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    return {
        name: vector[offset : offset + math.prod(shape)].reshape(shape).clone()
        for name, shape, offset in layout
    }


def _owner(layout: Layout, index: int) -> str:
    """The tensor a flat index falls in (for error messages)."""
    for name, shape, offset in layout:
        if offset <= index < offset + math.prod(shape):
            return f"{name!r}"
    return "no tensor"


def wire_keys(reference: Mapping[str, torch.Tensor], method: str) -> tuple[str, ...]:
    """Every tensor name of a compressed update of this global model, sorted.

    Raises:
        CompressionError: a wire name would collide with a model tensor's name.
    """
    if method not in WIRE_TENSORS:
        raise CompressionError(f"unknown compression method {method!r}")
    others = [name for name in reference if not reference[name].is_floating_point()]
    clash = sorted(set(others) & set(WIRE_TENSORS[method]))
    if clash:
        raise CompressionError(f"model tensor(s) {clash} collide with the compressed layout")
    return tuple(sorted([*WIRE_TENSORS[method], *others]))


# --------------------------------------------------------------------------------- encoding


def encode_delta(
    delta: Mapping[str, torch.Tensor],
    spec: CompressionSpec,
    *,
    rng: np.random.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Encode the change of the floating tensors with a compressed method.

    Args:
        delta: tensor name -> change (``local - global``) of each floating tensor.
        spec: a compressed method (not ``none``).
        rng: int8's rounding noise; None: :func:`secure_rng`.

    Returns:
        The wire tensors (see the module's table; the flat order is sorted tensor names).

    Raises:
        CompressionError: the method is ``none``, a change is not finite, or it overflows
            float16.
    """
    layout = _layout(delta)
    flat = _flatten(delta, layout)
    if not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).nonzero()[0, 0])
        raise NonFiniteValues(f"tensor {_owner(layout, bad)}: the change holds NaN or Inf")
    if spec.method == "float16":
        peak = float(flat.abs().max()) if flat.numel() else 0.0
        if peak > FLOAT16_MAX:
            raise CompressionError(
                f"a change of {peak:.3g} overflows float16; use int8 or topk, or a lower lr"
            )
        return {FLOAT16_KEY: flat.to(torch.float16)}
    if spec.method == "int8":
        rng = secure_rng() if rng is None else rng
        q = np.zeros(flat.numel(), dtype=np.int8)
        scales = np.zeros(len(layout), dtype=np.float32)
        array = flat.numpy().astype(np.float64)
        for i, (_, shape, offset) in enumerate(layout):
            part = slice(offset, offset + math.prod(shape))
            q[part], scales[i] = _quantise_int8(array[part], rng)
        return {INT8_Q_KEY: torch.from_numpy(q), INT8_SCALES_KEY: torch.from_numpy(scales)}
    if spec.method == "topk":
        if flat.numel() > INDEX_MAX:
            raise CompressionError("the model is too large for int32 top-k indices")
        k = spec.k(flat.numel())
        # sorted by index: the receiver refuses anything else (no duplicates by construction)
        indices = torch.topk(flat.abs(), k, sorted=False).indices.sort().values
        return {TOPK_INDICES_KEY: indices.to(torch.int32), TOPK_VALUES_KEY: flat[indices].clone()}
    raise CompressionError(f"method {spec.method!r} is not a compressed method")


def _quantise_int8(array: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Symmetric int8 with unbiased stochastic rounding: E[q * scale] = value."""
    peak = float(np.abs(array).max()) if array.size else 0.0
    scale = float(np.float32(peak / INT8_LEVELS))
    if scale == 0.0:
        return np.zeros(array.shape, dtype=np.int8), 0.0
    scaled = array / scale  # in [-127, 127] (up to float32 rounding of the scale)
    # floor(x + u), u ~ U[0, 1): rounds up with probability frac(x), so E[q] = x exactly
    q = np.floor(scaled + rng.random(array.shape))
    return np.clip(q, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


# --------------------------------------------------------------------------------- decoding


def _expect(
    wire: Mapping[str, torch.Tensor], key: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    got = wire[key]
    if got.dtype != dtype:
        raise LayoutMismatch(
            f"tensor {key!r}: dtype {str(got.dtype).removeprefix('torch.')}, expected "
            f"{str(dtype).removeprefix('torch.')}"
        )
    if tuple(got.shape) != tuple(shape):
        raise LayoutMismatch(f"tensor {key!r}: shape {tuple(got.shape)}, expected {tuple(shape)}")


def decode_delta(
    wire: Mapping[str, torch.Tensor],
    spec: CompressionSpec,
    reference: Mapping[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Check and decode received wire tensors against the global model.

    Args:
        wire: the update's tensors (a decoded safetensors payload).
        spec: the plan's compression (a compressed method).
        reference: the round's global model (only names, dtypes and shapes are read).

    Returns:
        (change of every floating tensor as float32, every other tensor as sent).

    Raises:
        LayoutMismatch: tensors missing or unexpected, wrong dtype or shape.
        IndexOutOfRange, TooManyValues, BadScale, NonFiniteValues: as their names say.
    """
    expected = wire_keys(reference, spec.method)
    missing = sorted(set(expected) - set(wire))
    extra = sorted(set(wire) - set(expected))
    if missing or extra:
        raise LayoutMismatch(
            f"{spec.method} update tensors differ from the global model's: missing "
            f"{missing[:10]}, unexpected {extra[:10]}"
        )
    others: dict[str, torch.Tensor] = {}
    for name in sorted(reference):
        if not reference[name].is_floating_point():
            _expect(wire, name, reference[name].dtype, tuple(reference[name].shape))
            others[name] = wire[name]
    layout = _layout(reference)
    size = _size(layout)
    if spec.method == "float16":
        _expect(wire, FLOAT16_KEY, torch.float16, (size,))
        flat = wire[FLOAT16_KEY].to(torch.float32)
    elif spec.method == "int8":
        flat = _decode_int8(wire, layout, size)
    else:
        flat = _decode_topk(wire, layout, size, spec)
    if not bool(torch.isfinite(flat).all()):
        bad = int((~torch.isfinite(flat)).nonzero()[0, 0])
        raise NonFiniteValues(f"tensor {_owner(layout, bad)}: the decoded change holds NaN or Inf")
    return _unflatten(flat, layout), others


def _decode_int8(wire: Mapping[str, torch.Tensor], layout: Layout, size: int) -> torch.Tensor:
    _expect(wire, INT8_Q_KEY, torch.int8, (size,))
    _expect(wire, INT8_SCALES_KEY, torch.float32, (len(layout),))
    q, scales = wire[INT8_Q_KEY], wire[INT8_SCALES_KEY]
    flat = torch.empty(size, dtype=torch.float64)
    for i, (name, shape, offset) in enumerate(layout):
        scale = float(scales[i])
        if not math.isfinite(scale) or scale < 0:
            raise BadScale(f"tensor {name!r}: int8 scale {scale!r} is not a finite number >= 0")
        part = q[offset : offset + math.prod(shape)]
        if part.numel() and int(part.min()) < -INT8_LEVELS:
            raise BadScale(f"tensor {name!r}: int8 value -128 is outside the symmetric range")
        flat[offset : offset + part.numel()] = part.to(torch.float64) * scale
    return flat.to(torch.float32)


def _decode_topk(
    wire: Mapping[str, torch.Tensor],
    layout: Layout,
    size: int,
    spec: CompressionSpec,
) -> torch.Tensor:
    indices, values = wire[TOPK_INDICES_KEY], wire[TOPK_VALUES_KEY]
    if indices.dim() != 1 or values.dim() != 1 or indices.numel() != values.numel():
        raise LayoutMismatch(
            f"top-k indices {tuple(indices.shape)} and values {tuple(values.shape)} must be 1-D "
            "and of the same length"
        )
    _expect(wire, TOPK_INDICES_KEY, torch.int32, (indices.numel(),))
    _expect(wire, TOPK_VALUES_KEY, torch.float32, (indices.numel(),))
    k = spec.k(size)
    if indices.numel() > k:
        raise TooManyValues(
            f"{indices.numel()} coordinates sent; the plan's top-k ratio {spec.ratio:g} allows "
            f"at most {k} of {size}"
        )
    if indices.numel():
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= size:
            raise IndexOutOfRange(
                f"top-k index {low if low < 0 else high} outside the model's 0..{size - 1}"
            )
        if indices.numel() > 1 and not bool((indices[1:] > indices[:-1]).all()):
            raise IndexOutOfRange("top-k indices must be strictly increasing (no duplicates)")
    flat = torch.zeros(size, dtype=torch.float32)
    flat[indices.to(torch.int64)] = values
    if not bool(torch.isfinite(values).all()):
        bad = int(indices[(~torch.isfinite(values)).nonzero()[0, 0]])
        raise NonFiniteValues(f"tensor {_owner(layout, bad)}: top-k values hold NaN or Inf")
    return flat


def apply_delta(
    reference: Mapping[str, torch.Tensor],
    deltas: Mapping[str, torch.Tensor],
    others: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Full weights: global + change for floating tensors (in their dtype), the rest as sent."""
    state: dict[str, torch.Tensor] = {}
    for name in sorted(reference):
        base = reference[name]
        if name in deltas:
            state[name] = (base.to(torch.float64) + deltas[name].to(torch.float64)).to(base.dtype)
        else:
            state[name] = others[name].clone()
    return state


def decompress_update(
    wire: Mapping[str, torch.Tensor],
    spec: CompressionSpec,
    reference: Mapping[str, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Received wire tensors -> the full weights they stand for (checked first, see decode_delta).

    Raises:
        CompressionError: as :func:`decode_delta`; NonFiniteValues when global + change
            overflows.
    """
    deltas, others = decode_delta(wire, spec, reference)
    state = apply_delta(reference, deltas, others)
    for name in deltas:
        if not bool(torch.isfinite(state[name]).all()):
            raise NonFiniteValues(f"tensor {name!r}: global + change overflows")
    return state


# ------------------------------------------------------------------------------ error feedback


@dataclass
class ErrorFeedback:
    """The part of a site's change top-k has not sent yet, across the rounds of one run.

    Rebuilding a round (the task re-sent after a crash, a retried attempt) must not count its
    residual twice, so the state keeps both sides of the last round it served: ``before`` (the
    residual that round started from) and ``after`` (what it left). A round equal to ``round``
    starts again from ``before``; a later round starts from ``after``.
    """

    round: int = 0
    before: dict[str, torch.Tensor] = field(default_factory=dict)
    after: dict[str, torch.Tensor] = field(default_factory=dict)

    def residual_for(self, round_number: int) -> dict[str, torch.Tensor]:
        """The residual a build of ``round_number`` starts from."""
        return self.before if round_number == self.round else self.after

    def advance(self, round_number: int, residual: Mapping[str, torch.Tensor]) -> None:
        """Record what a build of ``round_number`` left unsent."""
        start = self.residual_for(round_number)
        self.round, self.before, self.after = round_number, start, dict(residual)

    def to_bytes(self, metadata: Mapping[str, str] | None = None) -> bytes:
        """Serialise (safetensors, no code on load) with string ``metadata``."""
        data = {f"before/{k}": v.contiguous() for k, v in self.before.items()}
        data |= {f"after/{k}": v.contiguous() for k, v in self.after.items()}
        meta = {"round": str(self.round), **(metadata or {})}
        return bytes(_safetensors_save(data, metadata=meta))

    @classmethod
    def from_bytes(cls, data: bytes) -> tuple[ErrorFeedback, dict[str, str]]:
        """Parse :meth:`to_bytes` output: (state, metadata).

        Raises:
            CompressionError: not such a file.
        """
        try:
            loaded = _safetensors_load(data)
            meta = _metadata(data)
            round_number = int(meta["round"])
        except Exception as exc:
            raise CompressionError(f"not an error-feedback state: {exc}") from exc
        state = cls(round=round_number)
        for key, value in loaded.items():
            side, _, name = key.partition("/")
            if side == "before":
                state.before[name] = value
            elif side == "after":
                state.after[name] = value
            else:
                raise CompressionError(f"not an error-feedback state: tensor {key!r}")
        return state, meta


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes."""
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + length])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


@dataclass(frozen=True)
class CompressedUpdate:
    """What :func:`compress_update` built: the wire tensors and the residual left unsent."""

    tensors: dict[str, torch.Tensor]
    residual: dict[str, torch.Tensor]
    sent_norm: float  # L2 of the change the server will reconstruct (floating tensors)


def compress_update(
    local: Mapping[str, torch.Tensor],
    global_: Mapping[str, torch.Tensor],
    spec: CompressionSpec,
    *,
    residual: Mapping[str, torch.Tensor] | None = None,
    max_norm: float | None = None,
    rng: np.random.Generator | None = None,
) -> CompressedUpdate:
    """Build the wire tensors of a trained model's update.

    Args:
        local: the trained weights.
        global_: the global weights the task carried (same names, dtypes, shapes).
        spec: a compressed method.
        residual: top-k only: what previous rounds left unsent (error feedback); added to this
            round's change before selecting. Ignored (and none returned) by other methods.
        max_norm: top-k only: the plan's norm bound. The sent change is scaled down to just
            under it when larger, the excess kept in the residual, so an honest site whose
            accumulated change grew is never refused for it.
        rng: int8's rounding noise; None: the OS.

    Returns:
        The wire tensors (integer buffers as their local value), the new residual (top-k; empty
        otherwise) and the norm of the change sent.

    Raises:
        CompressionError: names that differ, a non-finite change, float16 overflow.
    """
    if set(local) != set(global_):
        raise LayoutMismatch("the trained model's tensors differ from the global model's")
    delta: dict[str, torch.Tensor] = {}
    for name, _, _ in _layout(global_):
        change = local[name].detach().to(torch.float64) - global_[name].detach().to(torch.float64)
        delta[name] = change.to(torch.float32)
    new_residual: dict[str, torch.Tensor] = {}
    if spec.method == "topk":
        if residual:
            for name, value in delta.items():
                kept = residual.get(name)
                if kept is not None and kept.shape == value.shape:
                    delta[name] = value + kept.to(torch.float32)
        wire = encode_delta(delta, spec, rng=rng)
        layout = _layout(delta)
        norm = float(wire[TOPK_VALUES_KEY].to(torch.float64).norm())
        if max_norm is not None and norm > max_norm:
            wire[TOPK_VALUES_KEY] = wire[TOPK_VALUES_KEY] * (max_norm * (1 - 1e-3) / norm)
            norm = float(wire[TOPK_VALUES_KEY].to(torch.float64).norm())
        sent = torch.zeros(_size(layout), dtype=torch.float32)
        sent[wire[TOPK_INDICES_KEY].to(torch.int64)] = wire[TOPK_VALUES_KEY]
        new_residual = {n: delta[n] - v for n, v in _unflatten(sent, layout).items()}
    else:
        wire = encode_delta(delta, spec, rng=rng)
        others = {n: local[n] for n in global_ if not global_[n].is_floating_point()}
        decoded = decode_delta(wire | others, spec, global_)[0]
        norm = math.sqrt(sum(float(t.to(torch.float64).pow(2).sum()) for t in decoded.values()))
    for name in global_:
        if not global_[name].is_floating_point():
            wire[name] = local[name].detach().to("cpu").contiguous()
    return CompressedUpdate(tensors=wire, residual=new_residual, sent_norm=norm)
