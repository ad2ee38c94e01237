"""Model updates as secure-aggregation vectors, and the round's mean back from their sum.

Both sides of a secure round use this module, so the layout cannot drift between them.

Layout: the update is the change of the model's *floating* tensors, ``delta = local - global``,
flattened in sorted tensor-name order (``fedcore.aggregation.base.floating_names``), followed by
one extra coordinate, the contribution's weight. Integer tensors (buffers such as BatchNorm's
``num_batches_tracked``) are not in the vector: the new model keeps the global model's values.
So ``P = sum(numel of floating tensors) + 1``.

Two encodings:

- **weighted** (plans without client-level DP): FedAvg's example weighting. With
  ``w = min(n_k, max_examples) / max_examples`` the site sends
  ``[w * clip(delta, -c, c), w * c]``: every coordinate lies in ``[-c, c]``, the quantiser's
  range. The server divides the unmasked sum by ``sum(w_k)``, computed from the contributors'
  example counts (sent in clear, as for ordinary updates), and checks it against the sum of the
  weight coordinates. The result is the example-weighted mean of the per-coordinate clipped
  deltas, i.e. plain FedAvg whenever no coordinate was clipped and no site has more than
  ``max_examples`` training rows. Quantisation error of one coordinate of the mean is at most
  ``m * c * max_examples / (L * sum(n_k))`` for m contributors (``L`` the quantiser's levels).
- **client DP** (plans with ``privacy.mode = "client"``, DP-FedAvg with distributed noise): the
  site clips its delta to L2 norm ``C`` (``privacy.clip``) and adds its share of the Gaussian
  noise, ``N(0, (z C)^2 / t)`` per coordinate (``fedcore.privacy.client_dp.DistributedNoise``
  with the round's threshold t), then sends ``[clipped + share, q]`` with ``q`` the quantiser's
  range: the weight coordinate counts contributors. The server divides the sum by the number
  of silos selected for the round (the fixed denominator of DP-FedAvg) and adds no noise. The
  quantiser range is ``C (1 + 10 z / sqrt(t))`` (:func:`dp_quantiser_clip`), so a coordinate is
  clipped only beyond ten standard deviations of the noise share.

Fairness counts (plans with a ``fairness`` section): the masked vector ends with ``K`` integer
coordinates, the site's per-group confusion counts of the global model it received, in the
layout :func:`count_layout` derives from the public group lists (``fedcore.fairness.
public_groups`` of the plan and the run's preprocessing, which every site and the server know):
attributes sorted, then groups sorted, then the cells ``tp, fp, tn, fn``. They are added in the
ring as they are (``SecAggConfig.count_length``), so the unmasked sum is the exact merged table
and no site's own table ever reaches the server.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedcore.aggregation.base import floating_names
from fedcore.fairness import CELLS

__all__ = [
    "DEFAULT_CLIP",
    "DEFAULT_MAX_EXAMPLES",
    "EncodedUpdate",
    "count_layout",
    "counts_from_tail",
    "counts_to_tail",
    "dp_quantiser_clip",
    "dp_vector",
    "example_weight",
    "mean_state",
    "vector_length",
    "weighted_vector",
]

DP_RANGE_SIGMAS = 10.0
# Defaults of a plan's "secagg" section that both sides need (fedcore.plan documents all).
DEFAULT_CLIP = 1.0
DEFAULT_MAX_EXAMPLES = 1_000_000


@dataclass(frozen=True)
class EncodedUpdate:
    """A site's vector for the masked-input stage.

    Attributes:
        vector: P float64 values, within the quantiser's range unless ``clipped`` says otherwise.
        clipped: coordinates the quantiser will clip (outside its range); logged by the site.
        norm: L2 norm of the delta before clipping (client-DP encoding only, else None).
    """

    vector: np.ndarray
    clipped: int
    norm: float | None = None


def vector_length(state: Mapping[str, torch.Tensor]) -> int:
    """P: the floating parameters of a model plus the weight coordinate."""
    return sum(int(state[name].numel()) for name in floating_names(state)) + 1


def example_weight(num_examples: int, max_examples: int) -> float:
    """A contribution's weight in the weighted encoding: ``min(n, max_examples) / max_examples``."""
    if num_examples < 1 or max_examples < 1:
        raise ValueError("num_examples and max_examples must be >= 1")
    return min(num_examples, max_examples) / max_examples


