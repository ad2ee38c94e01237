"""Cohort statistics: filters, counts and cross-tabulations, moments, histograms, quantiles.

Each analysis has a site part (``site_*``: a summary of sums from the site's rows), the merge
(``fedcore.analytics.merge_sums``) and a final part computed from the merged summary.

* Counts and cross-tabulations: integer cells over levels fixed by the request (the schema's
  vocabulary or the plan's list, values outside it in ``"__other__"``), so the merged table is the
  pooled table exactly; it is released through ``disclosure.suppress_table``.
* Moments: n, the sum of (x - shift) and the cross-products of (x - shift) over complete cases.
  ``shift`` is part of the request (the schema bounds' midpoint, say): it cancels exactly in the
  algebra and keeps the subtraction in the variance well conditioned.
* Histograms: counts per bin of fixed edges, as ``numpy.histogram`` (last bin closed), with an
  underflow and an overflow bin.
* Quantiles: federated bisection on counts. The server asks for ``#{x <= t}`` at thresholds
  ``t``; it bisects on the ordered bit patterns of float64, so after at most 64 halvings (16
  rounds of 15 thresholds each) it holds the exact order statistic, a value of the data. The
  requested quantile is then computed from the order statistics as ``numpy.quantile`` does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from fedcore.analytics._sums import Summary, summary
from fedcore.analytics.disclosure import suppress_table
from fedcore.tabular import MISSING_CATEGORY, DatasetSchema

__all__ = [
    "FILTER_OPS",
    "OTHER_LEVEL",
    "QUANTILE_METHODS",
    "Filter",
    "QuantileSearch",
    "apply_filters",
    "check_columns",
    "column_types",
    "crosstab_result",
    "moments_result",
    "parse_filters",
    "site_count_below",
    "site_crosstab",
    "site_histogram",
    "site_moments",
]

OTHER_LEVEL = "__other__"
FILTER_OPS: tuple[str, ...] = (
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "in",
    "not_in",
    "missing",
    "present",
)
_ORDER_OPS = ("lt", "le", "gt", "ge")
QUANTILE_METHODS: tuple[str, ...] = ("linear", "inverted_cdf", "lower", "higher")


def column_types(schema: DatasetSchema | Mapping[str, str]) -> dict[str, str]:
    """Column name -> type ("numeric", "boolean", "categorical") an analysis may use.

    A ``DatasetSchema`` gives its feature columns, its target (categorical) and sensitive
    columns not among the features (categorical); a mapping is taken as it is.
    """
    if isinstance(schema, DatasetSchema):
        types = {column.name: column.type for column in schema.columns}
        types.setdefault(schema.target.column, "categorical")
        for name in schema.sensitive:
            types.setdefault(name, "categorical")
        return types
    return dict(schema)


def check_columns(
    types: Mapping[str, str], columns: Sequence[str], *, numeric: bool = False, what: str
) -> None:
    """Refuse columns not in the schema (or not numeric/boolean where numbers are needed)."""
    for name in columns:
        if name not in types:
            raise ValueError(
                f"{what}: column {name!r} is not in the dataset schema (columns: "
                f"{', '.join(sorted(types))}); use a schema column"
            )
        if numeric and types[name] not in ("numeric", "boolean"):
            raise ValueError(
                f"{what}: column {name!r} is {types[name]}, not numeric; this analysis needs "
                "numbers (declare a numeric column or use a count/cross-tabulation)"
            )


@dataclass(frozen=True)
class Filter:
    """One condition on a column; a cohort is the rows meeting all of a plan's filters."""

    column: str
    op: str
    value: Any = None


