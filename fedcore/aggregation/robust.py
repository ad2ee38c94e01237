"""Byzantine-robust strategies: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Each needs every update of the round at once. The floating tensors of each update are flattened
(sorted tensor names, float32; float64 if the model has a float64 tensor) into one row of an
``n x P`` matrix; an update whose tensors already are contiguous CPU arrays of that dtype (a
decoded blob) is read in place, not copied. While that matrix fits in ``memory_budget_bytes``
its rows stay in RAM; as soon
as the next row would exceed the budget, the rows go to a file in a temporary directory (removed
afterwards), from which each column block is read with ``os.preadv`` into a block-sized array:
the file's pages stay in the kernel's page cache (reclaimable) instead of being mapped into the
process. Both paths run the same chunked code, so they give the same result.

The rules read the matrix in column blocks sized for the CPU cache (a few MiB, whatever the
budget). Median and trimmed mean sort each block's columns with a sorting network applied to
whole rows (:func:`fedcore.aggregation._kernels.order_rows`): vectorised across columns, where
``np.median``/``np.sort`` along the short axis pay per column. Means of rows are taken in float64
and rounded once (float32 models), so identical updates come back exactly. Krum's pairwise
distances come from one float64 Gram matrix of the deltas, accumulated over column blocks by
BLAS (``deltas @ deltas.T``), not from n² Python-level distance computations.

The robust rules ignore the update weights (each update counts once): a malicious site controls
its own reported example count, so weighting would hand it the influence these rules exist to
deny. Weights must still be valid (finite, > 0). Integer and bool tensors take the element-wise
maximum over the updates that contribute (all of them for median and trimmed mean, the selected
ones for Krum).
"""

from __future__ import annotations

import bisect
import itertools
import math
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch
from threadpoolctl import threadpool_limits

from fedcore.aggregation._kernels import (
    copy_measure_,
    delta_squared_norm,
    first_non_finite,
    mean_of_rows,
    order_rows,
    row_block_width,
)
from fedcore.aggregation.base import (
    IntegerMax,
    StateDict,
    Strategy,
    _Screened,
    floating_names,
)
from fedcore.aggregation_params import (
    DEFAULT_BETA,
    DEFAULT_F,
    DEFAULT_MEMORY_BUDGET_BYTES,
    STRATEGY_PARAMS,
    check_krum,
    check_multi_krum,
    check_robust,
    check_trimmed_mean,
)

__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "Krum", "Median", "MultiKrum", "TrimmedMean"]

_GRAM_COLUMNS = 8192
_SLAB_BYTES = 8 << 20


