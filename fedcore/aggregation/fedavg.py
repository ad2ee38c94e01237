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

Speed and memory (``bench/aggregation.py``). Aggregation is bound by memory bandwidth, so the
work is arranged to read each update once: :func:`fedavg` checks finiteness and blends chunk by
chunk while the chunk is in cache (:func:`fedcore.aggregation._kernels.blend_`), and hands its
accumulator over as the result instead of copying it. Peak extra memory is one model (the
accumulator) plus a few MiB of chunk buffers, whatever the number of updates.
:meth:`StreamingFedAvg.add` promises that a refused update leaves the mean unchanged, so it
checks the whole update before blending (two passes over the update).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping

import torch

from fedcore.aggregation._kernels import blend_, empty, first_non_finite
from fedcore.tensors import IncompatibleStateDict, check_compatible, signature

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
        self._spent: str | None = None  # why this aggregator can no longer be used
        self._scratch: dict[torch.dtype, torch.Tensor] = {}  # chunk buffers, reused

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
        self._check_structure(state, where)
        bad = first_non_finite(state)
        if bad is not None:
            raise ValueError(f"{where}: tensor {bad!r} holds NaN or Inf; refuse this update")
        self._blend(state, weight, where, check=False)

    def _add_fused(
        self,
        state: Mapping[str, torch.Tensor],
        weight: float,
        where: str,
        *,
        reference: Mapping[str, torch.Tensor] | None = None,
        check: bool = True,
    ) -> float:
        """Validate and blend in one pass over the update; return its squared delta norm.

        Unlike :meth:`add`, an update found to hold NaN/Inf raises *after* part of it was
        blended: the aggregator is then unusable (later calls raise). For callers that abandon
        the whole aggregation on a bad update (:func:`fedavg`, the FedAvg strategy).

        Args:
            state: the update.
            weight: its weight, already validated.
            where: how messages name the update (``"update #3"``).
            reference: when given (the round's global model), the squared norm of
                ``update - reference`` over the floating tensors is returned (0.0 otherwise).
            check: False when the caller has already proved the update finite.
        """
        self._check_structure(state, where)
        return self._blend(state, weight, where, check=check, reference=reference)

    def _check_structure(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        """Raise unless ``state`` is a mapping of real tensors matching the first update."""
        if self._spent is not None:
            raise ValueError(f"{self._spent}; start a new aggregator")
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
        if self._signature is not None:
            try:
                check_compatible(state, self._signature)
            except IncompatibleStateDict as exc:
                raise IncompatibleStateDict(
                    f"{where} does not match update #0: {exc}; every site must send the full "
                    "state dict of the plan's model"
                ) from exc

    def _blend(
        self,
        state: Mapping[str, torch.Tensor],
        weight: float,
        where: str,
        *,
        check: bool,
        reference: Mapping[str, torch.Tensor] | None = None,
    ) -> float:
        """Fold a structurally valid update in, tensor by tensor in sorted name order."""
        first = self._signature is None
        total_weight = self._total_weight + weight
        fraction = 1.0 if first else weight / total_weight
        squared = 0.0
        # Sorted order, so the tensor a NaN is reported in is the one first_non_finite names.
        for name in sorted(state):
            tensor = state[name].detach()
            if first:
                self._dtypes[name] = tensor.dtype
                acc = empty(tuple(tensor.shape), _accumulator_dtype(tensor.dtype))
                self._accumulator[name] = acc
            acc = self._accumulator[name]
            if acc.is_floating_point():
                finite, part = blend_(
                    acc,
                    tensor,
                    fraction,
                    reference=None if reference is None else reference[name],
                    check=check,
                    cache=self._scratch,
                )
                if not finite:
                    self._spent = f"{where} was refused after part of it was blended"
                    raise ValueError(
                        f"{where}: tensor {name!r} holds NaN or Inf; refuse this update"
                    )
                squared += part
            elif first:
                acc.copy_(tensor)
            else:
                torch.maximum(acc, tensor.to(device="cpu"), out=acc)
        if first:
            # Key order of the result: the first update's.
            self._accumulator = {name: self._accumulator[name] for name in state}
            self._signature = signature(state)
        self._total_weight = total_weight
        self._count += 1
        return squared

    def result(self) -> dict[str, torch.Tensor]:
        """Return the weighted mean as new tensors in the input dtypes (first update's key order).

        Raises:
            ValueError: no update was added.
        """
        if self._count == 0:
            raise ValueError("fedavg needs at least one update; none was added")
        if self._spent is not None:
            raise ValueError(f"{self._spent}; start a new aggregator")
        return {
            name: acc.to(dtype=self._dtypes[name], copy=True)
            for name, acc in self._accumulator.items()
        }

    def _take_result(self) -> dict[str, torch.Tensor]:
        """Return the mean without copying the accumulator; the aggregator is spent afterwards.

        A float32/float64 accumulator already is the result; a float16/bfloat16 one is cast
        tensor by tensor, each accumulator released as soon as its cast exists, so the peak
        stays near one accumulator.
        """
        if self._count == 0:
            raise ValueError("fedavg needs at least one update; none was added")
        if self._spent is not None:
            raise ValueError(f"{self._spent}; start a new aggregator")
        result: dict[str, torch.Tensor] = {}
        for name in list(self._accumulator):
            acc = self._accumulator.pop(name)
            result[name] = acc if acc.dtype == self._dtypes[name] else acc.to(self._dtypes[name])
            del acc
        self._spent = "the result was taken"  # the accumulator now belongs to the caller
        self._scratch = {}
        return result


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
        where = f"update #{index}"
        aggregator._add_fused(state, _check_weight(weight, where), where)
        del state
    if aggregator.count == 0:
        raise ValueError("fedavg needs at least one update; the iterable was empty")
    return aggregator._take_result()
