"""The site's local data: load, validate against a plan's schema, split, transform, cache.

Loading and validating a large file is the slow part of a round, so :class:`LocalData` keeps the
last split (keyed by the file's mtime and size and by the plan's schema and evaluation settings)
and the last transformed arrays (keyed by that split and the fitted preprocessing). Raw rows never
leave this module except as aggregate statistics or trained weights.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from fedcore import tabular
from fedcore.plan import spec


class DataFileError(Exception):
    """The data file cannot be read at all (missing, unreadable, not a table)."""


class PlanError(ValueError):
    """The plan's schema or evaluation settings are unusable (the server's problem)."""


def canonical_sha256(value: Any) -> str:
    """SHA-256 of the canonical JSON form of a JSON-able value (sorted keys, no spaces)."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class LocalSplit:
    """The validated local data split into train and test parts for one schema."""

    key: tuple[Any, ...]
    schema: tabular.DatasetSchema
    train: pd.DataFrame
    test: pd.DataFrame


@dataclass(frozen=True)
class LocalArrays:
    """Train and test splits transformed with one fitted preprocessing."""

    key: tuple[Any, ...]
    train: tabular.TabularData
    test: tabular.TabularData


def parse_schema(plan: Mapping[str, Any]) -> tabular.DatasetSchema:
    """The DatasetSchema of a plan (fedcore.plan.parse_schema); PlanError if it is unusable."""
    try:
        return spec.parse_schema(plan.get("schema"))
    except spec.PlanError as exc:
        raise PlanError(str(exc)) from None


def _evaluation(plan: Mapping[str, Any]) -> spec.Evaluation:
    try:
        return spec.parse_evaluation(plan.get("evaluation"))
    except spec.PlanError as exc:
        raise PlanError(str(exc)) from None


class LocalData:
    """The site's data file with a one-entry cache of its split and transformed arrays.

    Thread-safe: the agent calls it from worker threads.
    """

    def __init__(self, path: str | Path):
        """Args:
        path: the .csv or .parquet file named in site.toml.
        """
        self.path = Path(path)
        self._lock = threading.Lock()
        self._split: LocalSplit | None = None
        self._arrays: LocalArrays | None = None

    def load(self) -> pd.DataFrame:
        """The raw table (strings for CSV), as read by fedcore.tabular.load_table."""
        try:
            return tabular.load_table(self.path)
        except FileNotFoundError:
            raise DataFileError(f"the data file {self.path} does not exist") from None
        except tabular.DataValidationError:
            raise
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DataFileError(f"cannot read the data file {self.path}: {exc}") from None

    def _file_key(self) -> tuple[int, int]:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise DataFileError(f"cannot read the data file {self.path}: {exc}") from None
        return stat.st_mtime_ns, stat.st_size

    def split(self, plan: Mapping[str, Any]) -> LocalSplit:
        """Load, validate and split the data for a plan, reusing the cached split when possible.

        Args:
            plan: the training plan; only its "schema" and "evaluation" matter here: the
                holdout split with ``test_fraction`` and ``seed``, or the split the data's
                ``evaluation.split_column`` fixes.

        Raises:
            PlanError: the plan's schema or evaluation settings are invalid.
            DataFileError: the file cannot be read.
            fedcore.tabular.DataValidationError: the data does not match the schema.
        """
        schema = parse_schema(plan)
        evaluation = _evaluation(plan)
        fraction, seed = evaluation.test_fraction, evaluation.seed
        split_column = evaluation.split_column
        # Keyed on what the split depends on, computed here rather than trusting the server's
        # plan_hash: two plans with the same schema share the split, a changed file reloads.
        settings: dict[str, Any] = {
            "schema": plan["schema"],
            "test_fraction": fraction,
            "seed": seed,
        }
        if split_column is not None:
            settings = {"schema": plan["schema"], "split_column": split_column}
        key = (str(self.path), *self._file_key(), canonical_sha256(settings))
        with self._lock:
            if self._split is not None and self._split.key == key:
                return self._split
            # Both splits validate the rows (tabular.validate_frame) and return typed frames.
            if split_column is not None:
                try:
                    train, test = tabular.split_by_column(self.load(), schema, split_column)
                except tabular.DataValidationError:
                    raise
                except ValueError as exc:  # the column is one the schema uses
                    raise PlanError(f"plan evaluation.split_column: {exc}") from None
            else:
                train, test = tabular.split_holdout(
                    self.load(), schema, test_fraction=fraction, seed=seed
                )
            self._split = LocalSplit(key=key, schema=schema, train=train, test=test)
            self._arrays = None
            return self._split

    def arrays(self, split: LocalSplit, preprocessing: Mapping[str, Any]) -> LocalArrays:
        """Transform a split with a fitted preprocessing, reusing the cached arrays when possible.

        Args:
            split: from :meth:`split`.
            preprocessing: the fitted preprocessing sent with the task (merged statistics).

        Raises:
            PlanError: the preprocessing does not fit the schema.
            fedcore.tabular.DataValidationError: the data does not fit the preprocessing.
        """
        key = (split.key, canonical_sha256(preprocessing))
        with self._lock:
            if self._arrays is not None and self._arrays.key == key:
                return self._arrays
            try:
                train = tabular.transform(split.train, split.schema, preprocessing)
                test = tabular.transform(split.test, split.schema, preprocessing)
            except tabular.DataValidationError:
                raise
            except (tabular.SchemaError, KeyError, TypeError, ValueError) as exc:
                raise PlanError(f"the task's preprocessing is invalid: {exc}") from None
            self._arrays = LocalArrays(key=key, train=train, test=test)
            return self._arrays

    def clear(self) -> None:
        """Drop the cached split and arrays (frees memory between runs)."""
        with self._lock:
            self._split = None
            self._arrays = None
