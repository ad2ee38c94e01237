"""State dicts <-> bytes (safetensors), checksums and compatibility checks.

Model weights travel between the server and the agents as safetensors bytes: a JSON header and raw
little-endian tensor data, so decoding never executes code (never pickle, never ``torch.load``).
"""

import hashlib
from collections.abc import Mapping

import torch
from safetensors.torch import load as _safetensors_load
from safetensors.torch import save as _safetensors_save

__all__ = [
    "IncompatibleStateDict",
    "StateDict",
    "TensorCodecError",
    "check_compatible",
    "decode_state_dict",
    "encode_state_dict",
    "first_non_finite",
    "sha256_hex",
    "signature",
]

StateDict = dict[str, torch.Tensor]
# name -> (dtype name such as "float32", shape)
Signature = dict[str, tuple[str, tuple[int, ...]]]


class TensorCodecError(ValueError):
    """Bytes are not a valid safetensors state dict, or a state dict cannot be encoded."""


class IncompatibleStateDict(ValueError):
    """A state dict does not match the reference: the message names the tensor and the problem."""


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _shape_text(shape: tuple[int, ...]) -> str:
    return repr(tuple(shape))


def encode_state_dict(state: Mapping[str, torch.Tensor]) -> bytes:
    """Serialise a state dict to deterministic safetensors bytes.

    Args:
        state: tensor name -> tensor. Tensors may live on any device, require grad, be
            non-contiguous or share storage with each other: each is detached, moved to the CPU
            and made contiguous, and tensors sharing storage are cloned (safetensors refuses
            shared storage). Dtypes and shapes are preserved exactly.

    Returns:
        safetensors bytes with the keys in sorted order and no metadata, so equal state dicts
        always give identical bytes (and identical sha256).

    Raises:
        TypeError: a key is not a ``str`` or a value is not a ``torch.Tensor``.
        TensorCodecError: a tensor cannot be stored (sparse layout, unsupported dtype).
    """
    prepared: StateDict = {}
    seen_storages: set[int] = set()
    for name in sorted(state, key=_sort_key):
        tensor = state[name]
        if not isinstance(name, str):
            raise TypeError(f"state dict key {name!r} is {type(name).__name__}, expected str")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(
                f"tensor {name!r} is {type(tensor).__name__}, expected torch.Tensor; "
                "pass model.state_dict() or a dict of tensors"
            )
        if tensor.layout != torch.strided:
            raise TensorCodecError(
                f"tensor {name!r} has layout {tensor.layout}; convert it with .to_dense() first"
            )
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.numel() > 0:
            storage = tensor.untyped_storage().data_ptr()
            if storage in seen_storages:
                tensor = tensor.clone()
            else:
                seen_storages.add(storage)
        prepared[name] = tensor
    try:
        return _safetensors_save(prepared)
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise TensorCodecError(f"cannot encode state dict as safetensors: {exc}") from exc


def _sort_key(name: object) -> str:
    # Sorting must not fail on a bad key before the loop can report it with a clear message.
    return name if isinstance(name, str) else repr(name)


def decode_state_dict(data: bytes) -> StateDict:
    """Parse safetensors bytes into a state dict of CPU tensors, keys in sorted order.

    Args:
        data: safetensors bytes, typically a received ``task`` or ``update`` payload.

    Returns:
        tensor name -> tensor (CPU, contiguous, writable; dtype and shape as stored).

    Raises:
        TensorCodecError: the bytes are not a valid safetensors file ("not a valid safetensors
            state dict: ..." followed by the parser's reason).
    """
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise TensorCodecError(
            f"not a valid safetensors state dict: expected bytes, got {type(data).__name__}"
        )
    try:
        loaded = _safetensors_load(data)
    except Exception as exc:  # the parser raises SafetensorError, KeyError (dtype), ...
        raise TensorCodecError(f"not a valid safetensors state dict: {exc}") from exc
    return {name: loaded[name] for name in sorted(loaded)}


def sha256_hex(data: bytes) -> str:
    """Return the lowercase hex SHA-256 digest of ``data``.

    Args:
        data: the bytes to hash (bytes, bytearray or memoryview).
    """
    return hashlib.sha256(data).hexdigest()


def signature(state: Mapping[str, torch.Tensor]) -> Signature:
    """Return name -> (dtype name, shape) for every tensor, keys in sorted order.

    Args:
        state: tensor name -> tensor.

    Returns:
        e.g. ``{"fc1.weight": ("float32", (4, 4))}``. JSON-able after turning shapes into lists.
    """
    return {
        name: (_dtype_name(state[name].dtype), tuple(int(n) for n in state[name].shape))
        for name in sorted(state)
    }


def _as_signature(state: Mapping[str, object]) -> Signature:
    """Accept either a state dict or a signature already computed by :func:`signature`."""
    result: Signature = {}
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            result[name] = (_dtype_name(value.dtype), tuple(int(n) for n in value.shape))
        elif isinstance(value, tuple | list) and len(value) == 2:
            result[name] = (str(value[0]), tuple(int(n) for n in value[1]))
        else:
            raise TypeError(
                f"tensor {name!r}: expected a torch.Tensor or a (dtype, shape) pair, "
                f"got {type(value).__name__}"
            )
    return result


def check_compatible(
    update: Mapping[str, torch.Tensor] | Signature,
    reference: Mapping[str, torch.Tensor] | Signature,
) -> None:
    """Raise IncompatibleStateDict unless ``update`` has the same keys, shapes and dtypes.

    Args:
        update: the state dict to check (e.g. a decoded site update), or its signature.
        reference: the state dict it must match (e.g. the global model of the round), or its
            :func:`signature`.

    Raises:
        IncompatibleStateDict: the message names the first problem in sorted key order, e.g.
            "tensor 'fc1.weight': shape (3, 4), expected (4, 4)", and counts any further ones.
    """
    got = _as_signature(update)
    expected = _as_signature(reference)
    problems: list[str] = []
    for name in sorted(expected.keys() - got.keys()):
        dtype, shape = expected[name]
        problems.append(f"tensor {name!r}: missing, expected {dtype} {_shape_text(shape)}")
    for name in sorted(got.keys() - expected.keys()):
        problems.append(f"tensor {name!r}: unexpected, the reference has no such tensor")
    for name in sorted(got.keys() & expected.keys()):
        (got_dtype, got_shape), (want_dtype, want_shape) = got[name], expected[name]
        if got_shape != want_shape:
            problems.append(
                f"tensor {name!r}: shape {_shape_text(got_shape)}, "
                f"expected {_shape_text(want_shape)}"
            )
        if got_dtype != want_dtype:
            problems.append(f"tensor {name!r}: dtype {got_dtype}, expected {want_dtype}")
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise IncompatibleStateDict(problems[0] + more)


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """Return the name of the first floating tensor (sorted key order) holding NaN or Inf.

    Args:
        state: tensor name -> tensor. Integer and bool tensors are always finite and skipped.

    Returns:
        the tensor name, or None when every floating tensor is finite.
    """
    for name in sorted(state):
        tensor = state[name]
        if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel() > 0:
            if not bool(torch.isfinite(tensor).all()):
                return name
    return None