def _delta(
    local: Mapping[str, torch.Tensor], global_state: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    names = floating_names(global_state)
    if floating_names(local) != names:
        raise ValueError("the local model's floating tensors differ from the global model's")
    delta = {}
    for name in names:
        if tuple(local[name].shape) != tuple(global_state[name].shape):
            raise ValueError(f"tensor {name!r}: shape differs from the global model's")
        delta[name] = local[name].detach().to("cpu", torch.float64) - global_state[
            name
        ].detach().to("cpu", torch.float64)
    return delta


def _flat(delta: Mapping[str, torch.Tensor]) -> np.ndarray:
    if not delta:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([delta[name].reshape(-1).numpy() for name in sorted(delta)])


def weighted_vector(
    local: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    *,
    num_examples: int,
    clip: float,
    max_examples: int,
) -> EncodedUpdate:
    """The weighted encoding ``[w * clip(delta, -c, c), w * c]`` (see the module docstring).

    Raises:
        ValueError: the models do not match, or a value is not finite.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError("clip must be a finite number > 0")
    flat = _flat(_delta(local, global_state))
    if not np.all(np.isfinite(flat)):
        raise ValueError("the update holds NaN or Inf")
    weight = example_weight(num_examples, max_examples)
    clipped = int(np.count_nonzero(np.abs(flat) > clip))
    vector = np.empty(flat.size + 1, dtype=np.float64)
    vector[:-1] = weight * np.clip(flat, -clip, clip)
    vector[-1] = weight * clip
    return EncodedUpdate(vector=vector, clipped=clipped)


def dp_quantiser_clip(clip: float, noise_multiplier: float, threshold: int) -> float:
    """Quantiser range of the client-DP encoding: ``C (1 + 10 z / sqrt(t))``."""
    return float(clip) * (1.0 + DP_RANGE_SIGMAS * float(noise_multiplier) / math.sqrt(threshold))


def dp_vector(
    local: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    *,
    clip: float,
    noise_multiplier: float,
    threshold: int,
    source: object | None = None,
) -> EncodedUpdate:
    """The client-DP encoding: L2-clipped delta plus this site's noise share, then ``q``.

    Args:
        local, global_state: the trained and the round's global weights.
        clip: C, the plan's ``privacy.clip``.
        noise_multiplier: z, the plan's (as the server's DP-FedAvg would use).
        threshold: t, the round's secure-aggregation threshold: each share has std ``z C / sqrt(t)``
            so that t contributions carry the full ``z C``.
        source: a ``fedcore.privacy.client_dp.NoiseSource`` (default: a fresh one, keyed from
            the OS; pass one only in tests).
    """
    from fedcore.privacy.client_dp import DistributedNoise, NoiseSource, clip_update

    delta = _delta(local, global_state)
    clipped_delta, norm = clip_update(delta, clip)
    flat = _flat(clipped_delta)
    noise = DistributedNoise(total_std=noise_multiplier * clip, threshold=threshold)
    share = noise.share(
        {"vector": (flat.size,)},
        source if source is not None else NoiseSource(),
        dtype=torch.float64,
    )["vector"]
    noised = flat + share.numpy()
    limit = dp_quantiser_clip(clip, noise_multiplier, threshold)
    vector = np.empty(flat.size + 1, dtype=np.float64)
    vector[:-1] = noised
    vector[-1] = limit
    clipped = int(np.count_nonzero(np.abs(noised) > limit))
    return EncodedUpdate(vector=vector, clipped=clipped, norm=float(norm))


def mean_state(
    total: np.ndarray, global_state: Mapping[str, torch.Tensor], *, denominator: float
) -> dict[str, torch.Tensor]:
    """The new global weights: ``global + total[:-1] / denominator`` on the floating tensors.

    Integer tensors keep the global model's values; dtypes and shapes are the global model's.

    Raises:
        ValueError: the sum has the wrong length, or the denominator is not > 0.
    """
    if not (math.isfinite(denominator) and denominator > 0):
        raise ValueError(f"the mean's denominator must be > 0, got {denominator!r}")
    total = np.asarray(total, dtype=np.float64)
    if total.size != vector_length(global_state):
        raise ValueError(
            f"the unmasked sum has {total.size} values, the model needs "
            f"{vector_length(global_state)}"
        )
    state: dict[str, torch.Tensor] = {}
    offset = 0
    floating = set(floating_names(global_state))
    for name in sorted(global_state):
        value = global_state[name]
        if name not in floating:
            state[name] = value.detach().clone()
            continue
        size = int(value.numel())
        delta = torch.from_numpy(total[offset : offset + size] / denominator).reshape(value.shape)
        state[name] = (value.detach().to(torch.float64) + delta).to(value.dtype)
        offset += size
    return {name: state[name] for name in global_state}


CountLayout = tuple[tuple[str, str, str], ...]


def count_layout(groups: Mapping[str, Sequence[str]]) -> CountLayout:
    """Where each fairness count sits in the vector's tail: (attribute, group, cell) in order.

    ``groups`` is the public group list per reported attribute (``fairness.public_groups``);
    attributes and groups are sorted here, cells follow ``fedcore.fairness.CELLS``.
    """
    return tuple(
        (str(attribute), str(group), cell)
        for attribute in sorted(groups)
        for group in sorted(str(g) for g in groups[attribute])
        for cell in CELLS
    )


def counts_to_tail(
    counts: Mapping[str, Mapping[str, Mapping[str, int]]], layout: CountLayout
) -> list[int]:
    """A site's count tables as the vector's tail, in ``layout`` order.

    Raises:
        ValueError: the tables do not cover exactly the layout's cells (another group list),
            or a count is not a non-negative integer.
    """
    have = {
        (str(a), str(g), str(c))
        for a, table in counts.items()
        for g, cells in table.items()
        for c in cells
    }
    if have != set(layout):
        missing = sorted(set(layout) - have)[:3]
        extra = sorted(have - set(layout))[:3]
        raise ValueError(
            f"the fairness counts do not match the round's count layout ({len(layout)} cells): "
            f"missing {missing}, unexpected {extra}"
        )
    tail = []
    for attribute, group, cell in layout:
        value = counts[attribute][group][cell]
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
            raise ValueError(f"fairness count {attribute}/{group}/{cell} = {value!r} is invalid")
        tail.append(int(value))
    return tail


def counts_from_tail(
    values: Sequence[int] | np.ndarray, layout: CountLayout
) -> dict[str, dict[str, dict[str, int]]]:
    """The merged count tables from the unmasked sum's tail (``{attribute: {group: cells}}``)."""
    if len(values) != len(layout):
        raise ValueError(f"{len(values)} counts for a layout of {len(layout)}")
    tables: dict[str, dict[str, dict[str, int]]] = {}
    for (attribute, group, cell), value in zip(layout, values, strict=True):
        tables.setdefault(attribute, {}).setdefault(group, {})[cell] = int(value)
    return tables