def parse_filters(
    data: Sequence[Mapping[str, Any]], types: Mapping[str, str]
) -> tuple[Filter, ...]:
    """Read ``[{"column", "op", "value"}]`` and check it against the schema's column types.

    Raises:
        ValueError: an unknown column or operator, or a value that does not fit; the message
            names the filter (0-based) and says what is allowed.
    """
    filters = []
    for index, item in enumerate(data):
        where = f"filter {index}"
        if not isinstance(item, Mapping):
            raise ValueError(f"{where} must be an object {{column, op, value}}, got {item!r}")
        unknown = sorted(set(item) - {"column", "op", "value"})
        if unknown:
            raise ValueError(f"{where} has unknown key(s) {unknown}; allowed: column, op, value")
        column, op, value = item.get("column"), item.get("op"), item.get("value")
        if not isinstance(column, str):
            raise ValueError(f"{where} needs a 'column' name")
        check_columns(types, [column], what=where)
        if op not in FILTER_OPS:
            raise ValueError(f"{where}: op {op!r} is unknown; allowed: {', '.join(FILTER_OPS)}")
        kind = types[column]
        if op in ("missing", "present"):
            if value is not None:
                raise ValueError(f"{where}: op {op!r} takes no value")
        elif op in ("in", "not_in"):
            if isinstance(value, str) or not isinstance(value, list | tuple) or not value:
                raise ValueError(f"{where}: op {op!r} needs a non-empty list of values")
            value = tuple(_filter_value(v, kind, where) for v in value)
        else:
            if op in _ORDER_OPS and kind == "categorical":
                raise ValueError(
                    f"{where}: op {op!r} compares numbers but column {column!r} is categorical; "
                    "use eq, ne, in or not_in"
                )
            value = _filter_value(value, kind, where)
        filters.append(Filter(column=column, op=op, value=value))
    return tuple(filters)


def _filter_value(value: Any, kind: str, where: str) -> Any:
    if kind == "categorical":
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise ValueError(f"{where}: a categorical value must be a string, got {value!r}")
        return str(value)
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{where}: a {kind} value must be a finite number, got {value!r}")
    return float(value)


def _missing(series: pd.Series) -> np.ndarray:
    if series.dtype == object or pd.api.types.is_string_dtype(series.dtype):
        return np.asarray(series.isna() | (series.astype(str) == MISSING_CATEGORY))
    return np.asarray(series.isna())


def apply_filters(df: pd.DataFrame, filters: Sequence[Filter]) -> np.ndarray:
    """The boolean mask of the rows meeting every filter (a missing value meets only 'missing')."""
    mask = np.ones(len(df), dtype=bool)
    for item in filters:
        if item.column not in df.columns:
            raise ValueError(
                f"filter on column {item.column!r}: the site's data has no such column"
            )
        series = df[item.column]
        missing = _missing(series)
        if item.op == "missing":
            mask &= missing
            continue
        if item.op == "present":
            mask &= ~missing
            continue
        if isinstance(item.value, str) or (
            isinstance(item.value, tuple) and item.value and isinstance(item.value[0], str)
        ):
            values: np.ndarray = series.astype(str).to_numpy()
        else:
            values = pd.to_numeric(series, errors="coerce").to_numpy(dtype=np.float64)
        with np.errstate(invalid="ignore"):
            if item.op == "eq":
                hit = values == item.value
            elif item.op == "ne":
                hit = values != item.value
            elif item.op == "lt":
                hit = values < item.value
            elif item.op == "le":
                hit = values <= item.value
            elif item.op == "gt":
                hit = values > item.value
            elif item.op == "ge":
                hit = values >= item.value
            elif item.op == "in":
                hit = np.isin(values, list(item.value))
            else:
                hit = ~np.isin(values, list(item.value))
        mask &= np.asarray(hit, dtype=bool) & ~missing
    return mask


def _level_index(series: pd.Series, levels: Sequence[str]) -> np.ndarray:
    # Position of each row's value in levels; values outside them go to the last slot
    # (OTHER_LEVEL), missing values to MISSING_CATEGORY if listed, else also to the last slot.
    labels = series.astype(str).to_numpy()
    labels = np.where(_missing(series), MISSING_CATEGORY, labels)
    lookup = {str(level): position for position, level in enumerate(levels)}
    return np.array([lookup.get(label, len(levels)) for label in labels], dtype=np.int64)


def _label_values(series: pd.Series) -> pd.Series:
    # Numbers that are whole (1.0) read as "1", so numeric codes match plan levels "1", "2".
    if pd.api.types.is_numeric_dtype(series.dtype) and not pd.api.types.is_bool_dtype(series.dtype):
        values = series.to_numpy(dtype=np.float64)
        text = [
            MISSING_CATEGORY
            if not np.isfinite(v)
            else (str(int(v)) if float(v).is_integer() else repr(float(v)))
            for v in values
        ]
        return pd.Series(text, index=series.index, dtype=object)
    return series


