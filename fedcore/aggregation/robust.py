"""Byzantine-robust strategies: coordinate-wise median, trimmed mean, Krum and Multi-Krum.

Each needs every update of the round at once. The floating tensors of each update are flattened
(sorted tensor names, float32; float64 if the model has a float64 tensor) into one row of an
``n x P`` matrix. While that matrix fits in ``memory_budget_bytes`` its rows stay in RAM; as soon
as the next row would exceed the budget, the rows go to a ``numpy.memmap`` file in a temporary
directory (removed afterwards) and the computation reads the matrix in column chunks of at most
about a third of the budget. Both paths run the same chunked code, so they give the same result.

The robust rules ignore the update weights (each update counts once): a malicious site controls
its own reported example count, so weighting would hand it the influence these rules exist to
deny. Weights must still be valid (finite, > 0). Integer and bool tensors take the element-wise
maximum over the updates that contribute (all of them for median and trimmed mean, the selected
ones for Krum).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import numpy as np
import torch

from fedcore.aggregation.base import (
    IntegerMax,
    StateDict,
    Strategy,
    _Screened,
    check_int,
    check_number,
    floating_names,
)

__all__ = ["DEFAULT_MEMORY_BUDGET_BYTES", "Krum", "Median", "MultiKrum", "TrimmedMean"]

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024


class _UpdateMatrix:
    """The round's flattened updates, one row each: in RAM within the budget, else a memmap."""

    def __init__(self, width: int, dtype: np.dtype, budget: int, spill_dir: str | None) -> None:
        self.width, self.dtype, self.budget, self.spill_dir = width, dtype, budget, spill_dir
        self.rows: list[np.ndarray] = []
        self.count = 0
        self._tempdir: tempfile.TemporaryDirectory[str] | None = None
        self._file: BinaryIO | None = None
        self._memmap: np.memmap | None = None

    @property
    def spilled(self) -> bool:
        """True when the rows live in a file."""
        return self._tempdir is not None

    @property
    def row_bytes(self) -> int:
        """Bytes per row."""
        return self.width * self.dtype.itemsize

    def append(self, row: np.ndarray) -> None:
        """Add one row (length ``width``), spilling everything to disk once over the budget."""
        if not self.spilled and (self.count + 1) * self.row_bytes > self.budget and self.width:
            self._tempdir = tempfile.TemporaryDirectory(prefix="quorum-agg-", dir=self.spill_dir)
            self._file = open(Path(self._tempdir.name) / "updates.f", "wb")  # noqa: SIM115
            for kept in self.rows:
                self._file.write(kept.tobytes())
            self.rows = []
        if self._file is not None:
            self._file.write(np.ascontiguousarray(row, dtype=self.dtype).tobytes())
        else:
            self.rows.append(np.array(row, dtype=self.dtype, copy=True))
        self.count += 1

    def finish(self) -> None:
        """Stop appending; map the spill file read-only."""
        if self._file is not None and self._tempdir is not None:
            self._file.close()
            self._file = None
            self._memmap = np.memmap(
                Path(self._tempdir.name) / "updates.f",
                dtype=self.dtype,
                mode="r",
                shape=(self.count, self.width),
            )

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Column ranges ``[start, stop)`` so that a chunk's work arrays stay within the budget."""
        # A chunk is read (n x c), copied to float64 and sorted: about 3 float64 copies.
        per_column = max(1, self.count) * 8 * 3
        step = max(1, self.budget // per_column)
        for start in range(0, self.width, step):
            yield start, min(self.width, start + step)

    def columns(self, start: int, stop: int) -> np.ndarray:
        """Return columns ``[start, stop)`` of every row as a new (n, stop - start) array."""
        if self._memmap is not None:
            return np.array(self._memmap[:, start:stop])
        if not self.rows:
            return np.zeros((self.count, stop - start), dtype=self.dtype)
        return np.stack([row[start:stop] for row in self.rows])

    def close(self) -> None:
        """Release the memmap and delete the spill directory."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._memmap = None
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

    def flatten(self, state: Mapping[str, torch.Tensor]) -> np.ndarray:
        """One update's floating tensors as a flat row."""
        if not self.names:
            return np.zeros(0, dtype=self.np_dtype)
        parts = [state[n].detach().to("cpu", self.torch_dtype).reshape(-1) for n in self.names]
        return torch.cat(parts).numpy()

    def unflatten(self, row: np.ndarray) -> StateDict:
        """A flat row back to tensors of the model's shapes and dtypes."""
        flat = torch.from_numpy(np.ascontiguousarray(row, dtype=self.np_dtype))
        result: StateDict = {}
        for name, part in zip(self.names, torch.split(flat, self.sizes), strict=True):
            result[name] = part.reshape(self.shapes[name]).to(self.dtypes[name], copy=True)
        return result


def _running_mean_rows(block: np.ndarray) -> np.ndarray:
    """Unweighted mean of the rows, as a float64 running mean cast back to the block's dtype.

    ``mean += (x_k - mean) / k`` leaves the mean unchanged when ``x_k`` equals it, so identical
    rows give that row exactly; float64 keeps float32 means correctly rounded.
    """
    mean = block[0].astype(np.float64)
    for k in range(1, block.shape[0]):
        mean += (block[k] - mean) / (k + 1)
    return mean.astype(block.dtype)


class _Robust(Strategy):
    """Collect every update into an :class:`_UpdateMatrix`, then combine column-chunked."""

    SPEC_PARAMS: ClassVar[tuple[str, ...]] = ("memory_budget_bytes", *Strategy.SPEC_PARAMS)
    streaming: ClassVar[bool] = False

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
                >= 1); above it they are spilled to a memmap file. Peak RAM is about this plus
                one update plus the model.
            spill_dir: directory for the spill file (None: the system temporary directory).
                A server setting, not a plan parameter: not part of :meth:`spec`.
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)
        self.memory_budget_bytes = check_int(
            self.name, "memory_budget_bytes", memory_budget_bytes, low=1
        )
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
            layout.width, layout.np_dtype, self.memory_budget_bytes, self.spill_dir
        )
        accepted: list[_Screened] = []
        integer_states: list[dict[str, torch.Tensor]] = []
        integers = IntegerMax(global_state)
        try:
            for update in updates:
                matrix.append(layout.flatten(update.state))
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
        """Median of every column."""
        result = np.empty(matrix.width, dtype=matrix.dtype)
        for start, stop in matrix.chunks():
            result[start:stop] = np.median(matrix.columns(start, stop), axis=0)
        return result, list(range(matrix.count)), {}


