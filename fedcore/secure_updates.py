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
from fedcore.secure_update_defaults import DEFAULT_CLIP, DEFAULT_MAX_EXAMPLES

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
    "fixed_limbs",
    "fixed_sum",
    "mean_state",
    "task_layout",
    "task_part_from_tail",
    "task_part_to_tail",
    "vector_length",
    "weighted_vector",
]

DP_RANGE_SIGMAS = 10.0


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


# -- a multi-class or regression round's task part, summed under the masks ----------------------
#
# A secure round of a multi-class or regression plan carries the received global model's part of
# the round's pooled metrics (fedcore.task_metrics) in the vector's tail, after the fairness
# counts, so the server learns only the merged part, exactly as an ordinary round pools the
# sites' clear ``task_part``s. Integer counts (the confusion matrix, the regression row count)
# ride as they are. Every real sum is written in fixed point with ``TASK_FRACTION_BITS``
# fractional bits, as a two's-complement integer of ``TASK_LIMBS * TASK_LIMB_BITS`` bits split
# into 16-bit limbs: each limb is at most 65,535 (below the quantiser's L for up to 65,537
# sites), the limbs' sums are exact, and the server recombines them into the exact sum of the
# sites' fixed-point values (each site's rounding at most 2^-33). A site refuses a sum whose
# magnitude reaches ``TASK_MAX_ABS``. Regression sends additive sums instead of Chan's
# moments: the targets centred on a public reference ``c`` (the standardised target's federated
# mean, else 0), ``sum(y - c)`` and ``sum((y - c)^2)``; the server rebuilds count, mean and the
# sum of squared deviations in exact rational arithmetic.

TASK_ATTRIBUTE = "__task__"
TASK_FRACTION_BITS = 32
TASK_LIMB_BITS = 16
TASK_LIMBS = 8
TASK_MAX_ABS = 2.0**60
_REGRESSION_SUMS = ("sum_y", "sum_y2", "sum_sq_error", "sum_abs_error", "sum_error")


def task_layout(task: str, n_classes: int | None = None, bins: int | None = None) -> CountLayout:
    """The task part's cells in the vector's tail, ``(TASK_ATTRIBUTE, field, cell)`` in order;
    empty for a binary plan. ``bins``: a multi-class part's one-vs-rest histograms' grid
    (``fedcore.task_metrics.round_bins``), None for none."""
    limbs = tuple(f"limb{i}" for i in range(TASK_LIMBS))
    if task == "multiclass":
        if not isinstance(n_classes, int) or n_classes < 2:
            raise ValueError("a multi-class task layout needs the number of classes (>= 2)")
        cells = [
            (TASK_ATTRIBUTE, f"confusion.{i}.{j}", "count")
            for i in range(n_classes)
            for j in range(n_classes)
        ]
        histograms = [
            (TASK_ATTRIBUTE, f"hist.{k}.{side}", str(b))
            for k in range(n_classes)
            for side in ("positives", "negatives")
            for b in range(bins or 0)
        ]
        return (*cells, *((TASK_ATTRIBUTE, "loss_sum", limb) for limb in limbs), *histograms)
    if task == "regression":
        sums = ((TASK_ATTRIBUTE, name, limb) for name in _REGRESSION_SUMS for limb in limbs)
        return ((TASK_ATTRIBUTE, "count", "count"), *sums)
    return ()


def fixed_limbs(
    value: float | int, where: str, *, fraction_bits: int = TASK_FRACTION_BITS
) -> list[int]:
    """One value in fixed point with ``fraction_bits`` fractional bits (0: an integer, exact),
    as the ``TASK_LIMBS`` 16-bit limbs of its 128-bit two's complement, low limb first.

    Raises:
        ValueError: a value that is not finite or whose magnitude reaches ``TASK_MAX_ABS``.
    """
    if not math.isfinite(value) or abs(value) >= TASK_MAX_ABS:
        raise ValueError(f"{where} = {value!r} cannot be summed securely")
    modulus = 1 << (TASK_LIMB_BITS * TASK_LIMBS)
    if isinstance(value, int | np.integer):
        scaled = int(value) << fraction_bits
    else:
        scaled = round(value * (1 << fraction_bits))
    fixed = scaled % modulus  # two's complement
    mask = (1 << TASK_LIMB_BITS) - 1
    return [(fixed >> (TASK_LIMB_BITS * i)) & mask for i in range(TASK_LIMBS)]


