"""Disclosure control a site applies before anything leaves it.

``DisclosurePolicy`` is the ``[disclosure]`` section of a site's ``site.toml``: the minimum cell
count (default 5), the minimum number of sites a released statistic must combine, the analysis
kinds the site runs at all, and how coarse the event times it reveals are.

Tables are released with *primary* suppression (every count from 1 to ``min_cell_count - 1``,
margins included) and *complementary* suppression: further cells are withheld until no suppressed
cell is determined by the released cells and totals. A table with margins is a set of linear
equations (each row and each column adds up to its total); a suppressed cell is disclosed when it
is the same in every solution, that is when its unit vector lies in the row space of the equations
restricted to the suppressed cells (equivalently, when it is a bridge of the bipartite graph of
suppressed cells: Cox, "Linear sensitivity measures in statistical disclosure control", 1981).
``suppress_table`` adds cells until no suppressed cell is determined, checking that by the rank of
the null space. Complementary cells are chosen among positive counts, so every suppressed value
can move by at least one in either direction along a cycle and stay non-negative.

Zeros are released, so whoever reads the table knows every suppressed entry is at least 1; two
suppressed ones of a line whose released total leaves 2 for them are then both 1, although the
equations alone do not determine them. ``pinned_cells`` finds such entries by linear programming
(each suppressed entry's smallest and largest value with every suppressed entry at least 1; the
additivity equations of a table with margins are totally unimodular, so a range of width 1 or
more holds another whole number), and ``suppress_table`` closes a cycle through each along entries
of at least 2, which can give one up and stay positive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

__all__ = [
    "ANALYSIS_KINDS",
    "DEFAULT_MIN_CELL_COUNT",
    "DEFAULT_MIN_SITES",
    "DisclosurePolicy",
    "DisclosureRefused",
    "SuppressedTable",
    "check_analysis_allowed",
    "check_min_sites",
    "check_site_count",
    "determined_cells",
    "suppress_table",
    "table_equations",
]

ANALYSIS_KINDS: tuple[str, ...] = (
    "count",
    "crosstab",
    "moments",
    "histogram",
    "quantile",
    "kaplan_meier",
    "logrank",
    "cox",
    "linear_regression",
    "logistic_regression",
)
DEFAULT_MIN_CELL_COUNT = 5
# Two sites are not enough: either one can subtract its own part from the released sum and read
# the other's. Three is the least for which a single participant learns only a sum of others.
DEFAULT_MIN_SITES = 3


class DisclosureRefused(ValueError):
    """A site's disclosure policy refuses this analysis; the message says why and what to do."""


