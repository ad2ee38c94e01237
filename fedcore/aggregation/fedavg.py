"""Federated averaging (McMahan et al., 2017) as a streaming weighted mean.

Memory is one accumulator plus the update being added, whatever the number of sites: updates are
consumed one at a time from any iterable (a generator reading blobs from storage, say) and never
collected into a list. The accumulator is a running weighted mean (West, 1979):
``mean += (w_k / W_k) * (x_k - mean)`` with ``W_k`` the sum of the weights so far, which equals
``sum(w_i * x_i) / sum(w_i)`` (weights normalised by their sum) while keeping values at the
scale of the parameters, and returns identical updates bit for bit.

Dtypes: float16 and bfloat16 are accumulated in float32 (their 10 and 7 bit mantissas would
lose most of the small per-update increments), float32 in float32, float64 in float64, and
the result is cast back to the input dtype.

Integer and bool tensors are not averaged: the result holds their element-wise maximum. Such
tensors are buffers, not trainable parameters; the typical one is BatchNorm's
``num_batches_tracked`` counter, where a weighted mean gives a fractional count that integer
truncation turns into garbage, while the maximum is a count some site actually reached.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch

from fedcore.tensors import IncompatibleStateDict, check_compatible, first_non_finite, signature

__all__ = ["StreamingFedAvg", "fedavg"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _LOW_PRECISION else dtype


class StreamingFedAvg:
    """Running weighted mean of state dicts; holds one accumulator, never the updates."""

    def __init__(self) -> None:
        """Start an empty aggregation."""
        self._signature: dict[str, tuple[str, tuple[int, ...]]] | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._accumulator: dict[str, torch.Tensor] = {}
        self._total_weight = 0.0
        self._count = 0

    @property
    def count(self) -> int:
        """Number of updates added so far."""
        return self._count

    @property
    def total_weight(self) -> float:
        """Sum of the weights of the updates added so far."""
        return self._total_weight

    def add(self, state: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold one update into the running mean; a refused update leaves the mean unchanged.

        Args:
            state: tensor name -> tensor (full weights, same keys, shapes and dtypes as every
                other update). Not modified and not retained.
            weight: the update's weight, typically its number of training examples; a finite
                number > 0.

        Raises:
            ValueError: the weight is not a finite number > 0, a value is not a tensor, a tensor
                has an unsupported dtype (complex) or holds NaN/Inf.
            IncompatibleStateDict: keys, shapes or dtypes differ from the first update.
        """
        where = f"update #{self._count}"
        weight = _check_weight(weight, where)
        if not isinstance(state, Mapping):
            raise ValueError(
                f"{where}: expected a mapping of tensor name -> tensor, got {type(state).__name__}"
            )
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(
                    f"{where}: tensor {name!r} is {type(tensor).__name__}, expected torch.Tensor"
                )
            if tensor.is_complex():
                raise ValueError(
                    f"{where}: tensor {name!r} has dtype {tensor.dtype}; fedavg supports real "
                    "floating, integer and bool tensors"
                )
        if self._signature is None:
            reference = signature(state)
        else:
            reference = self._signature
            try:
                check_compatible(state, reference)
            except IncompatibleStateDict as exc:
                raise IncompatibleStateDict(
                    f"{where} does not match update #0: {exc}; every site must send the full "
                    "state dict of the plan's model"
                ) from exc
        bad = first_non_finite(state)
        if bad is not None:
            raise ValueError(f"{where}: tensor {bad!r} holds NaN or Inf; refuse this update")

        self._total_weight += weight
        fraction = weight / self._total_weight
        for name, tensor in state.items():
            tensor = tensor.detach()
            if self._signature is None:
                self._dtypes[name] = tensor.dtype
                acc_dtype = _accumulator_dtype(tensor.dtype)
                # copy=True: the accumulator is updated in place and must not alias the caller's.
                self._accumulator[name] = tensor.to(device="cpu", dtype=acc_dtype, copy=True)
                continue
            acc = self._accumulator[name]
            if acc.is_floating_point():
                acc.lerp_(tensor.to(device="cpu", dtype=acc.dtype), fraction)
            else:
                torch.maximum(acc, tensor.to(device="cpu"), out=acc)
        if self._signature is None:
            self._signature = reference
        self._count += 1

    def result(self) -> dict[str, torch.Tensor]:
        """Return the weighted mean as new tensors in the input dtypes (first update's key order).

        Raises:
            ValueError: no update was added.
        """
        if self._count == 0:
            raise ValueError("fedavg needs at least one update; none was added")
        return {
            name: acc.to(dtype=self._dtypes[name], copy=True)
            for name, acc in self._accumulator.items()
        }


def _check_weight(weight: object, where: str) -> float:
    if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
        raise ValueError(
            f"{where}: weight {weight!r} is not a number; pass the update's example count"
        )
    value = float(weight)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(
            f"{where}: weight {weight!r} must be finite and > 0; an update without examples "
            "must not be aggregated"
        )
    return value


def fedavg(
    updates: Iterable[tuple[Mapping[str, torch.Tensor], float]],
) -> dict[str, torch.Tensor]:
    """Return the weighted mean of the updates, consuming them one at a time.

    Args:
        updates: iterable of ``(state_dict, weight)`` pairs; weights are typically example counts
            and are normalised by their sum. A generator is consumed lazily, so only one update
            needs to be in memory at a time.

    Returns:
        tensor name -> averaged tensor, same dtypes and shapes as the inputs (integer and bool
        tensors: element-wise maximum).

    Raises:
        ValueError: no updates, a weight is not finite or <= 0, an item is not a pair, or an
            update holds NaN/Inf. Messages name the 0-based update index and the tensor.
        IncompatibleStateDict: keys, shapes or dtypes differ between updates.
    """
    aggregator = StreamingFedAvg()
    for index, item in enumerate(updates):
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise ValueError(f"update #{index}: expected a (state_dict, weight) pair")
        state, weight = item
        # Drop the reference before pulling the next item so at most the current update stays
        # alive while the generator builds the next one.
        del item
        aggregator.add(state, weight)
        del state
    if aggregator.count == 0:
        raise ValueError("fedavg needs at least one update; the iterable was empty")
    return aggregator.result()