class TrimmedMean(_Robust):
    """Coordinate-wise trimmed mean (Yin et al., 2018).

    For each coordinate, the ``k = floor(beta * n)`` smallest and ``k`` largest values are
    dropped and the other ``n - 2k`` averaged (unweighted). Tolerates up to ``k`` malicious
    updates; ``beta = 0`` is the plain unweighted mean.
    """

    name: ClassVar[str] = "trimmed_mean"
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = ("beta", *_Robust.SPEC_PARAMS)

    def __init__(
        self,
        *,
        beta: float = 0.1,
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
                >= 1; beyond it they spill to a memmap file (see the module docstring).
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
        self.beta = check_number(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def _rule(
        self,
        matrix: _UpdateMatrix,
        layout: _Layout,
        global_state: Mapping[str, torch.Tensor],
        accepted: list[_Screened],
    ) -> tuple[np.ndarray, list[int], dict[str, Any]]:
        """Sort every column, drop k at each end, average the rest."""
        n = matrix.count
        trim = int(np.floor(self.beta * n))
        result = np.empty(matrix.width, dtype=matrix.dtype)
        for start, stop in matrix.chunks():
            block = np.sort(matrix.columns(start, stop), axis=0)
            result[start:stop] = _running_mean_rows(block[trim : n - trim])
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
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = ("f", *_Robust.SPEC_PARAMS)

    def __init__(
        self,
        *,
        f: int = 1,
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
                >= 1; beyond it they spill to a memmap file (see the module docstring).
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
        self.f = check_int(self.name, "f", f, low=0)

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
        n = matrix.count
        if n < 2 * self.f + 3:
            raise ValueError(
                f"{self.name} with f={self.f} needs at least 2f + 3 = {2 * self.f + 3} "
                f"updates, got {n}; lower f or wait for more sites"
            )
        scores = krum_scores(_squared_distances(matrix, layout, global_state), self.f)
        m = self._selection_size(n)
        selected = sorted(np.argsort(scores, kind="stable")[:m].tolist())
        result = np.empty(matrix.width, dtype=matrix.dtype)
        for start, stop in matrix.chunks():
            result[start:stop] = _running_mean_rows(matrix.columns(start, stop)[selected])
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
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = ("m", *Krum.SPEC_PARAMS)

    def __init__(
        self,
        *,
        f: int = 1,
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
                >= 1; beyond it they spill to a memmap file (see the module docstring).
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
        self.m = None if m is None else check_int(self.name, "m", m, low=1)

    def _selection_size(self, n: int) -> int:
        """``m`` capped at n, or ``n - f``."""
        return n - self.f if self.m is None else min(self.m, n)


def _squared_distances(
    matrix: _UpdateMatrix, layout: _Layout, global_state: Mapping[str, torch.Tensor]
) -> np.ndarray:
    """Pairwise squared Euclidean distances of the rows, from one Gram matrix of the deltas."""
    n = matrix.count
    reference = layout.flatten(global_state).astype(np.float64)
    gram = np.zeros((n, n), dtype=np.float64)
    for start, stop in matrix.chunks():
        deltas = matrix.columns(start, stop).astype(np.float64) - reference[start:stop]
        gram += deltas @ deltas.T
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