def site_crosstab(
    df: pd.DataFrame,
    rows: str,
    levels: Mapping[str, Sequence[str]],
    *,
    cols: str | None = None,
    filters: Sequence[Filter] = (),
) -> Summary:
    """Site part of a count table: cells over the requested levels plus ``"__other__"``.

    Args:
        df: the site's validated rows.
        rows: the column whose levels index the table's rows (or its only axis).
        levels: column -> its levels, fixed by the request (not by the site's data), so every
            site's table has the same shape; a value outside them counts in the last level,
            ``"__other__"``. A numeric code 1.0 reads as the level ``"1"``.
        cols: the column of the second axis, for a cross-tabulation.
        filters: the cohort definition.

    Returns:
        ``{"counts": (len(levels[rows]) + 1[, len(levels[cols]) + 1]), "sites": 1}``.
    """
    mask = apply_filters(df, filters)
    selected = df.loc[mask]
    row_index = _level_index(_label_values(selected[rows]), levels[rows])
    if cols is None:
        counts = np.bincount(row_index, minlength=len(levels[rows]) + 1)
        return summary(counts=counts)
    col_index = _level_index(_label_values(selected[cols]), levels[cols])
    shape = (len(levels[rows]) + 1, len(levels[cols]) + 1)
    counts = np.zeros(shape, dtype=np.int64)
    np.add.at(counts, (row_index, col_index), 1)
    return summary(counts=counts)


def crosstab_result(
    merged: Mapping[str, np.ndarray],
    levels: Mapping[str, Sequence[str]],
    rows: str,
    cols: str | None = None,
    *,
    min_cell_count: int,
    drop_empty_other: bool = True,
) -> dict[str, Any]:
    """Release a merged count table with suppression (see ``disclosure.suppress_table``)."""
    counts = np.asarray(merged["counts"], dtype=np.int64)
    row_levels = [*map(str, levels[rows]), OTHER_LEVEL]
    col_levels = None if cols is None else [*map(str, levels[cols]), OTHER_LEVEL]
    if drop_empty_other:
        # "__other__" is released only when some row holds a value outside the levels.
        if counts.ndim == 1:
            if counts[-1] == 0:
                counts, row_levels = counts[:-1], row_levels[:-1]
        else:
            if counts[-1, :].sum() == 0:
                counts, row_levels = counts[:-1, :], row_levels[:-1]
            if counts[:, -1].sum() == 0:
                counts, col_levels = counts[:, :-1], (col_levels or [])[:-1]
    table = suppress_table(counts, min_cell_count)
    out = table.released()
    out["row_levels"] = row_levels
    if col_levels is not None:
        out["col_levels"] = col_levels
    out["sites"] = int(merged["sites"])
    return out


def _complete(df: pd.DataFrame, columns: Sequence[str], filters: Sequence[Filter]) -> np.ndarray:
    mask = apply_filters(df, filters)
    values = df.loc[mask, list(columns)].apply(pd.to_numeric, errors="coerce")
    array = values.to_numpy(dtype=np.float64)
    return array[np.all(np.isfinite(array), axis=1)]


def site_moments(
    df: pd.DataFrame,
    columns: Sequence[str],
    *,
    shift: ArrayLike | None = None,
    filters: Sequence[Filter] = (),
) -> Summary:
    """Site part of mean, variance and correlation over complete cases of ``columns``.

    Returns:
        ``{"n": (), "sum": (p,), "cross": (p, p), "sites": 1}`` with sums of ``x - shift``.
    """
    x = _complete(df, columns, filters)
    center = np.zeros(len(columns)) if shift is None else np.asarray(shift, dtype=np.float64)
    centered = x - center
    return summary(n=len(x), sum=centered.sum(axis=0), cross=centered.T @ centered)


