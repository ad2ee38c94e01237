"""Chunked numeric kernels shared by the strategies: few passes over memory, O(chunk) temporaries.

Aggregation is bound by memory bandwidth: an update is read from RAM once per pass, so every
extra pass over it costs as much as the useful work. These kernels walk a tensor in chunks of
:data:`CHUNK` elements (1 MiB of float32) that stay in the CPU cache while several cheap
operations run on them -- a finiteness check, a delta norm, the blend into the running mean --
instead of one full-size temporary per operation.

Finiteness from a sum: a sum of finite numbers may overflow to infinity, but a sum that is
finite proves every term finite (NaN and Inf propagate through addition). The fast path sums
(one cache-friendly read, ~40 ps per float32 element); only a non-finite sum pays for an exact
``isfinite`` scan, which tells an overflow from a NaN or Inf. ``torch.isfinite(t).all()`` costs
about 35 times as much as the sum and allocates a bool tensor the size of ``t``.

Coordinate-wise order statistics (median, trimmed mean) of a small number of rows use a
sorting network (Batcher's odd-even merge sort, pruned to the ranks that are needed) applied to
whole rows with ``np.minimum``/``np.maximum``: every comparator is one vectorised pass over a
cache-resident block, where ``np.partition``/``np.sort`` along the short axis pay a per-column
call and a strided copy (20-40 times slower for 20 rows on the reference machine).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "CHUNK",
    "empty",
    "NETWORK_MAX_ROWS",
    "all_finite",
    "blend_",
    "copy_measure_",
    "delta_squared_norm",
    "first_non_finite",
    "order_rows",
    "row_block_width",
]

#: Elements per chunk: a chunk of an update, of the accumulator and of the global model
#: (float32: 1 MiB each) stay in L2/L3 cache between the operations that use them.
CHUNK = 1 << 18

#: Above this many rows the order statistics use ``np.partition`` (the network's
#: ``O(n log² n)`` comparators outgrow partition's ``O(n)`` per column).
NETWORK_MAX_ROWS = 256

#: Target size of one (rows x columns) block for the row-wise kernels: L2-sized.
_BLOCK_BYTES = 3 << 19


_NUMPY_DTYPES = {torch.float32: np.float32, torch.float64: np.float64}


def empty(shape: tuple[int, ...] | int, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor; float32/float64 ones backed by a numpy allocation.

    numpy asks the kernel for transparent huge pages on large allocations
    (``madvise(MADV_HUGEPAGE)``), torch's CPU allocator does not: filling a fresh 8 MiB buffer
    then costs 4 page faults instead of 2048, 0.9 ms instead of 9 ms on the reference machine
    (a KVM guest, where faults are dear). Aggregation allocates model-sized buffers (the
    accumulator, robust rules' stacked rows), so this is most of their allocation cost.
    """
    if dtype in _NUMPY_DTYPES:
        return torch.from_numpy(np.empty(shape, dtype=_NUMPY_DTYPES[dtype]))
    return torch.empty(shape, dtype=dtype)