class _UpdateMatrix:
    """The round's flattened updates, one row each: in RAM within the budget, else in a file.

    A row in RAM is either a copy (a view into a slab, see :meth:`new_row`) or, when the update's
    floating tensors already are contiguous CPU arrays of the matrix dtype, those arrays
    themselves (:meth:`adopt`: a list of one flat array per tensor, nothing copied). Column
    blocks never straddle two tensors (:meth:`chunks`), so a block of an adopted row is a slice
    of one of its arrays.
    """

    def __init__(
        self, sizes: list[int], dtype: np.dtype, budget: int, spill_dir: str | None
    ) -> None:
        self.sizes = list(sizes)
        self.offsets = list(itertools.accumulate(self.sizes, initial=0))[:-1]
        self.width = sum(self.sizes)
        self.dtype, self.budget, self.spill_dir = dtype, budget, spill_dir
        self.rows: list[np.ndarray | list[np.ndarray]] = []
        self.count = 0
        # Adopted rows whose delta norm (and finiteness) the rule measures itself; see Krum.
        self.unmeasured: list[tuple[int, _Screened]] = []
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._file: BinaryIO | None = None
        self._reader: int | None = None  # file descriptor of the spill file once finished
        self._slab: np.ndarray | None = None  # rows are views into slabs (see new_row)
        self._slab_used = 0
        self._spill_row: np.ndarray | None = None

    @property
    def spilled(self) -> bool:
        """True when the rows live in a file."""
        return self._tempdir is not None

    @property
    def row_bytes(self) -> int:
        """Bytes per row."""
        return self.width * self.dtype.itemsize

    def _next_row_fits(self) -> bool:
        return not self.spilled and (
            (self.count + 1) * self.row_bytes <= self.budget or not self.width
        )

    def adopt(self, parts: list[np.ndarray]) -> bool:
        """Keep an update's own arrays (one per floating tensor, in layout order) as the next row.

        Nothing is copied; the arrays are only read. Returns False, keeping nothing, when the
        row would exceed the budget (the caller then copies it with :meth:`new_row`, which
        spills).
        """
        if not self._next_row_fits():
            return False
        self.rows.append(parts)
        self.count += 1
        return True

    def new_row(self) -> np.ndarray:
        """A writable row for the next update, to fill and then :meth:`commit`.

        In RAM, rows are carved from slabs of about 8 MiB (never beyond the budget): one numpy
        allocation for several small rows, large enough for transparent huge pages (see
        :func:`fedcore.aggregation._kernels.empty`). Once the next row would exceed the budget,
        the rows kept so far go to the spill file and every later row reuses one buffer.
        """
        if not self.spilled and not self._next_row_fits():
            self._tempdir = tempfile.TemporaryDirectory(prefix="quorum-agg-", dir=self.spill_dir)
            self._file = open(Path(self._tempdir.name) / "updates.f", "wb")  # noqa: SIM115
            for kept in self.rows:
                for part in [kept] if isinstance(kept, np.ndarray) else kept:
                    self._file.write(part.data)
            self.rows, self._slab = [], None
        if self._file is not None:
            if self._spill_row is None:
                self._spill_row = np.empty(self.width, dtype=self.dtype)
            return self._spill_row
        if self._slab is None or self._slab_used == len(self._slab):
            fits = max(1, self.budget // max(1, self.row_bytes) - self.count)
            per_slab = max(1, min(fits, _SLAB_BYTES // max(1, self.row_bytes)))
            self._slab, self._slab_used = np.empty((per_slab, self.width), self.dtype), 0
        return self._slab[self._slab_used]

    def commit(self, row: np.ndarray) -> None:
        """Add the row returned by :meth:`new_row`, now filled."""
        if self._file is not None:
            self._file.write(row.data)
        else:
            self.rows.append(row)
            self._slab_used += 1
        self.count += 1

    def finish(self) -> None:
        """Stop appending; open the spill file for reading."""
        if self._file is not None and self._tempdir is not None:
            self._file.close()
            self._file = None
            self._reader = os.open(Path(self._tempdir.name) / "updates.f", os.O_RDONLY)

    def chunks(self, width: int | None = None) -> Iterator[tuple[int, int]]:
        """Column ranges ``[start, stop)``, within one tensor each: by default about an L2 cache.

        Args:
            width: columns per block instead of the cache-sized default.
        """
        step = width or row_block_width(max(1, self.count), self.dtype.itemsize)
        for offset, size in zip(self.offsets, self.sizes, strict=True):
            for start in range(offset, offset + size, step):
                yield start, min(offset + size, start + step)

    def _piece(self, row: np.ndarray | list[np.ndarray], start: int, stop: int) -> np.ndarray:
        """Columns ``[start, stop)`` (within one tensor) of a row in RAM, as a view."""
        if isinstance(row, np.ndarray):
            return row[start:stop]
        index = bisect.bisect_right(self.offsets, start) - 1
        base = self.offsets[index]
        return row[index][start - base : stop - base]

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Return columns ``[start, stop)`` of every row as a new (n, stop - start) array."""
        if self._reader is not None:
            return self._read(range(self.count), start, stop)
        if not self.rows:
            return np.zeros((self.count, stop - start), dtype=self.dtype)
        return np.stack([self._piece(row, start, stop) for row in self.rows])

    def columns_into(self, out: np.ndarray, start: int, stop: int) -> None:
        """Write columns ``[start, stop)`` of every row into ``out`` (n x width), casting."""
        if self._reader is not None or not self.rows:
            out[:] = self.columns(start, stop)
            return
        for target, row in zip(out, self.rows, strict=True):
            target[:] = self._piece(row, start, stop)

    def select_columns(self, rows: list[int], start: int, stop: int) -> np.ndarray:
        """Columns ``[start, stop)`` of the given rows only, as a new array."""
        if self._reader is not None:
            return self._read(rows, start, stop)
        return np.stack([self._piece(self.rows[r], start, stop) for r in rows])

    def first_non_finite(self, row: int, names: list[str]) -> str | None:
        """Name of the first tensor (``names`` in layout order) of a row holding NaN or Inf."""
        for name, offset, size in zip(names, self.offsets, self.sizes, strict=True):
            if size and not np.isfinite(self.select_columns([row], offset, offset + size)).all():
                return name
        return None

    def _read(self, rows: Iterable[int], start: int, stop: int) -> np.ndarray:
        """Read columns ``[start, stop)`` of the given rows from the spill file."""
        assert self._reader is not None
        wanted = list(rows)
        block = np.empty((len(wanted), stop - start), dtype=self.dtype)
        size = self.dtype.itemsize
        for out, row in enumerate(wanted):
            target = memoryview(block[out]).cast("B")
            offset = (row * self.width + start) * size
            while len(target):  # preadv may return fewer bytes than asked
                got = os.preadv(self._reader, [target], offset)
                if got <= 0:
                    raise OSError(f"spill file ended early at row {row}")
                target, offset = target[got:], offset + got
        return block

    def close(self) -> None:
        """Close the spill file and delete the spill directory."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._reader is not None:
            os.close(self._reader)
            self._reader = None
        self._slab = self._spill_row = None
        self.unmeasured = []
        if self._tempdir is not None:
            self._tempdir.cleanup()
        self.rows = []


class _Layout:
    """How floating tensors map to a flat row, and back."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        self.names = floating_names(global_state)
        self.shapes = {name: tuple(global_state[name].shape) for name in self.names}
        self.dtypes = {name: global_state[name].dtype for name in self.names}
        self.sizes = [global_state[name].numel() for name in self.names]
        self.width = int(sum(self.sizes))
        wide = any(global_state[name].dtype == torch.float64 for name in self.names)
        self.torch_dtype = torch.float64 if wide else torch.float32
        self.np_dtype = np.dtype(np.float64 if wide else np.float32)

    def flatten(
        self,
        state: Mapping[str, torch.Tensor],
        out: np.ndarray | None = None,
        reference: Mapping[str, torch.Tensor] | None = None,
        cache: dict[torch.dtype, torch.Tensor] | None = None,
    ) -> tuple[np.ndarray, float]:
        """One update's floating tensors as a flat row (``out``, or a new array).

        With ``reference`` (the global model), also returns ``||state - reference||²`` over the
        floating tensors, measured from the same chunks (nan if a value is NaN/Inf); else 0.0.
        """
        row = np.empty(self.width, dtype=self.np_dtype) if out is None else out
        flat = torch.from_numpy(row)
        offset, squared = 0, 0.0
        for name, size in zip(self.names, self.sizes, strict=True):
            squared += copy_measure_(
                flat[offset : offset + size],
                state[name],
                None if reference is None else reference[name],
                cache,
            )
            offset += size
        return row, squared

    def arrays(self, state: Mapping[str, torch.Tensor]) -> list[np.ndarray] | None:
        """The update's floating tensors as flat numpy views, or None if one would need a copy.

        Views exist for contiguous CPU tensors of the row dtype (what decoded blobs give);
        anything else (another dtype, a GPU tensor, a strided or conjugate view) is copied by
        :meth:`flatten` instead.
        """
        parts = []
        for name in self.names:
            tensor = state[name].detach()
            if (
                tensor.dtype != self.torch_dtype
                or tensor.device.type != "cpu"
                or tensor.layout != torch.strided
                or not tensor.is_contiguous()
            ):
                return None
            try:
                parts.append(tensor.reshape(-1).numpy())
            except (RuntimeError, TypeError):  # conjugate or negative views refuse .numpy()
                return None
        return parts

    def unflatten(self, row: np.ndarray) -> StateDict:
        """A flat row back to tensors of the model's shapes and dtypes."""
        flat = torch.from_numpy(np.ascontiguousarray(row, dtype=self.np_dtype))
        result: StateDict = {}
        for name, part in zip(self.names, torch.split(flat, self.sizes), strict=True):
            result[name] = part.reshape(self.shapes[name]).to(self.dtypes[name], copy=True)
        return result


def _record(update: _Screened, squared: float, bad: Callable[[], str | None]) -> None:
    """Record a deferred update's delta norm from ``||Δ||²``; refuse it if that is not finite.

    ``bad`` names the first tensor holding NaN or Inf (asked only for a refused update).
    """
    if not math.isfinite(squared):
        raise ValueError(f"{update.where}: tensor {bad()!r} holds NaN or Inf; refuse this update")
    update.record_norm(math.sqrt(squared))


def _mean_block(block: np.ndarray) -> np.ndarray:
    """Unweighted mean of the rows of a block (see :func:`mean_of_rows`)."""
    return mean_of_rows(list(block), block.shape[0], block.dtype)


class _Robust(Strategy):
    """Collect every update into an :class:`_UpdateMatrix`, then combine column-chunked."""

    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["median"]
    streaming: ClassVar[bool] = False
    fuses_screening: ClassVar[bool] = True
    #: True when ``_rule`` measures adopted rows itself (``matrix.unmeasured``).
    measures_rows: ClassVar[bool] = False

    def __init__(
        self,
        *,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        spill_dir: str | os.PathLike[str] | None = None,
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set the memory budget shared by the robust strategies.

        Args:
            memory_budget_bytes: largest size of the stacked updates kept in RAM (an integer
                >= 1); above it they are spilled to a file. Peak RAM is about this plus
                one update plus the model.
            spill_dir: directory for the spill file (None: the system temporary directory).
                A server setting, not a plan parameter: not part of :meth:`spec`.
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)
        self.memory_budget_bytes: int = check_robust(
            self.name, {"memory_budget_bytes": memory_budget_bytes}
        )["memory_budget_bytes"]
        self.spill_dir = None if spill_dir is None else os.fspath(spill_dir)

    def _combine(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterator[_Screened],
        *,
        round_number: int,
    ) -> tuple[StateDict, dict[str, Any]]:
        """Stack the updates (RAM or disk), then run the rule chunk by chunk."""
        layout = _Layout(global_state)
        matrix = _UpdateMatrix(
            layout.sizes, layout.np_dtype, self.memory_budget_bytes, self.spill_dir
        )
        accepted: list[_Screened] = []
        integer_states: list[dict[str, torch.Tensor]] = []
        integers = IntegerMax(global_state)
        cache: dict[torch.dtype, torch.Tensor] = {}
        try:
            for update in updates:
                # Deferred screening: the NaN/Inf check and the delta norm come from the pass
                # that copies the update into its row, from one read-only pass over an adopted
                # row, or (Krum) from the Gram matrix of the deltas.
                deferred = update.deferred is not None
                parts = layout.arrays(update.state)
                adopted = parts is not None and matrix.adopt(parts)
                del parts
                if adopted:
                    if deferred and self.measures_rows:  # without the state: nothing kept alive
                        matrix.unmeasured.append((matrix.count - 1, replace(update, state={})))
                    elif deferred:
                        squared = sum(
                            delta_squared_norm(update.state[name], global_state[name], cache)
                            for name in layout.names
                        )
                        _record(update, squared, partial(first_non_finite, update.state))
                else:
                    row, squared = layout.flatten(
                        update.state,
                        out=matrix.new_row(),
                        reference=global_state if deferred else None,
                        cache=cache,
                    )
                    if deferred:
                        _record(update, squared, partial(first_non_finite, update.state))
                    matrix.commit(row)
                    del row
                # Keep only the small integer tensors of each update (Krum needs them by row).
                integer_states.append(
                    {name: update.state[name].detach().to("cpu").clone() for name in integers.names}
                )
                accepted.append(
                    _Screened(update.index, update.client, {}, update.weight, update.norm, None)
                )
                del update
            matrix.finish()
            row, chosen, extra = self._rule(matrix, layout, global_state, accepted)
        finally:
            spilled = matrix.spilled
            matrix.close()
        for index in chosen:
            integers.add(integer_states[index])
        result = layout.unflatten(row)
        result.update(integers.values)
        extra["spilled_to_disk"] = spilled
        return result, extra

    def _rule(
        self,
        matrix: _UpdateMatrix,
        layout: _Layout,
        global_state: Mapping[str, torch.Tensor],
        accepted: list[_Screened],
    ) -> tuple[np.ndarray, list[int], dict[str, Any]]:
        """Return (flat result, rows whose integer tensors count, extra stats)."""
        raise NotImplementedError


class Median(_Robust):
    """Coordinate-wise median (Yin et al., 2018, "Byzantine-Robust Distributed Learning").

    Each coordinate of the result is the median of that coordinate over the updates (the mean
    of the two middle values for an even count). Robust while fewer than half the updates are
    malicious; ignores weights.
    """

    name: ClassVar[str] = "median"

    def _rule(
        self,
        matrix: _UpdateMatrix,
        layout: _Layout,
        global_state: Mapping[str, torch.Tensor],
        accepted: list[_Screened],
    ) -> tuple[np.ndarray, list[int], dict[str, Any]]:
        """Median of every column: one rank (odd n) or the mean of the middle two (even n)."""
        n = matrix.count
        low, high = (n - 1) // 2, n // 2 + 1
        result = np.empty(matrix.width, dtype=matrix.dtype)
        for start, stop in matrix.chunks():
            middle = order_rows(matrix.columns(start, stop), low, high)
            result[start:stop] = mean_of_rows(middle, len(middle), matrix.dtype)
        return result, list(range(n)), {}


class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean (Yin et al., 2018).

    For each coordinate, the ``k = floor(beta * n)`` smallest and ``k`` largest values are
    dropped and the other ``n - 2k`` averaged (unweighted). Tolerates up to ``k`` malicious
    updates; ``beta = 0`` is the plain unweighted mean.
    """

    name: ClassVar[str] = "trimmed_mean"
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["trimmed_mean"]

    def __init__(
        self,
        *,
        beta: float = DEFAULT_BETA,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        spill_dir: str | os.PathLike[str] | None = None,
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set the trimmed fraction.

        Args:
            beta: fraction trimmed at each end, in [0, 0.5). Set it to at least the expected
                fraction of malicious sites: with 10 sites, 0.2 trims 2 at each end.
            memory_budget_bytes: largest size of the stacked updates kept in RAM, an integer
                >= 1; beyond it they spill to a file (see the module docstring).
            spill_dir: directory for the spill file (None: the system temporary directory).
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(
            memory_budget_bytes=memory_budget_bytes,
            spill_dir=spill_dir,
            flag_threshold=flag_threshold,
            norm_bound=norm_bound,
        )
        self.beta: float = check_trimmed_mean(self.name, {"beta": beta})["beta"]

    def _rule(
        self,
        matrix: _UpdateMatrix,
        layout: _Layout,
        global_state: Mapping[str, torch.Tensor],
        accepted: list[_Screened],
    ) -> tuple[np.ndarray, list[int], dict[str, Any]]:
        """Order every column, drop k at each end, average the rest."""
        n = matrix.count
        trim = int(np.floor(self.beta * n))
        result = np.empty(matrix.width, dtype=matrix.dtype)
        for start, stop in matrix.chunks():
            block = matrix.columns(start, stop)
            kept = list(block) if trim == 0 else order_rows(block, trim, n - trim)
            result[start:stop] = mean_of_rows(kept, n - 2 * trim, matrix.dtype)
        return result, list(range(n)), {"trimmed_per_side": trim}


class Krum(_Robust):
    """Krum (Blanchard et al., 2017, "Machine Learning with Adversaries: Byzantine Tolerant
    Gradient Descent"): return the update closest to its neighbours.

    With ``n`` updates and at most ``f`` Byzantine ones, each update ``i`` gets the score
    ``s(i) = Σ ||Δ_i - Δ_j||²`` over its ``n - f - 2`` nearest other updates; Krum returns the
    update with the smallest score (the lowest index on a tie). Requires ``n >= 2f + 3``.
    Squared distances come from one Gram matrix of the deltas: ``||a||² + ||b||² - 2 a·b``,
    accumulated in float64 over column chunks (deltas, not weights, to avoid cancellation
    between large nearly equal numbers).
    """

    name: ClassVar[str] = "krum"
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["krum"]
    measures_rows: ClassVar[bool] = True

    def __init__(
        self,
        *,
        f: int = DEFAULT_F,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        spill_dir: str | os.PathLike[str] | None = None,
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set the number of Byzantine updates to tolerate.

        Args:
            f: assumed number of Byzantine updates per round, an integer >= 0. The round
                needs at least ``2f + 3`` updates.
            memory_budget_bytes: largest size of the stacked updates kept in RAM, an integer
                >= 1; beyond it they spill to a file (see the module docstring).
            spill_dir: directory for the spill file (None: the system temporary directory).
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(
            memory_budget_bytes=memory_budget_bytes,
            spill_dir=spill_dir,
            flag_threshold=flag_threshold,
            norm_bound=norm_bound,
        )
        self.f: int = check_krum(self.name, {"f": f})["f"]

    def _selection_size(self, n: int) -> int:
        """How many updates to average (1 for Krum)."""
        return 1

    def _rule(
        self,
        matrix: _UpdateMatrix,
        layout: _Layout,
        global_state: Mapping[str, torch.Tensor],
        accepted: list[_Screened],
    ) -> tuple[np.ndarray, list[int], dict[str, Any]]:
        """Score every update from the pairwise distances, average the best ``m``."""
        # The Gram matrix first: a NaN/Inf update is refused as such, whatever the count.
        gram = _delta_gram(matrix, layout, global_state)
        for row, update in matrix.unmeasured:  # adopted rows: their ||Δ||² is on the diagonal
            _record(
                update, float(gram[row, row]), partial(matrix.first_non_finite, row, layout.names)
            )
        n = matrix.count
        if n < 2 * self.f + 3:
            raise ValueError(
                f"{self.name} with f={self.f} needs at least 2f + 3 = {2 * self.f + 3} "
                f"updates, got {n}; lower f or wait for more sites"
            )
        scores = krum_scores(_squared_distances(gram), self.f)
        m = self._selection_size(n)
        selected = sorted(np.argsort(scores, kind="stable")[:m].tolist())
        result = np.empty(matrix.width, dtype=matrix.dtype)
        for start, stop in matrix.chunks():
            result[start:stop] = _mean_block(matrix.select_columns(selected, start, stop))
        extra = {
            "selected": [accepted[i].client for i in selected],
            "krum_scores": [float(s) for s in scores],
        }
        return result, selected, extra


class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al., 2017): the unweighted mean of the ``m`` best-scored updates.

    ``m = 1`` is Krum; ``m = n`` is the plain mean. The default ``m = n - f`` drops as many
    updates as there may be Byzantine ones.
    """

    name: ClassVar[str] = "multi_krum"
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["multi_krum"]

    def __init__(
        self,
        *,
        f: int = DEFAULT_F,
        m: int | None = None,
        memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
        spill_dir: str | os.PathLike[str] | None = None,
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set ``f`` and the number of updates averaged.

        Args:
            f: see :class:`Krum`.
            m: updates averaged, an integer >= 1 (capped at the round's count), or None for
                ``n - f``.
            memory_budget_bytes: largest size of the stacked updates kept in RAM, an integer
                >= 1; beyond it they spill to a file (see the module docstring).
            spill_dir: directory for the spill file (None: the system temporary directory).
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(
            f=f,
            memory_budget_bytes=memory_budget_bytes,
            spill_dir=spill_dir,
            flag_threshold=flag_threshold,
            norm_bound=norm_bound,
        )
        self.m: int | None = check_multi_krum(self.name, {"m": m})["m"]

    def _selection_size(self, n: int) -> int:
        """``m`` capped at n, or ``n - f``."""
        return n - self.f if self.m is None else min(self.m, n)


def _delta_gram(
    matrix: _UpdateMatrix, layout: _Layout, global_state: Mapping[str, torch.Tensor]
) -> np.ndarray:
    """The Gram matrix ``G[i, j] = Δ_i · Δ_j`` of the rows' deltas from the global model.

    Accumulated in float64 over column blocks: each block's float32 values are cast (exactly)
    and the global model's subtracted, so the deltas are exact and the distances derived from
    ``G`` agree with brute force to about 1e-12. ``block @ block.T`` is one BLAS ``syrk`` call
    (numpy recognises a product with its own transpose): half the multiplications of a general
    product. BLAS runs on one thread here: on a busy machine spinning BLAS threads made these
    small products many times slower, and one thread is stable.
    """
    n = matrix.count
    reference = layout.flatten(global_state)[0].astype(np.float64)
    gram = np.zeros((n, n), dtype=np.float64)
    # n x 8192 float64 deltas: 3.2 MiB for 50 updates, within L2 + L3 on the way to BLAS.
    deltas = np.empty((n, _GRAM_COLUMNS), dtype=np.float64)
    with threadpool_limits(limits=1, user_api="blas"):
        for start, stop in matrix.chunks(_GRAM_COLUMNS):
            block = deltas[:, : stop - start]
            matrix.columns_into(block, start, stop)  # float32 -> float64: the deltas are exact
            block -= reference[start:stop]
            gram += block @ block.T
    return gram


def _squared_distances(gram: np.ndarray) -> np.ndarray:
    """Pairwise squared Euclidean distances ``||a||² + ||b||² - 2 a·b`` from a Gram matrix."""
    squared = np.diag(gram)
    distances = squared[:, None] + squared[None, :] - 2.0 * gram
    np.maximum(distances, 0.0, out=distances)  # rounding can make a tiny distance negative
    np.fill_diagonal(distances, 0.0)
    return distances


def krum_scores(distances: np.ndarray, f: int) -> np.ndarray:
    """Krum scores: for each row, the sum of its ``n - f - 2`` smallest distances to others.

    Args:
        distances: (n, n) symmetric squared distances with a zero diagonal.
        f: assumed number of Byzantine updates; ``n - f - 2`` must be >= 1.

    Returns:
        float64 array of n scores; lower is more central.
    """
    n = distances.shape[0]
    closest = n - f - 2
    others = distances + np.diag(np.full(n, np.inf))  # a row is not its own neighbour
    nearest = np.sort(others, axis=1)[:, :closest]
    return nearest.sum(axis=1)