def fixed_sum(
    limb_sums: Sequence[int], *, fraction_bits: int = TASK_FRACTION_BITS
) -> tuple[int, int]:
    """The exact sum of the sites' fixed-point values from the sums of their limbs
    (:func:`fixed_limbs`): (numerator, denominator 2^F)."""
    bits = TASK_LIMB_BITS * TASK_LIMBS
    total = sum(int(s) << (TASK_LIMB_BITS * i) for i, s in enumerate(limb_sums)) % (1 << bits)
    if total >= 1 << (bits - 1):
        total -= 1 << bits
    return total, 1 << fraction_bits


def task_part_to_tail(
    part: Mapping[str, object], task: str, layout: CountLayout, *, center: float = 0.0
) -> list[int]:
    """A site's task part (``fedcore.task_metrics.multiclass_part`` without histograms, or
    ``regression_part``) as the tail cells of ``layout`` (:func:`task_layout`).

    Raises:
        ValueError: the part does not fit the layout, or a sum is not finite or too large.
    """
    values: dict[tuple[str, str], int] = {}
    if task == "multiclass":
        confusion = part["confusion"]
        assert isinstance(confusion, Sequence)
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                values[(f"confusion.{i}.{j}", "count")] = int(count)
        for k, sides in enumerate(part.get("histograms") or ()):  # type: ignore[attr-defined]
            for side in ("positives", "negatives"):
                for b, count in enumerate(sides[side]):
                    values[(f"hist.{k}.{side}", str(b))] = int(count)
        sums = {"loss_sum": float(part["loss_sum"])}  # type: ignore[arg-type]
    elif task == "regression":
        count = int(part["count"])  # type: ignore[call-overload]
        shift = float(part["mean"]) - center  # type: ignore[arg-type]
        values[("count", "count")] = count
        sums = {
            "sum_y": count * shift,
            "sum_y2": float(part["m2"]) + count * shift * shift,  # type: ignore[arg-type]
            **{
                key: float(part[key])  # type: ignore[arg-type]
                for key in ("sum_sq_error", "sum_abs_error", "sum_error")
            },
        }
    else:
        raise ValueError(f"a {task!r} plan has no task part")
    for name, value in sums.items():
        for i, limb in enumerate(fixed_limbs(value, f"task part {name}")):
            values[(name, f"limb{i}")] = limb
    cells = [(group, cell) for _, group, cell in layout]
    if set(cells) != set(values) or len(cells) != len(values):
        raise ValueError(
            f"the task part does not match the round's layout ({len(layout)} cells, "
            f"the part gives {len(values)})"
        )
    return [values[cell] for cell in cells]


def task_part_from_tail(
    values: Sequence[int] | np.ndarray,
    task: str,
    layout: CountLayout,
    *,
    center: float = 0.0,
) -> dict[str, object]:
    """The merged task part from the unmasked sum of the tail cells, in the form
    ``fedcore.task_metrics.merge_multiclass`` / ``merge_regression`` return."""
    from fractions import Fraction

    if len(values) != len(layout):
        raise ValueError(f"{len(values)} values for a task layout of {len(layout)}")
    by_field: dict[str, dict[str, int]] = {}
    for (_, name, cell), value in zip(layout, values, strict=True):
        by_field.setdefault(name, {})[cell] = int(value)

    def fixed(name: str) -> Fraction:
        cells = by_field[name]
        numerator, denominator = fixed_sum([cells[f"limb{i}"] for i in range(TASK_LIMBS)])
        return Fraction(numerator, denominator)

    if task == "multiclass":
        k = math.isqrt(sum(1 for name in by_field if name.startswith("confusion.")))
        confusion = [[by_field[f"confusion.{i}.{j}"]["count"] for j in range(k)] for i in range(k)]
        bins = len(by_field.get("hist.0.positives", {})) or None
        histograms = None
        if bins:
            histograms = [
                {
                    side: [by_field[f"hist.{c}.{side}"][str(b)] for b in range(bins)]
                    for side in ("positives", "negatives")
                }
                for c in range(k)
            ]
        return {
            "classes": k,
            "confusion": confusion,
            "loss_sum": float(fixed("loss_sum")),
            "bins": bins,
            "histograms": histograms,
        }
    count = by_field["count"]["count"]
    s1, s2 = fixed("sum_y"), fixed("sum_y2")
    mean = Fraction(center) + s1 / count if count else Fraction(0)
    m2 = s2 - s1 * s1 / count if count else Fraction(0)
    return {
        "count": count,
        "mean": float(mean),
        "m2": max(0.0, float(m2)),
        **{key: float(fixed(key)) for key in ("sum_sq_error", "sum_abs_error", "sum_error")},
    }