def _flat_cpu(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as a 1-D CPU view (a copy only if it is elsewhere or not contiguous)."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.to("cpu")
    return tensor.reshape(-1)


def _sum_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunk_finite(chunk: torch.Tensor) -> bool:
    """True when every element of the chunk is finite: a sum first, exact check if needed."""
    if math.isfinite(float(chunk.sum(dtype=_sum_dtype(chunk.dtype)))):
        return True
    return bool(torch.isfinite(chunk).all())


def all_finite(tensor: torch.Tensor) -> bool:
    """True when a floating tensor holds no NaN or Inf (integer and bool tensors: always)."""
    if not (tensor.is_floating_point() or tensor.is_complex()) or tensor.numel() == 0:
        return True
    if tensor.is_complex():
        return bool(torch.isfinite(tensor).all())
    flat = _flat_cpu(tensor)
    return all(_chunk_finite(flat[i : i + CHUNK]) for i in range(0, flat.numel(), CHUNK))


def first_non_finite(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first tensor in sorted key order holding NaN or Inf, or None.

    Same contract as :func:`fedcore.tensors.first_non_finite`, without its full-size bool
    temporaries (see the module docstring).
    """
    for name in sorted(state):
        if not all_finite(state[name]):
            return name
    return None


def scratch(dtype: torch.dtype, cache: dict[torch.dtype, torch.Tensor] | None) -> torch.Tensor:
    """A CHUNK-element work buffer of ``dtype``, reused through ``cache`` when one is given.

    Reuse matters: a fresh buffer per tensor pays its page faults again on every update.
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    if cache is None:
        return torch.empty(CHUNK, dtype=work)
    if work not in cache:
        cache[work] = torch.empty(CHUNK, dtype=work)
    return cache[work]


def delta_squared_norm(
    update: torch.Tensor,
    reference: torch.Tensor,
    cache: dict[torch.dtype, torch.Tensor] | None = None,
) -> float:
    """``||update - reference||²`` over one floating tensor; ``nan`` if ``update`` is not finite.

    One pass over both tensors. float32 (and float16/bfloat16, upcast chunk by chunk) chunks
    are subtracted in float32 and their squares summed with torch's cascade summation; the
    chunk sums add up in float64: relative error about 1e-6, ample for anomaly scores and norm
    bounds. float64 tensors are computed in float64. A non-finite result is re-examined: NaN if
    ``update`` holds NaN/Inf, otherwise (squares overflowing float32) recomputed in float64.
    ``reference`` must be finite (the caller validates the global model once). ``cache`` keeps
    the work buffer between calls (see :func:`scratch`).
    """
    x, g = _flat_cpu(update), _flat_cpu(reference)
    buffer = scratch(x.dtype, cache)
    work = buffer.dtype
    total = 0.0
    for start in range(0, x.numel(), CHUNK):
        xc, gc = x[start : start + CHUNK], g[start : start + CHUNK]
        d = buffer[: xc.numel()]
        if xc.dtype == work and gc.dtype == work:
            torch.sub(xc, gc, out=d)
        else:
            d.copy_(xc)
            d.sub_(gc.to(work))
        total += float(d.square_().sum())
    if math.isfinite(total):
        return total
    if not all_finite(x):
        return math.nan
    return sum(  # finite values whose float32 squares overflowed: redo in float64
        float((x[i : i + CHUNK].double() - g[i : i + CHUNK].double()).square().sum())
        for i in range(0, x.numel(), CHUNK)
    )


def blend_(
    accumulator: torch.Tensor,
    update: torch.Tensor,
    fraction: float,
    *,
    reference: torch.Tensor | None = None,
    check: bool = True,
    cache: dict[torch.dtype, torch.Tensor] | None = None,
) -> tuple[bool, float]:
    """Fold one tensor into a running mean in place, chunk by chunk, in a single pass.

    ``accumulator += fraction * (update - accumulator)`` (``torch.lerp``; ``fraction == 1``
    copies ``update``), the update cast chunk-wise to the accumulator's dtype. With ``check``
    every chunk is proved finite (or the function returns at the first chunk that is not);
    with ``reference`` the squared delta norm ``||update - reference||²`` is accumulated from
    the same cache-resident chunks (and proves finiteness in passing). ``cache`` keeps the work
    buffer between calls (see :func:`scratch`).

    Returns:
        ``(finite, squared_norm)``; ``squared_norm`` is 0.0 without ``reference``. When
        ``finite`` is False the accumulator is partly updated and must be discarded: callers
        that must keep a valid mean after refusing an update check it before blending.
    """
    acc, x = accumulator.view(-1), _flat_cpu(update)
    g = None if reference is None else _flat_cpu(reference)
    cast = x.dtype != acc.dtype
    buffer = None if g is None else scratch(acc.dtype, cache)
    work = torch.float64 if acc.dtype == torch.float64 else torch.float32
    squared = 0.0
    for start in range(0, x.numel(), CHUNK):
        xc = x[start : start + CHUNK]
        if g is not None and buffer is not None:
            d = buffer[: xc.numel()]
            gc = g[start : start + CHUNK]
            if xc.dtype == work and gc.dtype == work:
                torch.sub(xc, gc, out=d)
            else:
                d.copy_(xc)
                d.sub_(gc.to(work))
            part = float(d.square_().sum())
            if not math.isfinite(part):
                if not _chunk_finite(xc):
                    return False, math.nan
                part = float((xc.double() - gc.double()).square().sum())
            squared += part
        elif check and not _chunk_finite(xc):
            return False, math.nan
        if cast:
            xc = xc.to(acc.dtype)
        ac = acc[start : start + CHUNK]
        if fraction >= 1.0:
            ac.copy_(xc)
        else:
            ac.lerp_(xc, fraction)
    return True, squared


def copy_measure_(
    target: torch.Tensor,
    update: torch.Tensor,
    reference: torch.Tensor | None = None,
    cache: dict[torch.dtype, torch.Tensor] | None = None,
) -> float:
    """Copy ``update`` into the 1-D ``target`` (casting) and, in the same pass, measure it.

    Returns ``||update - reference||²`` (as :func:`delta_squared_norm`; nan when ``update``
    holds NaN/Inf), or 0.0 without ``reference``. ``target`` is fully written either way.
    """
    x = _flat_cpu(update)
    g = None if reference is None else _flat_cpu(reference)
    buffer = None if g is None else scratch(target.dtype, cache)
    squared = 0.0
    for start in range(0, x.numel(), CHUNK):
        xc, tc = x[start : start + CHUNK], target[start : start + CHUNK]
        tc.copy_(xc)
        if g is None or buffer is None or math.isnan(squared):
            continue
        gc = g[start : start + CHUNK]
        d = buffer[: xc.numel()]
        if gc.dtype == d.dtype and tc.dtype == d.dtype:
            torch.sub(tc, gc, out=d)
        else:
            d.copy_(tc)
            d.sub_(gc.to(d.dtype))
        part = float(d.square_().sum())
        if not math.isfinite(part):
            if not _chunk_finite(xc):
                squared = math.nan
                continue
            part = float((xc.double() - gc.double()).square().sum())
        squared += part
    return squared


# ---------------------------------------------------------------------------------------------
# Order statistics of rows


@lru_cache(maxsize=64)
def _batcher_network(n: int) -> tuple[tuple[int, int], ...]:
    """Comparators (i < j) of Batcher's odd-even merge sort for ``n`` inputs.

    Built for the next power of two with the missing inputs taken as +inf: a comparator
    touching one of them never moves anything, so it is dropped.
    """
    size = 1
    while size < n:
        size *= 2
    comparators: list[tuple[int, int]] = []
    p = 1
    while p < size:
        k = p
        while k >= 1:
            for j in range(k % p, size - k, 2 * k):
                for i in range(min(k, size - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return tuple((a, b) for a, b in comparators if b < n)


@lru_cache(maxsize=256)
def _pruned_network(n: int, low: int, high: int) -> tuple[tuple[int, int], ...]:
    """The comparators of the n-input network that can influence output ranks [low, high)."""
    live = set(range(low, high))
    kept: list[tuple[int, int]] = []
    for a, b in reversed(_batcher_network(n)):
        if a in live or b in live:
            kept.append((a, b))
            live.update((a, b))
    return tuple(reversed(kept))


def row_block_width(rows: int, itemsize: int) -> int:
    """Columns per block so that ``rows x columns`` elements fill about an L2 cache."""
    width = _BLOCK_BYTES // max(1, rows * itemsize)
    return max(1024, width - width % 256)


def order_rows(block: np.ndarray, low: int, high: int) -> list[np.ndarray]:
    """Rows of ranks ``low .. high-1`` of every column of ``block`` (rows x columns).

    ``result[r - low][c]`` is the ``r``-th smallest value of column ``c``. ``block`` is used
    as scratch space and overwritten. Values must not be NaN.
    """
    n = block.shape[0]
    if n > NETWORK_MAX_ROWS:
        kth = sorted({low, high - 1})
        block = np.partition(block, kth, axis=0)
        if high - low > 2:  # the ranks between the two pivots are in place but unordered
            block[low:high] = np.sort(block[low:high], axis=0)
        return [block[r] for r in range(low, high)]
    rows = list(block)
    spare = np.empty_like(rows[0])
    for a, b in _pruned_network(n, low, high):
        ra, rb = rows[a], rows[b]
        np.minimum(ra, rb, out=spare)
        np.maximum(ra, rb, out=rb)
        rows[a], spare = spare, ra
    return rows[low:high]


def mean_of_rows(rows: Iterable[np.ndarray], count: int, dtype: np.dtype) -> np.ndarray:
    """Unweighted mean of ``count`` rows, cast to ``dtype``.

    float32 rows are summed in float64 and divided once: the sum of up to 2^29 float32 values
    in float64 is exact when they are equal, so identical rows give that row back exactly, and
    otherwise the result is correctly rounded to within an ulp. float64 rows use the running mean
    ``mean += (x_k - mean) / k`` (West, 1979), which has the same exactness property.
    """
    iterator = iter(rows)
    first = next(iterator)
    if np.dtype(dtype) == np.float64:
        mean = first.astype(np.float64, copy=True)
        for k, row in enumerate(iterator, start=2):
            mean += (row - mean) / k
        return mean
    total = first.astype(np.float64, copy=True)
    for row in iterator:
        total += row
    total /= count
    return total.astype(dtype)
