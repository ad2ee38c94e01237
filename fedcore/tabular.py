"""Tabular datasets: schema, validation of local data, holdout split and federated preprocessing.

The flow at a site: ``load_table`` -> ``split_holdout`` (which validates) -> ``local_statistics``
on the training part, sent to the server. The server calls ``merge_statistics`` on every site's
statistics -- never on rows -- and sends the resulting "fitted preprocessing" back; each site then
calls ``transform`` to get float32 features, labels and sensitive groups.

Conventions:

* Row numbers in error messages count data rows from 1 in the frame given (header excluded, so
  CSV line = row + 1).
* Missing values are the cells whose stripped text is one of ``MISSING_TOKENS`` (the empty
  cell, "?", NA, N/A, n/a, NaN, nan, NULL, null, None and the rest of pandas' default NA
  spellings, pinned here so that a pandas upgrade cannot change them), and NaN/None in a
  Parquet file. The same set is used when reading a CSV, when validating any frame and by the
  schema inference of ``quorum-agent init`` (docs/site-onboarding.md). Per column policy: "impute" (numeric -> the
  federated mean, i.e. 0 after standardising; categorical -> the category ``"__missing__"``;
  boolean -> 0), "drop" (the row is removed by ``validate_frame``, so statistics, split and
  transform all see the same rows) or "error" (refused, naming column and row).
* Text values are stripped of surrounding white space. Booleans accept t/f, true/false, yes/no,
  y/n, 1/0 in any case.
* Numeric columns are standardised with the federated mean and population standard deviation
  (after the optional ``log1p``); a constant column (std 0) is divided by 1 instead. A numeric
  column with ``"scale": "none"`` is used as it is (after the optional ``log1p``; a missing value
  becomes the federated mean): for features a site has already prepared itself, e.g.
  standardised with its own statistics.
* A plan may fix each row's part itself (``split_by_column``): a data column holding "train" or
  "test" per row, instead of the seeded holdout split of ``split_holdout``.
* Categorical columns are one-hot encoded over their vocabulary: the schema's declared
  ``categories`` when given (plus ``"__missing__"`` under the "impute" policy), else the values
  whose count pooled over all sites reaches the schema's ``min_category_count`` (at most
  ``max_categories`` of them). A site reports a count per value, and only for values it holds at
  least its own minimum times, so a rare value at one site is never named to the server. Every
  value is checked by ``category_value_problem`` (length and characters) at the site and at the
  server. A category unknown to the fitted preprocessing (undeclared, too rare, or from a site
  that joined later) encodes as an all-zero row, like scikit-learn's
  ``OneHotEncoder(handle_unknown="ignore")``.
* Numeric statistics may be released with Laplace noise (``local_statistics(epsilon=...)``,
  the plan's ``privacy.statistics_epsilon``): the values are clipped to the column's declared
  ``min``/``max`` and count, sum and sum of squares are noised (docs/privacy.md).
* Sensitive attributes are schema columns (categorical or boolean) or other columns of the data;
  their group labels are the stripped strings ("true"/"false" for booleans, ``"__missing__"``
  for missing values). They are never features unless also declared as a schema column.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "BOOLEAN_TOKENS",
    "CATEGORY_FORBIDDEN",
    "COLUMN_TYPES",
    "DEFAULT_MAX_CATEGORIES",
    "DEFAULT_MIN_CATEGORY_COUNT",
    "MAX_CATEGORY_LENGTH",
    "MISSING_CATEGORY",
    "MISSING_POLICIES",
    "MISSING_TOKENS",
    "SCALINGS",
    "SPLIT_VALUES",
    "TASKS",
    "TRANSFORMS",
    "ColumnSpec",
    "DataValidationError",
    "DatasetSchema",
    "SchemaError",
    "TabularData",
    "TargetSpec",
    "category_value_problem",
    "check_site_statistics",
    "check_target",
    "feature_names",
    "load_table",
    "local_statistics",
    "merge_moments",
    "merge_statistics",
    "missing_mask",
    "parse_column",
    "schema_hash",
    "split_by_column",
    "split_holdout",
    "target_scale",
    "transform",
    "transform_labels",
    "undeclared_categories",
    "validate_frame",
]

COLUMN_TYPES: tuple[str, ...] = ("numeric", "categorical", "boolean")
TRANSFORMS: tuple[str, ...] = ("none", "log1p")
SCALINGS: tuple[str, ...] = ("standard", "none")
SPLIT_VALUES: tuple[str, ...] = ("train", "test")
MISSING_POLICIES: tuple[str, ...] = ("impute", "drop", "error")
MISSING_CATEGORY = "__missing__"
# The one set of missing-value spellings (case-sensitive, after stripping white space): "" and
# "?" plus pandas' default NA strings of pandas 2.x/3.x, written out so that they do not change
# with pandas. "None" and "null" count; "-", "0", "unknown" and "n.a." do not.
MISSING_TOKENS: tuple[str, ...] = (
    "",
    "?",
    "NA",
    "N/A",
    "n/a",
    "#N/A",
    "#N/A N/A",
    "#NA",
    "<NA>",
    "NaN",
    "nan",
    "-NaN",
    "-nan",
    "NULL",
    "null",
    "None",
    "1.#IND",
    "-1.#IND",
    "1.#QNAN",
    "-1.#QNAN",
)
BOOLEAN_TOKENS: dict[str, float] = {
    "t": 1.0,
    "true": 1.0,
    "yes": 1.0,
    "y": 1.0,
    "1": 1.0,
    "1.0": 1.0,  # a float column written by pandas or R (UCI's heart disease files)
    "f": 0.0,
    "false": 0.0,
    "no": 0.0,
    "n": 0.0,
    "0": 0.0,
    "0.0": 0.0,
}
PREPROCESSING_VERSION = 1
DEFAULT_MAX_CATEGORIES = 64
MAX_MAX_CATEGORIES = 1024
DEFAULT_MIN_CATEGORY_COUNT = 5
MAX_CATEGORY_LENGTH = 64
# Printable characters only (no control or line-separator characters), and none of these: they
# make markup or quoting in the pages, logs and model cards that show category names.
CATEGORY_FORBIDDEN = "<>&\"'`\\"
_BOOLEAN_HELP = (
    "use t/f, true/false, yes/no, y/n, 1/0 or 1.0/0.0 (any case), or an empty cell for missing"
)


class SchemaError(ValueError):
    """A dataset schema or a fitted preprocessing spec is itself invalid."""


def category_value_problem(value: object) -> str | None:
    """Why ``value`` may not be a category name (None when it may): the one rule, used by the
    schema, by the site before it sends statistics and by the server on receipt.

    A category is a string of 1 to ``MAX_CATEGORY_LENGTH`` printable characters (no control
    or line-separator characters), without surrounding white space and without any of
    ``CATEGORY_FORBIDDEN`` (< > & " ' ` and backslash).
    """
    if not isinstance(value, str):
        return f"is not a string ({type(value).__name__})"
    if not value or value != value.strip():
        return "is empty or has surrounding white space"
    if len(value) > MAX_CATEGORY_LENGTH:
        return f"is longer than {MAX_CATEGORY_LENGTH} characters ({len(value)})"
    if not value.isprintable():
        return "has a control or non-printable character"
    bad = sorted(set(value) & set(CATEGORY_FORBIDDEN))
    if bad:
        return f"has the forbidden character(s) {' '.join(bad)} (not allowed: {CATEGORY_FORBIDDEN})"
    return None


def _shown(value: object) -> str:
    """A refused value as it may appear in a message: repr (escapes controls), cut to 40."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class DataValidationError(ValueError):
    """Local data does not match the schema; the message names column, problem and a row.

    The message may quote a cell value, for the site operator. ``shareable`` is the same message
    without any cell value: what a site agent may tell the server (no record leaves a site, not
    even one cell of it in an error message).
    """

    def __init__(self, message: str, *, shareable: str | None = None) -> None:
        super().__init__(message)
        self.shareable = message if shareable is None else shareable


# --------------------------------------------------------------------------------------------
# Schema


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise SchemaError(f"{what} must be a non-empty string, got {value!r}")
    return value


def _check_keys(
    data: object, allowed: tuple[str, ...], required: tuple[str, ...], what: str
) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise SchemaError(f"{what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(str(key) for key in data if key not in allowed)
    if unknown:
        raise SchemaError(
            f"{what}: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed keys: {', '.join(allowed)}"
        )
    absent = [key for key in required if key not in data]
    if absent:
        raise SchemaError(f"{what}: required key(s) {', '.join(map(repr, absent))} missing")
    return data


@dataclass(frozen=True)
class ColumnSpec:
    """One feature column: its type, optional transform and missing-value policy."""

    name: str
    type: str
    transform: str = "none"
    missing: str = "impute"
    scale: str = "standard"
    categories: tuple[str, ...] | None = None  # categorical: the declared vocabulary
    minimum: float | None = None  # numeric: clipping bounds (JSON "min"/"max", raw units)
    maximum: float | None = None

    def __post_init__(self) -> None:
        """Validate the column spec."""
        _check_name(self.name, "column name")
        where = f"column {self.name!r}"
        self._check_vocabulary(where)
        self._check_bounds(where)
        if self.type not in COLUMN_TYPES:
            raise SchemaError(
                f"{where}: type {self.type!r} is not supported; allowed: {', '.join(COLUMN_TYPES)}"
            )
        if self.transform not in TRANSFORMS:
            raise SchemaError(
                f"{where}: transform {self.transform!r} is not supported; "
                f"allowed: {', '.join(TRANSFORMS)}"
            )
        if self.transform != "none" and self.type != "numeric":
            raise SchemaError(
                f"{where}: transform {self.transform!r} applies to numeric columns only; "
                f"this column is {self.type}"
            )
        if self.missing not in MISSING_POLICIES:
            raise SchemaError(
                f"{where}: missing policy {self.missing!r} is not supported; "
                f"allowed: {', '.join(MISSING_POLICIES)}"
            )
        if self.scale not in SCALINGS:
            raise SchemaError(
                f"{where}: scale {self.scale!r} is not supported; allowed: {', '.join(SCALINGS)}"
            )
        if self.scale != "standard" and self.type != "numeric":
            raise SchemaError(
                f"{where}: scale {self.scale!r} applies to numeric columns only (booleans and "
                f"one-hot categories are never scaled); this column is {self.type}"
            )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ColumnSpec:
        """Build a column spec from its JSON form.

        Args:
            data: ``{"name", "type", "transform" (default "none"), "missing" (default
                "impute"), "scale" (numeric only: "standard", the default, or "none")}``.

        Raises:
            SchemaError: unknown or missing keys, or invalid values.
        """
        what = f"column {data.get('name')!r}" if isinstance(data, Mapping) else "column"
        data = _check_keys(
            data,
            ("name", "type", "transform", "missing", "scale", "categories", "min", "max"),
            ("name", "type"),
            what,
        )
        categories = data.get("categories")
        if categories is not None and (
            isinstance(categories, str) or not isinstance(categories, Sequence)
        ):
            raise SchemaError(f"{what}: 'categories' must be a list of strings, got {categories!r}")
        return cls(
            name=data["name"],
            type=data["type"],
            transform=data.get("transform", "none"),
            missing=data.get("missing", "impute"),
            scale=data.get("scale", "standard"),
            categories=None if categories is None else tuple(categories),
            minimum=data.get("min"),
            maximum=data.get("max"),
        )

    def _check_vocabulary(self, where: str) -> None:
        if self.categories is None:
            return
        if self.type != "categorical":
            raise SchemaError(f"{where}: 'categories' applies to categorical columns only")
        values = tuple(self.categories)
        if not values:
            raise SchemaError(f"{where}: 'categories' must list at least one value")
        if len(values) > MAX_MAX_CATEGORIES:
            raise SchemaError(
                f"{where}: 'categories' lists {len(values)} values; at most {MAX_MAX_CATEGORIES}"
            )
        for value in values:
            if (problem := category_value_problem(value)) is not None:
                raise SchemaError(f"{where}: category {_shown(value)} {problem}")
            if value == MISSING_CATEGORY:
                raise SchemaError(
                    f"{where}: {MISSING_CATEGORY!r} is not declared; the 'impute' policy adds it"
                )
        if len(set(values)) != len(values):
            raise SchemaError(f"{where}: 'categories' lists a value twice: {list(values)!r}")
        object.__setattr__(self, "categories", values)

    def _check_bounds(self, where: str) -> None:
        low, high = self.minimum, self.maximum
        if low is None and high is None:
            return
        if self.type != "numeric":
            raise SchemaError(f"{where}: 'min' and 'max' apply to numeric columns only")
        if low is None or high is None:
            raise SchemaError(
                f"{where}: give both 'min' and 'max' (the clipping bounds) or neither"
            )
        for key, value in (("min", low), ("max", high)):
            if not _is_finite(value):
                raise SchemaError(f"{where}: {key!r} must be a finite number, got {value!r}")
        if not low < high:
            raise SchemaError(f"{where}: 'min' ({low!r}) must be below 'max' ({high!r})")
        if self.transform == "log1p" and low <= -1:
            raise SchemaError(f"{where}: with transform 'log1p', 'min' must be above -1")

    def vocabulary(self) -> tuple[str, ...] | None:
        """The declared categories and ``"__missing__"`` when imputed (None: not declared)."""
        if self.categories is None:
            return None
        extra = (MISSING_CATEGORY,) if self.missing == "impute" else ()
        return tuple(sorted((*self.categories, *extra)))

    def bounds(self) -> tuple[float, float] | None:
        """The clipping bounds after the transform, or None when not declared."""
        if self.minimum is None or self.maximum is None:
            return None
        low, high = float(self.minimum), float(self.maximum)
        if self.transform == "log1p":
            return math.log1p(low), math.log1p(high)
        return low, high

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form: every key present, except ``scale`` when it is the default and
        ``categories``/``min``/``max`` when not given.

        (Leaving them out keeps the hashes of schemas written before those keys existed.)
        """
        result = {
            "name": self.name,
            "type": self.type,
            "transform": self.transform,
            "missing": self.missing,
        }
        if self.scale != "standard":
            result["scale"] = self.scale
        if self.categories is not None:
            result["categories"] = list(self.categories)
        if self.minimum is not None:
            result["min"] = self.minimum
            result["max"] = self.maximum
        return result


def _value_tuple(values: object, key: str) -> tuple[str, ...] | None:
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise SchemaError(f"target {key!r} must be a list of strings, got {values!r}")
    result = tuple(values)
    if not result:
        raise SchemaError(f"target {key!r} must list at least one value")
    for value in result:
        if not isinstance(value, str) or not value.strip():
            raise SchemaError(f"target {key!r}: {value!r} is not a non-empty string")
        if value != value.strip():
            raise SchemaError(
                f"target {key!r}: {value!r} has surrounding white space; data values are "
                "stripped before comparison, so write it without"
            )
    if len(set(result)) != len(result):
        raise SchemaError(f"target {key!r} lists a value twice: {list(result)!r}")
    return result


TASKS: tuple[str, ...] = ("binary", "multiclass", "regression")
MAX_CLASSES = 256


@dataclass(frozen=True)
class TargetSpec:
    """The label column and the prediction task on it.

    * ``task="binary"`` (the default): which values are label 1, ``positive`` (label 1 = a value
      in the list) or ``negative`` (label 1 = a value not in the list).
    * ``task="multiclass"``: ``classes``, the declared class values in order; label ``k`` is
      ``classes[k]``. A value outside the list is refused at the site.
    * ``task="regression"``: a numeric target; ``standardize`` makes the model learn
      ``(y - mean) / std`` with the federated mean and standard deviation of the training rows
      (predictions are mapped back before any metric).
    """

    column: str
    positive: tuple[str, ...] | None = None
    negative: tuple[str, ...] | None = None
    task: str = "binary"
    classes: tuple[str, ...] | None = None
    standardize: bool = False

    def __post_init__(self) -> None:
        """Validate and normalise value lists to tuples."""
        _check_name(self.column, "target column")
        if self.task not in TASKS:
            raise SchemaError(
                f"target {self.column!r}: task {self.task!r} is not one of {', '.join(TASKS)}"
            )
        positive = _value_tuple(self.positive, "positive")
        negative = _value_tuple(self.negative, "negative")
        classes = _value_tuple(self.classes, "classes")
        if not isinstance(self.standardize, bool):
            raise SchemaError(
                f"target {self.column!r}: 'standardize' must be true or false, got "
                f"{self.standardize!r}"
            )
        if self.task == "binary":
            if (positive is None) == (negative is None):
                raise SchemaError(
                    f"target {self.column!r}: give exactly one of 'positive' (label 1 = value "
                    "in the list) or 'negative' (label 1 = value not in the list)"
                )
        elif positive is not None or negative is not None:
            raise SchemaError(
                f"target {self.column!r}: 'positive' and 'negative' belong to task 'binary'; "
                f"task {self.task!r} does not take them"
            )
        if self.task == "multiclass":
            if classes is None or not 2 <= len(classes) <= MAX_CLASSES:
                raise SchemaError(
                    f"target {self.column!r}: task 'multiclass' needs 'classes', the list of "
                    f"2 to {MAX_CLASSES} class values in order"
                )
            for value in classes:
                if (problem := category_value_problem(value)) is not None:
                    raise SchemaError(f"target {self.column!r}: class {_shown(value)} {problem}")
        elif classes is not None:
            raise SchemaError(
                f"target {self.column!r}: 'classes' belongs to task 'multiclass' (task is "
                f"{self.task!r})"
            )
        if self.standardize and self.task != "regression":
            raise SchemaError(
                f"target {self.column!r}: 'standardize' applies to task 'regression' only "
                f"(task is {self.task!r})"
            )
        object.__setattr__(self, "positive", positive)
        object.__setattr__(self, "negative", negative)
        object.__setattr__(self, "classes", classes)

    @property
    def n_outputs(self) -> int:
        """The width of the model's output: one logit (binary), one per class, one value."""
        return len(self.classes or ()) if self.task == "multiclass" else 1

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TargetSpec:
        """Build a target spec from its JSON form.

        ``{"column", "positive" | "negative"}`` (binary; ``"task": "binary"`` may be given),
        ``{"column", "task": "multiclass", "classes"}`` or ``{"column", "task": "regression",
        "standardize"}``.

        Args:
            data: the JSON form.

        Raises:
            SchemaError: unknown keys, keys of another task, or invalid values.
        """
        data = _check_keys(
            data,
            ("column", "task", "positive", "negative", "classes", "standardize"),
            ("column",),
            "target",
        )
        return cls(
            column=data["column"],
            positive=data.get("positive"),
            negative=data.get("negative"),
            task=data.get("task", "binary"),
            classes=data.get("classes"),
            standardize=data.get("standardize", False),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (binary: without ``task``, so schema hashes stay as they were)."""
        if self.task == "multiclass":
            return {"column": self.column, "task": self.task, "classes": list(self.classes or ())}
        if self.task == "regression":
            result: dict[str, Any] = {"column": self.column, "task": self.task}
            if self.standardize:
                result["standardize"] = True
            return result
        if self.positive is not None:
            return {"column": self.column, "positive": list(self.positive)}
        return {"column": self.column, "negative": list(self.negative or ())}


@dataclass(frozen=True)
class DatasetSchema:
    """Feature columns, target and sensitive attributes a training plan expects of every site."""

    columns: tuple[ColumnSpec, ...]
    target: TargetSpec
    sensitive: tuple[str, ...] = ()
    max_categories: int = DEFAULT_MAX_CATEGORIES  # undeclared categorical columns: the cap
    min_category_count: int = DEFAULT_MIN_CATEGORY_COUNT  # pooled count to reveal a value

    def __post_init__(self) -> None:
        """Validate cross-column rules and normalise lists to tuples."""
        if not _is_count(self.max_categories) or not 1 <= self.max_categories <= MAX_MAX_CATEGORIES:
            raise SchemaError(
                f"schema 'max_categories' must be an integer in [1, {MAX_MAX_CATEGORIES}], "
                f"got {self.max_categories!r}"
            )
        if not _is_count(self.min_category_count) or self.min_category_count < 1:
            raise SchemaError(
                f"schema 'min_category_count' must be an integer >= 1, got "
                f"{self.min_category_count!r}"
            )
        columns = tuple(self.columns)
        if not columns:
            raise SchemaError("schema needs at least one feature column")
        for column in columns:
            if not isinstance(column, ColumnSpec):
                raise SchemaError(f"schema columns must be ColumnSpec, got {column!r}")
        names = [column.name for column in columns]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise SchemaError(f"schema declares column(s) {duplicates!r} more than once")
        if not isinstance(self.target, TargetSpec):
            raise SchemaError(f"schema target must be a TargetSpec, got {self.target!r}")
        if self.target.column in names:
            raise SchemaError(
                f"target column {self.target.column!r} is also declared as a feature column; "
                "remove it from 'columns' (the label must not be a feature)"
            )
        if isinstance(self.sensitive, str) or not isinstance(self.sensitive, Sequence):
            raise SchemaError(f"'sensitive' must be a list of column names, got {self.sensitive!r}")
        sensitive = tuple(self.sensitive)
        by_name = {column.name: column for column in columns}
        for name in sensitive:
            _check_name(name, "sensitive column")
            if name == self.target.column:
                raise SchemaError(f"sensitive column {name!r} is the target column")
            if name in by_name and by_name[name].type == "numeric":
                raise SchemaError(
                    f"sensitive column {name!r} is numeric; groups need discrete values: "
                    "declare a categorical column (an age band, say) for it"
                )
        if len(set(sensitive)) != len(sensitive):
            raise SchemaError(f"'sensitive' lists a column twice: {list(sensitive)!r}")
        object.__setattr__(self, "columns", columns)
        object.__setattr__(self, "sensitive", sensitive)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DatasetSchema:
        """Build a schema from its JSON form.

        Args:
            data: ``{"columns": [{"name", "type", "transform", "missing", "scale",
                "categories", "min", "max"}, ...], "target": {"column", "positive" |
                "negative"}, "sensitive": [...], "max_categories", "min_category_count"}``;
                all but columns, target and the column's name and type are optional.

        Raises:
            SchemaError: the schema is malformed; the message names the key or column.
        """
        data = _check_keys(
            data,
            ("columns", "target", "sensitive", "max_categories", "min_category_count"),
            ("columns", "target"),
            "schema",
        )
        columns = data["columns"]
        if isinstance(columns, str) or not isinstance(columns, Sequence):
            raise SchemaError(f"schema 'columns' must be a list of column objects, got {columns!r}")
        sensitive = data.get("sensitive", [])
        if isinstance(sensitive, str) or not isinstance(sensitive, Sequence):
            raise SchemaError(f"'sensitive' must be a list of column names, got {sensitive!r}")
        return cls(
            columns=tuple(ColumnSpec.from_dict(column) for column in columns),
            target=TargetSpec.from_dict(data["target"]),
            sensitive=tuple(sensitive),
            max_categories=data.get("max_categories", DEFAULT_MAX_CATEGORIES),
            min_category_count=data.get("min_category_count", DEFAULT_MIN_CATEGORY_COUNT),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form (round-trips through ``from_dict``; defaults left out)."""
        result: dict[str, Any] = {
            "columns": [column.to_dict() for column in self.columns],
            "target": self.target.to_dict(),
            "sensitive": list(self.sensitive),
        }
        if self.max_categories != DEFAULT_MAX_CATEGORIES:
            result["max_categories"] = self.max_categories
        if self.min_category_count != DEFAULT_MIN_CATEGORY_COUNT:
            result["min_category_count"] = self.min_category_count
        return result


def schema_hash(schema: DatasetSchema) -> str:
    """Return the hex SHA-256 of the schema's canonical JSON (sorted keys, compact).

    Args:
        schema: the dataset schema; statistics and fitted preprocessing carry this hash so data
            prepared for one schema is never used with another.
    """
    text = json.dumps(schema.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True, eq=False)
class TabularData:
    """Model-ready arrays of one frame: features, labels and sensitive group labels."""

    X: np.ndarray
    y: np.ndarray
    groups: dict[str, np.ndarray]


# --------------------------------------------------------------------------------------------
# Reading and validating local data


def load_table(path: str | PathLike[str]) -> pd.DataFrame:
    """Read a local table; CSV columns are all read as strings.

    Args:
        path: a ``.csv`` (optionally ``.csv.gz``) or ``.parquet`` file. CSV cells are read with
            ``dtype=str``; cells spelled as one of ``MISSING_TOKENS`` become NaN.

    Returns:
        The raw frame, to pass to ``validate_frame`` / ``split_holdout``.

    Raises:
        ValueError: the suffix is neither .csv nor .parquet.
        FileNotFoundError: the file does not exist.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".csv", ".csv.gz")):
        return pd.read_csv(path, dtype=str, keep_default_na=False, na_values=list(MISSING_TOKENS))
    if name.endswith((".parquet", ".pq")):
        return pd.read_parquet(path)
    raise ValueError(f"cannot read {str(path)!r}: use a .csv or .parquet file")


def missing_mask(series: pd.Series) -> np.ndarray:
    """Which cells of a raw column are missing: NaN/None, or text in ``MISSING_TOKENS``."""
    missing = series.isna().to_numpy(dtype=bool)
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        return missing
    stripped = series.astype(str).str.strip()
    return missing | stripped.isin(MISSING_TOKENS).to_numpy(dtype=bool)


def _stripped_text(series: pd.Series, missing: np.ndarray) -> np.ndarray:
    text = series.astype(str).str.strip().to_numpy(dtype=object, copy=True)
    text[missing] = None
    return text


def _first_bad(column: str, series: pd.Series, bad: np.ndarray) -> tuple[int, object, str]:
    positions = np.flatnonzero(bad)
    position = int(positions[0])
    extra = f" ({positions.size} such values in column {column!r})" if positions.size > 1 else ""
    return position + 1, series.iloc[position], extra


def _parse_numeric(series: pd.Series, column: ColumnSpec) -> tuple[np.ndarray, np.ndarray]:
    missing = missing_mask(series)
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
    else:
        text = series.astype(str).str.strip().where(~missing)
        values = pd.to_numeric(text, errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan, copy=True
        )
    bad = ~missing & ~np.isfinite(values)
    if bad.any():
        row, value, extra = _first_bad(column.name, series, bad)
        try:
            float(str(value).strip())
            problem = "is not a finite number"
        except ValueError:
            problem = "is not numeric"
        raise DataValidationError(
            f"column {column.name!r}: value {value!r} at row {row} {problem}{extra}; fix the "
            "value, leave the cell empty to mark it missing, or declare the column categorical",
            shareable=f"column {column.name!r}: a value at row {row} {problem}",
        )
    if column.transform == "log1p":
        negative = ~missing & (values < 0)
        if negative.any():
            row, value, extra = _first_bad(column.name, series, negative)
            raise DataValidationError(
                f"column {column.name!r}: value {value!r} at row {row} is negative, but the "
                f"column's transform 'log1p' needs values >= 0{extra}; fix the data or use "
                "transform 'none'",
                shareable=f"column {column.name!r}: a negative value at row {row} (log1p needs >= 0)",
            )
    values[missing] = np.nan
    return values, missing


def _parse_boolean(series: pd.Series, column: ColumnSpec) -> tuple[np.ndarray, np.ndarray]:
    missing = missing_mask(series)
    if pd.api.types.is_numeric_dtype(series) or pd.api.types.is_bool_dtype(series):
        values = series.to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        bad = ~missing & ~np.isin(values, (0.0, 1.0))
    else:
        tokens = series.astype(str).str.strip().str.lower().where(~missing)
        values = tokens.map(BOOLEAN_TOKENS).to_numpy(dtype=np.float64, na_value=np.nan, copy=True)
        bad = ~missing & np.isnan(values)
    if bad.any():
        row, value, extra = _first_bad(column.name, series, bad)
        raise DataValidationError(
            f"column {column.name!r}: token {value!r} at row {row} is not a boolean{extra}; "
            f"{_BOOLEAN_HELP}",
            shareable=f"column {column.name!r}: the value at row {row} is not a boolean",
        )
    values[missing] = np.nan
    return values, missing


def parse_column(series: pd.Series, column: ColumnSpec) -> tuple[np.ndarray, np.ndarray]:
    """Parse one raw column as ``validate_frame`` does: ``(values, missing)``.

    Numeric and boolean columns give float64 values (NaN where missing); categorical columns
    give the stripped strings (None where missing). The missing policy is not applied.

    Raises:
        DataValidationError: a value does not parse (the message names column, first row and
            how many such values there are).
    """
    if column.type == "numeric":
        return _parse_numeric(series, column)
    if column.type == "boolean":
        return _parse_boolean(series, column)
    missing = missing_mask(series)
    return _stripped_text(series, missing), missing


def _check_missing_policy(column: ColumnSpec, missing: np.ndarray) -> None:
    if column.missing == "error" and missing.any():
        positions = np.flatnonzero(missing)
        raise DataValidationError(
            f"column {column.name!r}: missing value at row {int(positions[0]) + 1} "
            f"({positions.size} missing in this column) and the schema's missing policy for it "
            "is 'error'; fill the values in or set the column's missing policy to 'impute' or "
            "'drop'"
        )


def validate_frame(df: pd.DataFrame, schema: DatasetSchema) -> pd.DataFrame:
    """Check local data against the schema and return a typed copy.

    Idempotent: validating the returned frame again gives the same frame, so the functions
    below can be given raw or already validated frames.

    Args:
        df: the local table (typically from ``load_table``); extra columns are ignored.
        schema: the dataset schema of the training plan.

    Returns:
        A new frame, original index kept, with only the schema columns (numeric: float64 with
        NaN for missing, before any transform; boolean: float64 0/1 with NaN for missing;
        categorical: stripped str with ``"__missing__"`` for missing), the target column
        (stripped str) and sensitive columns not in the schema (stripped str, ``"__missing__"``
        for missing). Rows with a missing value in a column whose policy is "drop" are removed.

    Raises:
        DataValidationError: a column is absent, a value cannot be parsed, a log1p column holds a
            negative value, a target is missing, or a value is missing where the policy is
            "error". The message names the column and the first offending row (1-based).
    """
    if not isinstance(df, pd.DataFrame):
        raise DataValidationError(f"expected a pandas DataFrame, got {type(df).__name__}")
    feature_columns = [column.name for column in schema.columns]
    extra_sensitive = [name for name in schema.sensitive if name not in feature_columns]
    needed = [*feature_columns, schema.target.column, *extra_sensitive]
    absent = [name for name in needed if name not in df.columns]
    if absent:
        present = [str(name) for name in df.columns]
        shown = ", ".join(present[:20]) + (", ..." if len(present) > 20 else "")
        raise DataValidationError(
            f"column(s) {', '.join(map(repr, absent))} required by the schema are missing from "
            f"the data (present: {shown}); rename the columns or change the schema"
        )
    duplicated = sorted({str(name) for name in df.columns[df.columns.duplicated()]} & set(needed))
    if duplicated:
        raise DataValidationError(
            f"column(s) {', '.join(map(repr, duplicated))} appear more than once in the data; "
            "keep one of each"
        )

    typed: dict[str, Any] = {}
    drop = np.zeros(len(df), dtype=bool)
    for column in schema.columns:
        series = df[column.name]
        values, missing = parse_column(series, column)
        _check_missing_policy(column, missing)
        if column.missing == "drop":
            drop |= missing
        if column.type == "categorical":
            values[missing] = MISSING_CATEGORY
        typed[column.name] = values

    typed[schema.target.column] = check_target(df[schema.target.column], schema.target)
    for name in extra_sensitive:
        missing = missing_mask(df[name])
        values = _stripped_text(df[name], missing)
        values[missing] = MISSING_CATEGORY
        typed[name] = values

    frame = pd.DataFrame(
        {
            name: pd.Series(values, index=df.index, dtype=None if _is_float(values) else str)
            for name, values in typed.items()
        },
        index=df.index,
    )
    if drop.any():
        frame = frame.iloc[np.flatnonzero(~drop)]
    return frame


def check_target(series: pd.Series, target: TargetSpec) -> np.ndarray:
    """The target column's values, checked for its task (as ``validate_frame`` does).

    Returns:
        Stripped text (binary, multiclass) or float64 (regression).

    Raises:
        DataValidationError: a missing label, a class outside the declared ones, a regression
            target that is not a finite number; the message names the column, how many rows
            and the first one (with its value; ``shareable`` without it).
    """
    name = target.column
    missing = missing_mask(series)
    if missing.any():
        positions = np.flatnonzero(missing)
        raise DataValidationError(
            f"target column {name!r}: missing value at row {int(positions[0]) + 1} "
            f"({positions.size} rows without a label); every row needs a label: fill it in or "
            "remove the row"
        )
    return _target_values(series, missing, target)


def _target_values(series: pd.Series, missing: np.ndarray, target: TargetSpec) -> np.ndarray:
    """The target column, checked for its task: stripped text (binary, multiclass) or float64
    (regression). Missing labels were refused before."""
    name = target.column
    if target.task == "regression":
        text = series if pd.api.types.is_numeric_dtype(series) else series.astype(str).str.strip()
        values = pd.to_numeric(text, errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan, copy=True
        )
        bad = ~np.isfinite(values)
        if bad.any():
            row, value, _ = _first_bad(name, series, bad)
            nan_or_inf = _is_float_text(value)
            problem = "not a finite number (NaN or infinite)" if nan_or_inf else "not numeric"
            raise DataValidationError(
                f"target column {name!r}: {int(bad.sum())} rows hold a value that is {problem} "
                f"(first at row {row}: {_shown(value)}); a regression target must be a finite "
                "number in every row: fix or remove those rows",
                shareable=(
                    f"target column {name!r}: {int(bad.sum())} rows hold a value that is "
                    f"{problem} (first at row {row})"
                ),
            )
        return values
    text = _stripped_text(series, missing)
    if target.task == "multiclass":
        outside = ~pd.Series(text, dtype=object).isin(target.classes or ()).to_numpy(dtype=bool)
        if outside.any():
            row, _, _ = _first_bad(name, series, outside)
            example = text[row - 1]
            declared = ", ".join(map(repr, target.classes or ()))
            raise DataValidationError(
                f"target column {name!r}: {int(outside.sum())} rows hold a value outside the "
                f"declared classes ({declared}), e.g. {_shown(example)} at row {row}; fix those "
                "rows, remove them, or ask the consortium to declare the class",
                shareable=(
                    f"target column {name!r}: {int(outside.sum())} rows hold a value outside "
                    f"the declared classes (first at row {row})"
                ),
            )
    return text


def _is_float_text(value: object) -> bool:
    try:
        float(str(value).strip())
    except ValueError:
        return False
    return True


def _is_float(values: np.ndarray) -> bool:
    return values.dtype == np.float64


def _labels(valid: pd.DataFrame, schema: DatasetSchema) -> np.ndarray:
    """Integer labels of validated rows: 0/1 (binary), the class index (multiclass), or all 0
    (regression: one stratum for the holdout split)."""
    target = schema.target
    values = valid[target.column]
    if target.task == "multiclass":
        known = pd.Index(list(target.classes or ()), dtype=object)
        return known.get_indexer(values.to_numpy(dtype=object)).astype(np.int64)
    if target.task == "regression":
        return np.zeros(len(values), dtype=np.int64)
    if target.positive is not None:
        return values.isin(target.positive).to_numpy(dtype=np.int64)
    return (~values.isin(target.negative or ())).to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------------------------
# Holdout split


def split_holdout(
    df: pd.DataFrame, schema: DatasetSchema, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split validated rows into training and test parts, stratified by label.

    For each label, its rows are shuffled with ``np.random.default_rng([seed, label])`` and
    ``floor(n_label * test_fraction + 0.5)`` of them (round half up) go to the test part, but at
    least one row of every present label stays in training. Labels are 0/1 (binary), the class
    index (multiclass); a regression target is one stratum (label 0). The result depends only on the rows
    (and their order) and the seed, so the agent and the demo get the same split.

    Args:
        df: the local table, raw or validated.
        schema: the dataset schema.
        test_fraction: share of each label's rows held out, 0 <= f < 1.
        seed: non-negative integer.

    Returns:
        ``(train, test)``: validated typed frames (see ``validate_frame``), each in the original
        row order with the original index.

    Raises:
        ValueError: ``test_fraction`` or ``seed`` out of range.
        DataValidationError: the data does not match the schema.
    """
    if (
        isinstance(test_fraction, bool)
        or not isinstance(test_fraction, int | float)
        or not 0.0 <= test_fraction < 1.0
    ):
        raise ValueError(f"test_fraction must be a number in [0, 1), got {test_fraction!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    valid = validate_frame(df, schema)
    labels = _labels(valid, schema)
    test = np.zeros(len(valid), dtype=bool)
    for label in range(schema.target.n_outputs if schema.target.task == "multiclass" else 2):
        positions = np.flatnonzero(labels == label)
        if positions.size == 0:
            continue
        n_test = min(math.floor(positions.size * test_fraction + 0.5), positions.size - 1)
        # One generator per label: a label's split does not depend on the other label's rows.
        rng = np.random.default_rng([seed, label])
        test[rng.permutation(positions)[:n_test]] = True
    return valid.iloc[np.flatnonzero(~test)], valid.iloc[np.flatnonzero(test)]


def split_by_column(
    df: pd.DataFrame, schema: DatasetSchema, column: str
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split validated rows into train and test parts by a column of the data.

    For a split the site fixed itself (a published benchmark's, say): ``column`` holds
    "train" or "test" (any case, surrounding white space ignored) in every row. It is read from
    the raw frame and is never a feature, the target or a sensitive attribute.

    Args:
        df: the site's table (raw or validated); its index must be unique.
        schema: the dataset schema.
        column: the name of the split column.

    Returns:
        ``(train, test)``: validated typed frames (see ``validate_frame``), each in the original
        row order with the original index.

    Raises:
        ValueError: ``column`` is not a name, or is a feature, target or sensitive column.
        DataValidationError: the data does not match the schema, the column is absent, or a
            row's value is neither "train" nor "test" (the message names the row).
    """
    if not isinstance(column, str) or not column.strip():
        raise ValueError(f"the split column must be a non-empty name, got {column!r}")
    used = {c.name for c in schema.columns} | {schema.target.column, *schema.sensitive}
    if column in used:
        raise ValueError(
            f"the split column {column!r} is a feature, target or sensitive column of the "
            "schema; name a column that only marks each row's part"
        )
    if column not in df.columns:
        raise DataValidationError(
            f"the split column {column!r} named by the plan is missing from the data; add a "
            "column with 'train' or 'test' in every row"
        )
    if not df.index.is_unique:
        raise DataValidationError("the data's row index must be unique to split it by a column")
    raw = df[column]
    missing = missing_mask(raw)
    parts = raw.astype(str).str.strip().str.lower().to_numpy(dtype=object)
    bad = missing | ~np.isin(parts, SPLIT_VALUES)
    if bad.any():  # every row, even one the "drop" policy removes: the column must be clean
        row, value, extra = _first_bad(column, raw, bad)
        raise DataValidationError(
            f"split column {column!r}: value {value!r} at row {row} is neither 'train' nor "
            f"'test'{extra}",
            shareable=f"split column {column!r}: the value at row {row} is neither train nor test",
        )
    valid = validate_frame(df, schema)
    test = parts[df.index.get_indexer(valid.index)] == "test"
    return valid.iloc[np.flatnonzero(~test)], valid.iloc[np.flatnonzero(test)]


# --------------------------------------------------------------------------------------------
# Federated statistics


def _numeric_values(valid: pd.DataFrame, column: ColumnSpec) -> np.ndarray:
    values = valid[column.name].to_numpy(dtype=np.float64, copy=True)
    if column.transform == "log1p":
        values = np.log1p(values)
    return values


def undeclared_categories(df: pd.DataFrame, schema: DatasetSchema) -> dict[str, int]:
    """Rows per categorical column whose value the schema's ``categories`` do not declare.

    Such values are never reported; they encode like an unseen category (an all-zero one-hot
    block, "other"). The agent logs these counts for its operator.
    """
    valid = validate_frame(df, schema)
    result: dict[str, int] = {}
    for column in schema.columns:
        vocabulary = column.vocabulary() if column.type == "categorical" else None
        if vocabulary is not None:
            outside = int((~valid[column.name].isin(vocabulary)).sum())
            if outside:
                result[column.name] = outside
    return result


_random = secrets.SystemRandom()


def _laplace(scale: float) -> float:
    """One Laplace(0, scale) draw from the operating system's cryptographic randomness."""
    return scale * (_random.expovariate(1.0) - _random.expovariate(1.0))


def statistics_sensitivity(column: ColumnSpec) -> tuple[float, float, float]:
    """L1 sensitivity of (count, sum, sum of squares) of a clipped numeric column, one row
    added or removed: 1, the largest absolute clipped value B, and B squared."""
    bounds = column.bounds()
    if bounds is None:
        raise SchemaError(
            f"column {column.name!r}: noised statistics need its clipping bounds ('min' and "
            "'max' in the schema)"
        )
    largest = max(abs(bounds[0]), abs(bounds[1]))
    return 1.0, largest, largest * largest


def local_statistics(
    df: pd.DataFrame,
    schema: DatasetSchema,
    *,
    min_category_count: int | None = None,
    epsilon: float | None = None,
) -> dict[str, Any]:
    """Compute this site's sufficient statistics for the preprocessing (no rows leave the site).

    Args:
        df: the site's training rows, raw or validated (the "drop" policy is applied).
        schema: the dataset schema.
        min_category_count: a value of an undeclared categorical column is reported only when
            this site holds it at least this many times (default: the schema's
            ``min_category_count``); values failing ``category_value_problem`` are never sent.
        epsilon: when given, the numeric statistics are released with epsilon-DP (Laplace
            noise, cryptographic randomness): values clipped to the column's ``min``/``max``,
            epsilon split evenly over the numeric columns and their count, sum and sum of
            squares. Every numeric column must declare its bounds.

    Returns:
        JSON-able ``{"schema_hash", "n_rows", "numeric", "categories"}``. ``numeric``: per
        column ``{"count", "mean", "m2"}`` (exact), or ``{"count", "sum", "sum_sq"}`` (noised
        floats) with ``epsilon``. ``categories``: per column ``{value: count}``, only declared
        values for a column with ``categories`` (``"__missing__"`` included when imputed).
        For a regression target with ``standardize`` also ``"target": {"count", "mean",
        "m2"}`` of the target (exact only).

    Raises:
        DataValidationError: the data does not match the schema.
        SchemaError: ``epsilon`` is given but a numeric column has no bounds, or the target is
            to be standardised (its statistics are exact only).
    """
    valid = validate_frame(df, schema)
    minimum = schema.min_category_count if min_category_count is None else min_category_count
    numeric_columns = [column for column in schema.columns if column.type == "numeric"]
    numeric: dict[str, dict[str, Any]] = {}
    categories: dict[str, dict[str, int]] = {}
    for column in numeric_columns:
        values = valid[column.name].to_numpy(dtype=np.float64, copy=True)
        values = values[~np.isnan(values)]
        if epsilon is None:
            if column.transform == "log1p":
                values = np.log1p(values)
            count = int(values.size)
            mean = float(values.mean()) if count else 0.0
            m2 = float(np.square(values - mean).sum()) if count else 0.0
            numeric[column.name] = {"count": count, "mean": mean, "m2": m2}
            continue
        sensitivity = statistics_sensitivity(column)
        values = np.clip(values, float(column.minimum), float(column.maximum))
        if column.transform == "log1p":
            values = np.log1p(values)
        share = float(epsilon) / (3 * len(numeric_columns))  # per released number
        exact = (float(values.size), float(values.sum()), float(np.square(values).sum()))
        noised = [
            value + _laplace(sens / share) for value, sens in zip(exact, sensitivity, strict=True)
        ]
        numeric[column.name] = dict(zip(("count", "sum", "sum_sq"), noised, strict=True))
    for column in schema.columns:
        if column.type != "categorical":
            continue
        counts = valid[column.name].value_counts()
        vocabulary = column.vocabulary()
        report: dict[str, int] = {}
        for value, count in counts.items():
            value = str(value)
            if vocabulary is not None:
                keep = value in vocabulary
            else:
                keep = int(count) >= minimum and category_value_problem(value) is None
            if keep:
                report[value] = int(count)
        if vocabulary is None and len(report) > schema.max_categories:
            largest = sorted(report.items(), key=lambda item: (-item[1], item[0]))
            report = dict(largest[: schema.max_categories])
        categories[column.name] = dict(sorted(report.items()))
    report: dict[str, Any] = {
        "schema_hash": schema_hash(schema),
        "n_rows": len(valid),
        "numeric": numeric,
        "categories": categories,
    }
    if schema.target.standardize:
        if epsilon is not None:
            raise SchemaError(
                f"target {schema.target.column!r}: 'standardize' needs the exact target "
                "statistics; noised statistics (privacy.statistics_epsilon) do not cover the target"
            )
        values = valid[schema.target.column].to_numpy(dtype=np.float64)
        mean = float(values.mean()) if values.size else 0.0
        m2 = float(np.square(values - mean).sum()) if values.size else 0.0
        report["target"] = {"count": int(values.size), "mean": mean, "m2": m2}
    return report


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


_EXACT_KEYS = {"count", "mean", "m2"}
_NOISED_KEYS = {"count", "sum", "sum_sq"}


def check_site_statistics(
    stats: object, schema: DatasetSchema, *, noised: bool = False, where: str = "statistics"
) -> None:
    """Check one site's statistics report before it is stored or merged.

    Args:
        stats: the report (``local_statistics``'s form).
        schema: the plan's schema.
        noised: whether the plan noises numeric statistics (``privacy.statistics_epsilon``);
            the numeric entries must then be ``{"count", "sum", "sum_sq"}``.
        where: who sent it, for the messages (e.g. ``silo 'north'``).

    Raises:
        SchemaError: naming the sender, the column and the rule broken: other schema hash,
            missing or extra column, bad counts, non-finite numbers, an undeclared category, a
            category name failing ``category_value_problem``, or more values than the cap.
    """
    if not isinstance(stats, Mapping):
        raise SchemaError(f"{where}: expected a JSON object, got {type(stats).__name__}")
    keys: tuple[str, ...] = ("schema_hash", "n_rows", "numeric", "categories")
    if schema.target.standardize:
        keys += ("target",)
    unknown = sorted(str(key) for key in stats if key not in keys)
    absent = [key for key in keys if key not in stats]
    if unknown or absent:
        raise SchemaError(
            f"{where}: keys must be {', '.join(keys)} (unknown: {unknown}, missing: {absent}); "
            "compute them with fedcore.tabular.local_statistics"
        )
    expected_hash = schema_hash(schema)
    if stats["schema_hash"] != expected_hash:
        raise SchemaError(
            f"{where} were computed for a different schema (hash {str(stats['schema_hash'])[:12]}"
            f"..., expected {expected_hash[:12]}...); the site must use the plan's schema"
        )
    n_rows = stats["n_rows"]
    if not _is_count(n_rows):
        raise SchemaError(f"{where}: 'n_rows' must be an integer >= 0, got {n_rows!r}")
    numeric_names = [c.name for c in schema.columns if c.type == "numeric"]
    categorical = [c for c in schema.columns if c.type == "categorical"]
    for key, names in (("numeric", numeric_names), ("categories", [c.name for c in categorical])):
        section = stats[key]
        if not isinstance(section, Mapping) or set(section) != set(names):
            got = sorted(map(str, section)) if isinstance(section, Mapping) else section
            raise SchemaError(
                f"{where}: {key!r} must have exactly the schema's columns {names}, got "
                f"{_shown(got)}"
            )
    for name in numeric_names:
        entry = stats["numeric"][name]
        expected = _NOISED_KEYS if noised else _EXACT_KEYS
        if not isinstance(entry, Mapping) or set(entry) != expected:
            form = "noised (privacy.statistics_epsilon)" if noised else "exact"
            raise SchemaError(
                f"{where}: numeric column {name!r} must have keys {', '.join(sorted(expected))} "
                f"for this plan's {form} statistics, got {_shown(entry)}"
            )
        if noised:
            if not all(_is_finite(entry[key]) for key in expected):
                raise SchemaError(
                    f"{where}: numeric column {name!r}: count, sum and sum_sq must be finite "
                    f"numbers, got {_shown(entry)}"
                )
            continue
        if not _is_count(entry["count"]) or entry["count"] > n_rows:
            raise SchemaError(
                f"{where}: numeric column {name!r}: count {entry['count']!r} must be an integer "
                f"between 0 and n_rows ({n_rows})"
            )
        if not _is_finite(entry["mean"]) or not _is_finite(entry["m2"]) or entry["m2"] < 0:
            raise SchemaError(
                f"{where}: numeric column {name!r}: mean and m2 must be finite numbers, m2 >= 0 "
                f"(got mean {entry['mean']!r}, m2 {entry['m2']!r})"
            )
    for column in categorical:
        name = column.name
        counts = stats["categories"][name]
        if not isinstance(counts, Mapping):
            raise SchemaError(
                f"{where}: categories of column {name!r} must be an object of value -> count, "
                f"got {_shown(counts)}"
            )
        vocabulary = column.vocabulary()
        cap = len(vocabulary) if vocabulary is not None else schema.max_categories
        if len(counts) > cap:
            raise SchemaError(
                f"{where}: column {name!r} reports {len(counts)} categories, more than the "
                f"cap of {cap} (schema 'max_categories' or the declared 'categories')"
            )
        for value, count in counts.items():
            if (problem := category_value_problem(value)) is not None:
                raise SchemaError(f"{where}: column {name!r}: category {_shown(value)} {problem}")
            if vocabulary is not None and value not in vocabulary:
                raise SchemaError(
                    f"{where}: column {name!r}: category {_shown(value)} is not declared in the "
                    "schema's 'categories'"
                )
            if not _is_count(count) or count < 1 or count > n_rows:
                raise SchemaError(
                    f"{where}: column {name!r}: the count of {_shown(value)} must be an integer "
                    f"between 1 and n_rows ({n_rows}), got {_shown(count)}"
                )
        if sum(counts.values()) > n_rows:
            raise SchemaError(
                f"{where}: column {name!r}: the category counts add up to more than n_rows "
                f"({n_rows})"
            )

    if schema.target.standardize:
        entry = stats["target"]
        if (
            not isinstance(entry, Mapping)
            or set(entry) != _EXACT_KEYS
            or not _is_count(entry["count"])
            or entry["count"] != n_rows
            or not _is_finite(entry["mean"])
            or not _is_finite(entry["m2"])
            or entry["m2"] < 0
        ):
            raise SchemaError(
                f"{where}: 'target' must be {{count, mean, m2}} of the regression target: count "
                f"= n_rows ({n_rows}), finite mean, finite m2 >= 0; got {_shown(entry)}"
            )


def merge_moments(parts: Iterable[Mapping[str, Any]]) -> tuple[int, float, float]:
    """Chan, Golub and LeVeque's pairwise update of parts ``{"count", "mean", "m2"}`` (m2: the
    sum of squared deviations from the part's mean): the union's (count, mean, m2)."""
    count, mean, m2 = 0, 0.0, 0.0
    for part in parts:
        n_b, mean_b, m2_b = int(part["count"]), float(part["mean"]), float(part["m2"])
        if n_b == 0:
            continue
        total = count + n_b
        delta = mean_b - mean
        mean += delta * n_b / total
        m2 += m2_b + delta * delta * count * n_b / total
        count = total
    return count, mean, m2


def _merge_exact(parts: list[Mapping[str, Any]]) -> tuple[float, float, int]:
    """The union's (mean, population std, count) (:func:`merge_moments`)."""
    count, mean, m2 = merge_moments(parts)
    return mean, (math.sqrt(m2 / count) if count else 0.0), count


def _merge_noised(parts: list[Mapping[str, Any]], column: ColumnSpec) -> tuple[float, float, int]:
    """Pooled noisy count, sum and sum of squares into (mean, std, count), kept in bounds."""
    low, high = column.bounds() or (-math.inf, math.inf)
    count = sum(float(part["count"]) for part in parts)
    total = sum(float(part["sum"]) for part in parts)
    squares = sum(float(part["sum_sq"]) for part in parts)
    if count < 1.0:  # too few rows to say anything: the middle of the bounds, unit scale
        return (low + high) / 2.0, 1.0, max(0, round(count))
    mean = min(max(total / count, low), high)
    variance = min(max(squares / count - mean * mean, 0.0), ((high - low) / 2.0) ** 2)
    return mean, math.sqrt(variance), round(count)


def merge_statistics(
    stats: Sequence[Mapping[str, Any]], schema: DatasetSchema, *, noised: bool = False
) -> dict[str, Any]:
    """Merge the sites' statistics into the fitted preprocessing (server side, no rows needed).

    Exact means and variances are combined with Chan, Golub and LeVeque's pairwise update
    (1979), so the result equals the statistics of the pooled rows; noised ones (``noised``)
    from the pooled count, sum and sum of squares, the mean kept within the column's bounds.
    A categorical column's vocabulary is its declared ``categories`` (plus ``"__missing__"``
    when imputed), else the values whose pooled count is at least the schema's
    ``min_category_count``, the ``max_categories`` most frequent of them (ties by name).

    Args:
        stats: one ``local_statistics`` result per site (at least one).
        schema: the dataset schema of the plan.
        noised: whether the numeric statistics are the noised form.

    Returns:
        JSON-able ``{"version": 1, "schema_hash", "columns": [feature columns], "n_rows",
        "numeric": {column: {"mean", "std", "count"}}, "categories": {column: sorted list}}``
        with ``std`` the population standard deviation (1 where it is 0 or no value was seen);
        for a regression target with ``standardize`` also ``"target": {"mean", "std"}``.

    Raises:
        SchemaError: no statistics, or a report breaks ``check_site_statistics``.
    """
    if isinstance(stats, Mapping) or not isinstance(stats, Sequence) or not stats:
        raise SchemaError("merge_statistics needs a non-empty list of per-site statistics")
    for index, entry in enumerate(stats):
        check_site_statistics(entry, schema, noised=noised, where=f"statistics #{index}")

    numeric: dict[str, dict[str, Any]] = {}
    categories: dict[str, list[str]] = {}
    for column in schema.columns:
        if column.type == "numeric":
            parts = [entry["numeric"][column.name] for entry in stats]
            merge = _merge_noised(parts, column) if noised else _merge_exact(parts)
            mean, std, count = merge
            numeric[column.name] = {
                "mean": mean,
                "std": std if std > 0.0 else 1.0,
                "count": count,
            }
        elif column.type == "categorical":
            vocabulary = column.vocabulary()
            if vocabulary is not None:
                categories[column.name] = list(vocabulary)
                continue
            pooled: dict[str, int] = {}
            for entry in stats:
                for value, count in entry["categories"][column.name].items():
                    pooled[value] = pooled.get(value, 0) + int(count)
            shown = [item for item in pooled.items() if item[1] >= schema.min_category_count]
            shown.sort(key=lambda item: (-item[1], item[0]))
            categories[column.name] = sorted(value for value, _ in shown[: schema.max_categories])
    fitted: dict[str, Any] = {
        "version": PREPROCESSING_VERSION,
        "schema_hash": schema_hash(schema),
        "columns": [column.name for column in schema.columns],
        "n_rows": sum(int(entry["n_rows"]) for entry in stats),
        "numeric": numeric,
        "categories": categories,
    }
    if schema.target.standardize:
        mean, std, _ = _merge_exact([entry["target"] for entry in stats])
        fitted["target"] = {"mean": mean, "std": std if std > 0.0 else 1.0}
    return fitted


# --------------------------------------------------------------------------------------------
# Transform


def _check_fitted(schema: DatasetSchema, fitted: object) -> Mapping[str, Any]:
    if not isinstance(fitted, Mapping):
        raise SchemaError(
            f"fitted preprocessing must be a JSON object, got {type(fitted).__name__}"
        )
    if fitted.get("version") != PREPROCESSING_VERSION:
        raise SchemaError(
            f"fitted preprocessing version {fitted.get('version')!r} is not supported "
            f"(expected {PREPROCESSING_VERSION}); re-run merge_statistics"
        )
    expected_hash = schema_hash(schema)
    if fitted.get("schema_hash") != expected_hash:
        raise SchemaError(
            f"fitted preprocessing was computed for another schema (columns "
            f"{fitted.get('columns')!r}, hash {str(fitted.get('schema_hash'))[:12]}...); this "
            f"schema has columns {[c.name for c in schema.columns]!r}, hash "
            f"{expected_hash[:12]}...; re-run the statistics round with this schema"
        )
    if schema.target.standardize:
        target_scale(schema, fitted)
    numeric, categories = fitted.get("numeric"), fitted.get("categories")
    if not isinstance(numeric, Mapping) or not isinstance(categories, Mapping):
        raise SchemaError("fitted preprocessing needs 'numeric' and 'categories' objects")
    for column in schema.columns:
        if column.type == "numeric":
            entry = numeric.get(column.name)
            if (
                not isinstance(entry, Mapping)
                or not _is_finite(entry.get("mean"))
                or not _is_finite(entry.get("std"))
                or entry["std"] <= 0
            ):
                raise SchemaError(
                    f"fitted preprocessing: numeric column {column.name!r} needs a finite mean "
                    f"and a finite std > 0, got {entry!r}"
                )
        elif column.type == "categorical":
            values = categories.get(column.name)
            if (
                isinstance(values, str)
                or not isinstance(values, Sequence)
                or not all(isinstance(value, str) for value in values)
                or len(set(values)) != len(values)
            ):
                raise SchemaError(
                    f"fitted preprocessing: categories of column {column.name!r} must be a list "
                    f"of distinct strings, got {values!r}"
                )
    return fitted


def target_scale(schema: DatasetSchema, fitted: Mapping[str, Any]) -> tuple[float, float]:
    """``(mean, std)`` the model's regression output is scaled by: ``y = mean + std * output``.

    ``(0, 1)`` unless the schema's regression target is standardised; then the fitted
    preprocessing's federated mean and standard deviation of the training targets.

    Raises:
        SchemaError: a standardised target without a finite mean and std > 0 in ``fitted``.
    """
    if not schema.target.standardize:
        return 0.0, 1.0
    entry = fitted.get("target") if isinstance(fitted, Mapping) else None
    if (
        not isinstance(entry, Mapping)
        or not _is_finite(entry.get("mean"))
        or not _is_finite(entry.get("std"))
        or entry["std"] <= 0
    ):
        raise SchemaError(
            f"fitted preprocessing: the standardised target {schema.target.column!r} needs "
            f"'target': {{mean, std > 0}}, got {_shown(entry)}; re-run the statistics round"
        )
    return float(entry["mean"]), float(entry["std"])


def feature_names(schema: DatasetSchema, fitted: Mapping[str, Any]) -> list[str]:
    """Return the names of the columns of ``transform``'s X, in order.

    Args:
        schema: the dataset schema.
        fitted: the fitted preprocessing from ``merge_statistics``.

    Returns:
        Numeric and boolean columns by name; one ``"column=category"`` per category of each
        categorical column.

    Raises:
        SchemaError: ``fitted`` does not belong to ``schema``.
    """
    fitted = _check_fitted(schema, fitted)
    names: list[str] = []
    for column in schema.columns:
        if column.type == "categorical":
            names.extend(f"{column.name}={value}" for value in fitted["categories"][column.name])
        else:
            names.append(column.name)
    return names


def _group_labels(valid: pd.DataFrame, name: str, schema: DatasetSchema) -> np.ndarray:
    spec = next((column for column in schema.columns if column.name == name), None)
    if spec is not None and spec.type == "boolean":
        values = valid[name].to_numpy(dtype=np.float64)
        labels = np.where(values == 1.0, "true", "false").astype(object)
        labels[np.isnan(values)] = MISSING_CATEGORY
        return labels.astype(str)
    return valid[name].to_numpy(dtype=str)


def transform_labels(
    df: pd.DataFrame, schema: DatasetSchema
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The 0/1 labels and each sensitive column's group labels of rows, as :func:`transform`
    gives them, without a fitted preprocessing (the statistics pass has none yet).

    Raises:
        DataValidationError: the data does not match the schema.
    """
    valid = validate_frame(df, schema)
    groups = {name: _group_labels(valid, name, schema) for name in schema.sensitive}
    return _labels(valid, schema).astype(np.float64), groups


def transform(df: pd.DataFrame, schema: DatasetSchema, fitted: Mapping[str, Any]) -> TabularData:
    """Turn rows into model inputs with the federated preprocessing.

    Args:
        df: rows to transform, raw or validated (the "drop" policy is applied).
        schema: the dataset schema.
        fitted: the fitted preprocessing from ``merge_statistics`` for this schema.

    Returns:
        ``TabularData`` with X float32 (n, len(feature_names)), y (n,): float32 0/1 labels
        (binary), float32 class indices (multiclass), or float64 targets (regression; standardised
        with :func:`target_scale` when the schema says so) and groups: sensitive column -> str
        array (n,). Missing numeric values become 0 (the mean;
        the federated mean itself in a ``"scale": "none"`` column), missing booleans 0, unseen categories an all-zero one-hot block.

    Raises:
        SchemaError: ``fitted`` does not belong to ``schema``.
        DataValidationError: the data does not match the schema.
    """
    fitted = _check_fitted(schema, fitted)
    valid = validate_frame(df, schema)
    n = len(valid)
    width = len(feature_names(schema, fitted))
    X = np.zeros((n, width), dtype=np.float32)
    offset = 0
    for column in schema.columns:
        if column.type == "numeric":
            stats = fitted["numeric"][column.name]
            if column.scale == "none":  # prepared by the site: as it is, missing -> the mean
                values = _numeric_values(valid, column)
                X[:, offset] = np.nan_to_num(values, nan=float(stats["mean"]))
            else:
                z = (_numeric_values(valid, column) - float(stats["mean"])) / float(stats["std"])
                X[:, offset] = np.nan_to_num(z, nan=0.0)
            offset += 1
        elif column.type == "boolean":
            X[:, offset] = np.nan_to_num(valid[column.name].to_numpy(dtype=np.float64), nan=0.0)
            offset += 1
        else:
            known = pd.Index(list(fitted["categories"][column.name]), dtype=object)
            codes = known.get_indexer(valid[column.name].to_numpy(dtype=object))
            rows = np.flatnonzero(codes >= 0)  # -1: category unseen by the fitted preprocessing
            X[rows, offset + codes[rows]] = 1.0
            offset += len(known)
    if schema.target.task == "regression":
        mean, std = target_scale(schema, fitted)
        y = (valid[schema.target.column].to_numpy(dtype=np.float64) - mean) / std
    else:
        y = _labels(valid, schema).astype(np.float32)
    groups = {name: _group_labels(valid, name, schema) for name in schema.sensitive}
    return TabularData(X=X, y=y, groups=groups)