@dataclass(frozen=True)
class DisclosurePolicy:
    """What a site releases: the ``[disclosure]`` section of ``site.toml``."""

    min_cell_count: int = DEFAULT_MIN_CELL_COUNT
    min_sites: int = DEFAULT_MIN_SITES
    allowed_analyses: tuple[str, ...] = ANALYSIS_KINDS
    # None: event times leave the site as they are (the union grid holds them exactly). A number:
    # every time is floored to a multiple of it before any survival analysis, and results say so.
    time_step: float | None = None
    # Noise (an analysis plan's privacy section): refuse a plan that adds none, or one whose
    # epsilon per release is above max_epsilon (docs/analytics.md, "Noise").
    require_noise: bool = False
    max_epsilon: float | None = None

    def __post_init__(self) -> None:
        """Validate the policy values."""
        if isinstance(self.min_cell_count, bool) or not isinstance(self.min_cell_count, int):
            raise ValueError(
                f"disclosure.min_cell_count must be an integer, got {self.min_cell_count!r}"
            )
        if self.min_cell_count < 1:
            raise ValueError(f"disclosure.min_cell_count must be >= 1, got {self.min_cell_count}")
        if isinstance(self.min_sites, bool) or not isinstance(self.min_sites, int):
            raise ValueError(f"disclosure.min_sites must be an integer, got {self.min_sites!r}")
        if self.min_sites < 1:
            raise ValueError(f"disclosure.min_sites must be >= 1, got {self.min_sites}")
        allowed = tuple(self.allowed_analyses)
        unknown = [kind for kind in allowed if kind not in ANALYSIS_KINDS]
        if unknown:
            raise ValueError(
                f"disclosure.allowed_analyses names unknown kind(s) {unknown}; "
                f"known: {', '.join(ANALYSIS_KINDS)}"
            )
        object.__setattr__(self, "allowed_analyses", allowed)
        if self.time_step is not None:
            step = self.time_step
            if (
                isinstance(step, bool)
                or not isinstance(step, int | float)
                or not (math.isfinite(step) and step > 0)
            ):
                raise ValueError(f"disclosure.time_step must be a positive number, got {step!r}")
        if not isinstance(self.require_noise, bool):
            raise ValueError(
                f"disclosure.require_noise must be true or false, got {self.require_noise!r}"
            )
        cap = self.max_epsilon
        if cap is not None and (
            isinstance(cap, bool)
            or not isinstance(cap, int | float)
            or not (math.isfinite(cap) and cap > 0)
        ):
            raise ValueError(f"disclosure.max_epsilon must be a positive number, got {cap!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DisclosurePolicy:
        """Read the ``[disclosure]`` table of ``site.toml`` (absent keys take the defaults).

        Args:
            data: ``{"min_cell_count", "min_sites", "allowed_analyses", "time_step"}``.

        Raises:
            ValueError: an unknown key or an invalid value, named.
        """
        known = {
            "min_cell_count",
            "min_sites",
            "allowed_analyses",
            "time_step",
            "require_noise",
            "max_epsilon",
        }
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(
                f"[disclosure] has unknown key(s) {unknown}; known: {', '.join(sorted(known))}"
            )
        allowed = data.get("allowed_analyses", ANALYSIS_KINDS)
        if isinstance(allowed, str) or not isinstance(allowed, list | tuple):
            raise ValueError(f"disclosure.allowed_analyses must be a list, got {allowed!r}")
        return cls(
            min_cell_count=data.get("min_cell_count", DEFAULT_MIN_CELL_COUNT),
            min_sites=data.get("min_sites", DEFAULT_MIN_SITES),
            allowed_analyses=tuple(allowed),
            time_step=data.get("time_step"),
            require_noise=data.get("require_noise", False),
            max_epsilon=data.get("max_epsilon"),
        )


def check_noise_allowed(
    policy: DisclosurePolicy, epsilon: float | None, *, mechanism: str | None = None
) -> None:
    """Refuse a release without noise when the policy requires it, or with an epsilon above
    the policy's cap (``epsilon`` None: the plan adds no noise)."""
    if epsilon is None:
        if policy.require_noise:
            raise DisclosureRefused(
                "this site releases only noised results ([disclosure] require_noise in "
                "site.toml) and the plan adds no noise: propose a count, crosstab, histogram or "
                "moments with a privacy section {mechanism, epsilon}"
            )
        return
    if policy.max_epsilon is not None and epsilon > policy.max_epsilon:
        raise DisclosureRefused(
            f"the plan's {mechanism or 'noise'} epsilon {epsilon:g} per release is above this "
            f"site's cap ([disclosure] max_epsilon = {policy.max_epsilon:g} in site.toml): "
            "propose the plan with a smaller epsilon"
        )


def check_analysis_allowed(policy: DisclosurePolicy, kind: str) -> None:
    """Refuse an analysis kind the site's policy does not allow."""
    if kind not in policy.allowed_analyses:
        raise DisclosureRefused(
            f"this site does not run {kind!r} analyses (allowed: "
            f"{', '.join(policy.allowed_analyses) or 'none'}); ask its data steward to add it "
            "to [disclosure] allowed_analyses in site.toml"
        )


def check_min_sites(policy: DisclosurePolicy, n_sites: int) -> None:
    """Refuse a statistic that would combine fewer sites than the policy's minimum."""
    if n_sites < policy.min_sites:
        raise DisclosureRefused(
            f"the statistic would combine {n_sites} site(s); this site's policy releases only "
            f"statistics of at least {policy.min_sites} sites: add sites to the analysis"
        )


def check_site_count(policy: DisclosurePolicy, count: int, what: str) -> None:
    """Refuse when a site's rows for ``what`` number from 1 to ``min_cell_count - 1``.

    A site with no such rows contributes zeros and is not refused.
    """
    if 0 < count < policy.min_cell_count:
        raise DisclosureRefused(
            f"{what} holds fewer than {policy.min_cell_count} rows at this site (the minimum "
            "cell count); widen the filter or group small categories"
        )


def _constraint_matrix(shape: tuple[int, int], col_margins: bool) -> np.ndarray:
    # Entries of the extended array E (cells, row totals in the last column, column totals in
    # the last row, the grand total in the corner), flattened row-major. Each equation is a
    # line of E: its cells minus its total = 0.
    rows, cols = shape
    width = cols + 1
    height = rows + 1 if col_margins else rows
    equations = []
    for i in range(height):
        equation = np.zeros(height * width)
        equation[i * width : i * width + cols] = 1.0
        equation[i * width + cols] = -1.0
        equations.append(equation)
    if col_margins:
        for j in range(width):
            equation = np.zeros(height * width)
            for i in range(rows):
                equation[i * width + j] = 1.0
            equation[rows * width + j] = -1.0
            equations.append(equation)
    return np.array(equations)


def determined_cells(equations: np.ndarray, suppressed: np.ndarray) -> np.ndarray:
    """Which suppressed entries the released entries and the equations determine.

    Args:
        equations: one linear equation per row, over every entry of the table.
        suppressed: boolean mask over the entries.

    Returns:
        A boolean mask: suppressed entries whose value is the same in every real solution.
    """
    index = np.flatnonzero(suppressed)
    result = np.zeros(suppressed.shape, dtype=bool)
    if index.size == 0:
        return result
    sub = equations[:, index]
    # Null space of the equations over the unknowns: an entry is free iff some null vector
    # moves it.
    _, singular, vt = np.linalg.svd(sub)
    rank = int(np.sum(singular > 1e-9 * max(1.0, singular[0] if singular.size else 1.0)))
    null = vt[rank:]
    free = np.any(np.abs(null) > 1e-9, axis=0) if null.size else np.zeros(index.size, bool)
    result[index[~free]] = True
    return result


def pinned_cells(equations: np.ndarray, values: np.ndarray, suppressed: np.ndarray) -> np.ndarray:
    """Which suppressed entries the released ones determine once every suppressed entry is
    known to be at least 1 (zeros are released).

    Args:
        equations: one linear equation per row, over every entry of the table.
        values: the true values of the entries (only the released ones are used as known).
        suppressed: boolean mask over the entries.

    Returns:
        A boolean mask: suppressed entries whose smallest and largest feasible values differ by
        less than 1.
    """
    from scipy.optimize import linprog

    hidden = np.flatnonzero(suppressed)
    result = np.zeros(suppressed.shape, dtype=bool)
    if hidden.size == 0:
        return result
    shown = np.flatnonzero(~suppressed)
    a_eq = equations[:, hidden]
    b_eq = -equations[:, shown] @ np.asarray(values, dtype=np.float64)[shown]
    bounds = [(1.0, None)] * hidden.size
    for k, entry in enumerate(hidden):
        target = np.zeros(hidden.size)
        target[k] = 1.0
        low = linprog(target, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
        high = linprog(-target, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
        if high.status == 3:  # unbounded above: free
            continue
        if low.status != 0 or high.status != 0 or -high.fun - low.fun < 1.0 - 1e-9:
            result[entry] = True
    return result


@dataclass(frozen=True)
class SuppressedTable:
    """A count table as released: cells, margins, and which entries are withheld."""

    cells: np.ndarray  # int64, the true counts (never released where suppressed)
    row_totals: np.ndarray
    col_totals: np.ndarray | None  # None for a one-dimensional table
    total: int
    suppressed: np.ndarray  # bool over the extended array (cells + margins)
    primary: np.ndarray  # bool: suppressed because small
    min_cell_count: int

    @property
    def extended(self) -> np.ndarray:
        """The table with its margins as one array (last column row totals, last row columns)."""
        return _extended(self.cells, self.col_totals is not None)

    def released(self) -> dict[str, Any]:
        """The JSON-able release: ``None`` wherever an entry is suppressed."""
        ext = self.extended
        shown = [
            [None if self.suppressed[i, j] else int(ext[i, j]) for j in range(ext.shape[1])]
            for i in range(ext.shape[0])
        ]
        rows = self.cells.shape[0]
        body = [row[:-1] for row in shown[:rows]]
        out: dict[str, Any] = {
            "cells": body if self.col_totals is not None else body[0],
            "row_totals": [row[-1] for row in shown[:rows]],
            "min_cell_count": self.min_cell_count,
            "suppressed": int(self.suppressed.sum()),
            "suppressed_primary": int(self.primary.sum()),
        }
        if self.col_totals is not None:
            out["col_totals"] = shown[rows][:-1]
            out["total"] = shown[rows][-1]
        else:
            out["total"] = out.pop("row_totals")[0]
        return out


def _extended(cells: np.ndarray, col_margins: bool) -> np.ndarray:
    rows = np.concatenate([cells, cells.sum(axis=1, keepdims=True)], axis=1)
    if not col_margins:
        return rows
    return np.concatenate([rows, rows.sum(axis=0, keepdims=True)], axis=0)


def suppress_table(
    counts: ArrayLike, min_cell_count: int = DEFAULT_MIN_CELL_COUNT
) -> SuppressedTable:
    """Suppress small cells of a 1-D or 2-D count table and enough others to protect them.

    A 1-D table is released with its total; a 2-D table with row totals, column totals and the
    grand total. Zero counts are released (a zero is not a person).

    Args:
        counts: non-negative integer counts, shape ``(k,)`` or ``(r, c)``.
        min_cell_count: counts from 1 to ``min_cell_count - 1`` are primary suppressions.

    Returns:
        The table with its suppression masks. No suppressed entry is determined by the
        released ones (``determined_cells`` is all false), which the tests check again by
        linear programming.

    Raises:
        ValueError: counts that are not non-negative integers, or a shape of another rank.
    """
    array = np.asarray(counts)
    if array.ndim not in (1, 2) or array.size == 0:
        raise ValueError(f"a count table must be 1-D or 2-D and non-empty, got shape {array.shape}")
    if array.dtype.kind == "f":
        if not np.all(np.isfinite(array)) or np.any(array != np.round(array)):
            raise ValueError("a count table must hold whole numbers")
    elif array.dtype.kind not in "iub":
        raise ValueError(f"a count table must hold integers, got dtype {array.dtype}")
    cells = array.astype(np.int64)
    if np.any(cells < 0):
        raise ValueError("a count table cannot hold negative counts")
    col_margins = cells.ndim == 2
    cells2 = cells if col_margins else cells[None, :]
    ext = _extended(cells2, col_margins)
    equations = _constraint_matrix(cells2.shape, col_margins)
    flat = ext.ravel()
    primary = (flat > 0) & (flat < min_cell_count)
    suppressed = primary.copy()
    interior = np.zeros(ext.shape, dtype=bool)
    interior[: cells2.shape[0], : cells2.shape[1]] = True
    interior_flat = interior.ravel()
    while True:
        determined = determined_cells(equations, suppressed)
        # Once no entry is determined by the equations, none may be by them and positivity
        # (every suppressed entry is at least 1): close those cycles along entries of 2 or more.
        strict = not determined.any()
        if strict:
            determined = pinned_cells(equations, flat, suppressed)
            if not determined.any():
                break
        entry = int(np.flatnonzero(determined)[0])
        if col_margins:
            path = _cheapest_cycle(ext, suppressed.reshape(ext.shape), entry, strict=strict)
        else:
            path = _cheapest_partner(flat, suppressed, interior_flat, strict=strict)
        if not path or (strict and suppressed[path].all()):
            # Nothing can close a cycle (or the one found adds nothing): withhold everything
            # (nothing is released).
            suppressed[:] = True
            break
        suppressed[path] = True
    shape = ext.shape
    rows = cells2.shape[0]
    return SuppressedTable(
        cells=cells2 if col_margins else cells2,
        row_totals=ext[:rows, -1],
        col_totals=ext[rows, :-1] if col_margins else None,
        total=int(ext[-1, -1]),
        suppressed=suppressed.reshape(shape),
        primary=primary.reshape(shape),
        min_cell_count=min_cell_count,
    )


def _cheapest_partner(
    flat: np.ndarray, suppressed: np.ndarray, interior: np.ndarray, *, strict: bool = False
) -> list[int]:
    # One line only (a 1-D table and its total): a lone suppressed entry needs one partner,
    # the smallest positive released one (strict: at least 2), cells before the total.
    candidates = [i for i in np.flatnonzero(~suppressed & (flat > (1 if strict else 0)))]
    if not candidates:
        return []
    return [min(candidates, key=lambda i: (0 if interior[i] else 1, int(flat[i]), int(i)))]


def _cheapest_cycle(
    ext: np.ndarray, suppressed: np.ndarray, entry: int, *, strict: bool = False
) -> list[int]:
    # In the table with margins every line adds up (cells minus total = 0), so entries are the
    # edges of a bipartite graph between lines (rows) and lines (columns), and a suppressed
    # entry is determined iff it is a bridge of the graph of suppressed entries. Close a cycle
    # through it along the cheapest path from its row to its column: suppressed entries cost
    # nothing, released positive ones their count (the information withheld); zeros are not
    # used, so every suppressed entry stays free to move by one either way.
    import heapq

    if strict:
        return _raising_cycle(ext, suppressed, entry)

    height, width = ext.shape
    row, col = divmod(entry, width)
    start, goal = row, height + col
    best = {start: 0}
    back: dict[int, tuple[int, int]] = {}
    queue = [(0, start)]
    while queue:
        cost, node = heapq.heappop(queue)
        if node == goal:
            break
        if cost > best.get(node, np.inf):
            continue
        if node < height:
            edges = [(node, j, height + j) for j in range(width)]
        else:
            j = node - height
            edges = [(i, j, i) for i in range(height)]
        for i, j, neighbour in edges:
            index = i * width + j
            if index == entry:
                continue
            if suppressed[i, j]:
                step = 0
            elif ext[i, j] > 0:
                step = int(ext[i, j])
            else:
                continue
            if cost + step < best.get(neighbour, np.inf):
                best[neighbour] = cost + step
                back[neighbour] = (node, index)
                heapq.heappush(queue, (cost + step, neighbour))
    if goal not in best:
        return []
    path = []
    node = goal
    while node != start:
        node, index = back[node]
        path.append(index)
    return path


def _raising_cycle(ext: np.ndarray, suppressed: np.ndarray, entry: int) -> list[int]:
    # The entry is pinned by positivity: find the cheapest cycle along which it goes up by one
    # while every line keeps its total, and every entry that goes down has at least 2 (stays
    # positive). An entry (i, j) is an edge between line-node i (its row) and line-node j (its
    # column), with coefficient -1 in a line where it is the total, +1 otherwise. A state is a
    # node and what the path's last entry adds to that node's line (+1 or -1); leaving by entry
    # f, f moves by minus that over f's coefficient. The cycle closes at the entry's column when
    # the path's contribution there cancels the entry's.
    import heapq

    height, width = ext.shape
    rows, cols = height - 1, width - 1

    def coefficient(i: int, j: int, node: int) -> int:
        if node < height:  # row line i: the row total (last column) is the minus one
            return -1 if j == cols else 1
        return -1 if i == rows else 1

    row, col = divmod(entry, width)
    start, goal = row, height + col
    first = (start, coefficient(row, col, start))
    target = (goal, -coefficient(row, col, goal))
    best = {first: 0}
    back: dict[tuple[int, int], tuple[tuple[int, int], int]] = {}
    queue = [(0, first)]
    while queue:
        cost, state = heapq.heappop(queue)
        if state == target:
            break
        if cost > best.get(state, np.inf):
            continue
        node, added = state
        if node < height:
            edges = [(node, j, height + j) for j in range(width)]
        else:
            edges = [(i, node - height, i) for i in range(height)]
        for i, j, other in edges:
            index = i * width + j
            if index == entry:
                continue
            move = -added * coefficient(i, j, node)
            value = int(ext[i, j])
            if (move < 0 and value < 2) or (not suppressed[i, j] and value == 0):
                continue
            step = 0 if suppressed[i, j] else value
            following = (other, coefficient(i, j, other) * move)
            if cost + step < best.get(following, np.inf):
                best[following] = cost + step
                back[following] = (state, index)
                heapq.heappush(queue, (cost + step, following))
    if target not in best:
        return []
    path: list[int] = []
    state = target
    while state != first:
        state, index = back[state]
        path.append(index)
    return path


def table_equations(table: SuppressedTable) -> np.ndarray:
    """The additivity equations of a table with its margins, one row per line of the table."""
    return _constraint_matrix(table.cells.shape, table.col_totals is not None)