def moments_result(
    merged: Mapping[str, np.ndarray], columns: Sequence[str], *, shift: ArrayLike | None = None
) -> dict[str, Any]:
    """Mean, variance (n - 1), standard deviation, covariance and correlation from merged sums."""
    n = int(merged["n"])
    if n < 2:
        raise ValueError(f"moments need at least 2 complete rows in all; the sites hold {n}")
    center = np.zeros(len(columns)) if shift is None else np.asarray(shift, dtype=np.float64)
    mean_c = np.asarray(merged["sum"], dtype=np.float64) / n
    cov = (np.asarray(merged["cross"], dtype=np.float64) - n * np.outer(mean_c, mean_c)) / (n - 1)
    sd = np.sqrt(np.diag(cov))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = cov / np.outer(sd, sd)
    return {
        "columns": list(columns),
        "n": n,
        "mean": (mean_c + center).tolist(),
        "variance": np.diag(cov).tolist(),
        "sd": sd.tolist(),
        "covariance": cov.tolist(),
        "correlation": corr.tolist(),
        "sites": int(merged["sites"]),
    }


def site_histogram(
    df: pd.DataFrame, column: str, edges: ArrayLike, *, filters: Sequence[Filter] = ()
) -> Summary:
    """Site part of a histogram: ``[underflow, bins..., overflow]`` counts, bins as numpy's."""
    bounds = np.asarray(edges, dtype=np.float64)
    if bounds.ndim != 1 or bounds.size < 2 or np.any(np.diff(bounds) <= 0):
        raise ValueError("histogram edges must be at least two increasing numbers")
    x = _complete(df, [column], filters)[:, 0]
    inside, _ = np.histogram(x, bins=bounds)
    return summary(
        counts=np.concatenate([[np.sum(x < bounds[0])], inside, [np.sum(x > bounds[-1])]])
    )


def site_count_below(
    df: pd.DataFrame, column: str, thresholds: ArrayLike, *, filters: Sequence[Filter] = ()
) -> Summary:
    """Site part of one bisection round: ``n`` and ``#{x <= t}`` for every threshold ``t``."""
    x = np.sort(_complete(df, [column], filters)[:, 0])
    points = np.asarray(thresholds, dtype=np.float64)
    return summary(n=len(x), le=np.searchsorted(x, points, side="right"))


_SIGN = np.int64(0x7FFFFFFFFFFFFFFF)


def _key(value: float) -> int:
    # float64 -> int64 in the same order (negative floats have their magnitude bits flipped).
    bits = int(np.array(value, dtype=np.float64).view(np.int64))
    return bits ^ int(_SIGN) if bits < 0 else bits


def _float(key: int) -> float:
    bits = key ^ int(_SIGN) if key < 0 else key
    return float(np.array(bits, dtype=np.int64).view(np.float64)) + 0.0


class QuantileSearch:
    """The server side of exact federated quantiles: which thresholds to ask, then the answer.

    Usage: ``while not search.done: merged = merge_sums([site_count_below(..., search.thresholds())
    for each site]); search.update(merged)``; then ``search.result()``.
    """

    def __init__(
        self,
        probs: Sequence[float],
        *,
        method: str = "linear",
        probes_per_round: int = 15,
        min_cell_count: int = 1,
    ) -> None:
        """Start a search.

        Args:
            probs: the quantile levels, each in [0, 1].
            method: as ``numpy.quantile``'s ``method``: one of ``QUANTILE_METHODS``.
            probes_per_round: thresholds asked per unresolved order statistic per round.
            min_cell_count: an order statistic with fewer than this many rows below or above
                it (the minimum or maximum, say) is refused: it would be one patient's value.
        """
        if method not in QUANTILE_METHODS:
            raise ValueError(f"quantile method {method!r} unknown; use one of {QUANTILE_METHODS}")
        for p in probs:
            if not (isinstance(p, int | float) and 0.0 <= p <= 1.0):
                raise ValueError(f"quantile level {p!r} must be a number in [0, 1]")
        if probes_per_round < 1:
            raise ValueError("probes_per_round must be at least 1")
        self.probs = tuple(float(p) for p in probs)
        self.method = method
        self.probes = probes_per_round
        self.min_cell_count = min_cell_count
        self.n: int | None = None
        self.rounds = 0
        # order statistic k (1-based) -> (lo, hi) keys with count(lo) < k <= count(hi)
        self._bounds: dict[int, tuple[int, int]] = {}
        self._asked: np.ndarray = np.array([], dtype=np.float64)
        self._asked_keys: list[int] = []

    @property
    def done(self) -> bool:
        """True once every needed order statistic is exact."""
        return self.n is not None and all(hi - lo == 1 for lo, hi in self._bounds.values())

    def thresholds(self) -> np.ndarray:
        """The thresholds to ask every site about in the next round."""
        if self.n is None:
            spans = [(_key(-math.inf), _key(math.inf))]
        else:
            spans = sorted({b for b in self._bounds.values() if b[1] - b[0] > 1})
        keys: set[int] = set()
        for lo, hi in spans:
            width = hi - lo
            if width - 1 <= self.probes:
                keys.update(range(lo + 1, hi))
                continue
            for step in range(1, self.probes + 1):
                keys.add(lo + (width * step) // (self.probes + 1))
        self._asked_keys = sorted(keys)
        self._asked = np.array([_float(k) for k in self._asked_keys], dtype=np.float64)
        return self._asked.copy()

    def _indices(self, n: int, p: float) -> tuple[int, int, float]:
        # The 1-based order statistics below and above, and the weight, computed exactly as
        # numpy.quantile does (its virtual index (n - 1) p, gamma its fractional part).
        if self.method == "inverted_cdf":
            k = min(n, max(1, math.ceil(n * p)))
            return k, k, 0.0
        virtual = (n - 1) * p
        below = min(n - 1, max(0, math.floor(virtual)))
        if self.method == "lower":
            return below + 1, below + 1, 0.0
        if self.method == "higher":
            above = min(n - 1, max(0, math.ceil(virtual)))
            return above + 1, above + 1, 0.0
        return below + 1, min(n - 1, below + 1) + 1, virtual - math.floor(virtual)

    def _needed(self, n: int) -> list[int]:
        ks: set[int] = set()
        for p in self.probs:
            below, above, _ = self._indices(n, p)
            ks.update((below, above))
        return sorted(ks)

    def update(self, merged: Mapping[str, np.ndarray]) -> None:
        """Take the merged answer to the last ``thresholds()``."""
        n = int(merged["n"])
        counts = np.asarray(merged["le"], dtype=np.int64)
        if counts.shape != (len(self._asked_keys),):
            raise ValueError("the merged answer does not match the thresholds asked")
        if self.n is None:
            if n == 0:
                raise ValueError("no rows at any site: no quantile to compute")
            self.n = n
            for k in self._needed(n):
                if k < self.min_cell_count or n - k + 1 < self.min_cell_count:
                    raise ValueError(
                        f"the quantile needs the {k}-th of {n} values, fewer than "
                        f"{self.min_cell_count} rows from an end: it would reveal one "
                        "patient's value; ask for a less extreme quantile"
                    )
                self._bounds[k] = (_key(-math.inf), _key(math.inf))
        elif n != self.n:
            raise ValueError(f"the sites' row count changed during the search ({self.n} -> {n})")
        for key, count in zip(self._asked_keys, counts, strict=True):
            for k, (lo, hi) in self._bounds.items():
                if lo < key < hi:
                    self._bounds[k] = (key, hi) if count < k else (lo, key)
        self.rounds += 1

    def order_statistic(self, k: int) -> float:
        """The exact k-th smallest value (1-based) once found."""
        lo, hi = self._bounds[k]
        if hi - lo != 1:
            raise ValueError(f"order statistic {k} is not resolved yet")
        return _float(hi)

    def result(self) -> dict[str, Any]:
        """The quantiles, as ``numpy.quantile(pooled, probs, method=...)`` gives them."""
        if not self.done or self.n is None:
            raise ValueError("the search has not finished")
        n = self.n
        values = []
        for p in self.probs:
            k_below, k_above, g = self._indices(n, p)
            below, above = self.order_statistic(k_below), self.order_statistic(k_above)
            # numpy's _lerp: a + (b - a) t, from the other end when t >= 0.5 (same rounding)
            diff = above - below
            values.append(below + diff * g if g < 0.5 else above - diff * (1 - g))
        return {
            "probs": list(self.probs),
            "values": values,
            "n": n,
            "rounds": self.rounds,
            "method": self.method,
        }
