"""Propose a dataset schema from a site's table, and check a table against a schema per column.

What ``quorum-agent init`` and ``quorum-agent check`` run at a site, on the raw frame of
``fedcore.tabular.load_table`` (strings for a CSV). Nothing here sends anything anywhere; the
proposal is for the data steward to review before the silo is registered with it. Pure functions
of the frame: the server could run the same inference on an uploaded sample.

Rules of the proposal (each column gets a one-line reason the steward can judge):

* A cell is missing by ``fedcore.tabular.missing_mask`` (``MISSING_TOKENS``), as in training.
* Ignored (not a feature): a column with every value missing, with one value only, an
  identifier (every value distinct, integers or text, from 20 rows on), a column without a
  header name, a column of numbers with some non-numbers (at least 90 % numbers: a typo to
  fix, named with its row), or a text column none of whose values reaches
  ``min_category_rows`` rows.
* Boolean: every value is a boolean token (t/f, true/false, yes/no, y/n, 1/0, any case) and
  both truth values occur.
* Numeric: every value is a finite number. ``log1p`` is proposed when the values are >= 0,
  right-skewed (skewness > 2) and less skewed after ``log1p``.
* Categorical: anything else. Its ``categories`` are only the values held by at least
  ``min_category_rows`` rows (at most ``max_categories``, the most frequent) that may be a
  category name (``category_value_problem``): the schema is shared with the consortium, so a
  rare value is never named in it. Rows with a rarer value encode as "other" (an all-zero
  one-hot block, like an unseen category); missing cells are imputed as ``"__missing__"``.
* Target: the column given, else a guess by name (target, label, outcome, class, ...), else
  the last column with 2 to 20 values; a guess is marked as such. Two values that are boolean
  tokens: label 1 = the true ones; two other values: label 1 = the rarer one; more values:
  label 1 = any value but the most common one (``negative``).
* Sensitive attributes are only those given; columns whose name reads like one (sex, gender,
  age, race, ethnicity, ...) are suggested, never added.
"""

from __future__ import annotations

import csv
import gzip
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedcore import tabular

__all__ = [
    "DEFAULT_MIN_CATEGORY_ROWS",
    "SENSITIVE_NAME_WORDS",
    "TARGET_NAMES",
    "CheckFinding",
    "ColumnFinding",
    "InferenceError",
    "SchemaProposal",
    "check_frame",
    "csv_header_problem",
    "propose_schema",
]

DEFAULT_MIN_CATEGORY_ROWS = 10
ID_MIN_ROWS = 20  # below this, "every value distinct" says nothing about a column being an id
MAX_TARGET_GUESS_VALUES = 20
SKEW_FOR_LOG1P = 2.0
TARGET_NAMES: tuple[str, ...] = (
    "target",
    "label",
    "outcome",
    "class",
    "y",
    "diagnosis",
    "result",
    "default",
    "risk",
    "churn",
)
SENSITIVE_NAME_WORDS: tuple[str, ...] = (
    "sex",
    "gender",
    "age",
    "race",
    "ethnicity",
    "ethnic",
    "religion",
    "nationality",
    "citizenship",
    "marital",
    "disability",
    "pregnant",
    "pregnancy",
)
_UNNAMED = re.compile(r"^Unnamed: \d+$")  # pandas' name for a column without a header


class InferenceError(ValueError):
    """The table or the options do not allow a proposal; the message says what to do."""


@dataclass(frozen=True)
class ColumnFinding:
    """What the inference (or the check) found in one column of the data."""

    name: str
    role: str  # "feature", "target", "sensitive" (used for groups only) or "ignored"
    type: str | None  # numeric, categorical or boolean; None when ignored
    rows: int  # cells with a value
    missing: int
    distinct: int
    note: str
    transform: str = "none"
    categories: tuple[str, ...] = ()
    other_rows: int = 0  # rows whose value is not declared: encoded as "other"


@dataclass(frozen=True)
class SchemaProposal:
    """A proposed dataset schema with the findings that led to it."""

    schema: tabular.DatasetSchema
    columns: tuple[ColumnFinding, ...]
    rows: int
    target_guessed: bool
    target_note: str
    suggested_sensitive: tuple[str, ...] = ()
    warnings: tuple[str, ...] = field(default_factory=tuple)


def csv_header_problem(path: str | Path) -> str | None:
    """Why the CSV's header row cannot name the columns (None when it can).

    pandas renames a repeated name to ``name.1`` silently; a schema could then use the wrong one.
    """
    path = Path(path)
    name = path.name.lower()
    if not name.endswith((".csv", ".csv.gz")):
        return None
    opener = gzip.open if name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8-sig", newline="") as handle:  # type: ignore[operator]
            header = next(csv.reader(handle), None)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        return f"cannot read the header row: {exc}"
    if not header:
        return "line 1: the file is empty; the first line must name the columns"
    names = [cell.strip() for cell in header]
    repeated = sorted({n for n in names if n and names.count(n) > 1})
    if repeated:
        return (
            f"line 1: column name(s) {', '.join(map(repr, repeated))} appear more than once in "
            "the header; every column needs its own name"
        )
    return None


# --------------------------------------------------------------------------------------------
# Inference


def _name_words(name: str) -> set[str]:
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name)
    return {word for word in re.split(r"[^a-z0-9]+", spaced.lower()) if word}


def _present(series: pd.Series) -> tuple[pd.Series, int]:
    """The stripped non-missing values and the number of missing cells."""
    missing = tabular.missing_mask(series)
    values = series[~missing].astype(str).str.strip()
    return values.reset_index(drop=True), int(missing.sum())


def _first_row(bad: np.ndarray) -> int:
    return int(np.flatnonzero(bad)[0]) + 1


def _boolean_values(values: pd.Series) -> bool:
    tokens = values.str.lower()
    if not tokens.isin(tabular.BOOLEAN_TOKENS).all():
        return False
    return set(tokens.map(tabular.BOOLEAN_TOKENS)) == {0.0, 1.0}


def _skew(values: np.ndarray) -> float:
    if values.size < 3 or float(values.std()) == 0.0:
        return 0.0
    return float(pd.Series(values).skew())


def _numeric_finding(name: str, numbers: np.ndarray, missing: int, distinct: int) -> ColumnFinding:
    integers = bool(np.all(numbers == np.round(numbers)))
    low, high = float(numbers.min()), float(numbers.max())
    note = f"numbers from {low:g} to {high:g}"
    transform = "none"
    skew = _skew(numbers)
    if low >= 0 and skew > SKEW_FOR_LOG1P and abs(_skew(np.log1p(numbers))) < abs(skew):
        transform = "log1p"
        note += f"; right-skewed (skewness {skew:.1f}): log1p proposed"
    if integers and distinct <= 10:
        note += (
            f"; only {distinct} distinct integers: if they are codes rather than amounts, "
            "declare the column categorical"
        )
    return ColumnFinding(
        name, "feature", "numeric", len(numbers), missing, distinct, note, transform=transform
    )


def _classify(name: str, series: pd.Series, *, min_rows: int, max_categories: int) -> ColumnFinding:
    """The proposed use of one column (not the target)."""
    values, missing = _present(series)
    n = len(values)
    counts = values.value_counts()
    distinct = len(counts)

    def ignored(note: str) -> ColumnFinding:
        return ColumnFinding(name, "ignored", None, n, missing, distinct, note)

    if _UNNAMED.match(name):
        return ignored("no name in the header row (often a saved row index)")
    if n == 0:
        return ignored("every value is missing")
    if distinct == 1:
        return ignored(f"one value only ({counts.index[0]!r}): carries no information")
    if _boolean_values(values):
        return ColumnFinding(
            name, "feature", "boolean", n, missing, distinct, "boolean tokens: " + _listed(counts)
        )
    numbers = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    finite = np.isfinite(numbers)
    is_id = distinct == n and n >= ID_MIN_ROWS
    if finite.all():
        if is_id and bool(np.all(numbers == np.round(numbers))):
            return ignored("every value is a distinct integer: looks like a record identifier")
        return _numeric_finding(name, numbers, missing, distinct)
    if finite.mean() >= 0.9:
        position = int(np.flatnonzero(~finite)[0])
        row = int(np.flatnonzero(~tabular.missing_mask(series))[position]) + 1
        return ignored(
            f"mostly numbers, but {int((~finite).sum())} of {n} values are not (first at row "
            f"{row}: {tabular._shown(values[position])}): if the column is numeric, fix them or "
            "empty them (missing) and run init again"
        )
    if is_id:
        return ignored("every value is distinct: an identifier or free text")
    kept = [
        str(value)
        for value, count in counts.items()
        if count >= min_rows and tabular.category_value_problem(value) is None
    ][:max_categories]
    unusable = [
        f"{tabular._shown(value)} ({problem})"
        for value, count in counts.items()
        if count >= min_rows and (problem := tabular.category_value_problem(value)) is not None
    ]
    if not kept:
        return ignored(
            f"{distinct} values, none held by {min_rows} rows or more: too rare to name in a "
            "shared schema (lower --min-category-rows to keep it)"
        )
    other_rows = int(n - counts[kept].sum())
    note = f"{len(kept)} of {distinct} values declared (those with >= {min_rows} rows)"
    if other_rows:
        note += f"; {other_rows} rows with rarer values encode as 'other'"
    if len(kept) == max_categories and distinct > max_categories:
        note += f"; capped at the {max_categories} most frequent"
    if unusable:
        note += f"; not allowed as a category name: {', '.join(unusable[:3])}"
    return ColumnFinding(
        name,
        "feature",
        "categorical",
        n,
        missing,
        distinct,
        note,
        categories=tuple(sorted(kept)),
        other_rows=other_rows,
    )


def _listed(counts: pd.Series, limit: int = 4) -> str:
    shown = [f"{value} ({count})" for value, count in list(counts.items())[:limit]]
    return ", ".join(shown) + (", ..." if len(counts) > limit else "")


def _guess_target(frame: pd.DataFrame) -> tuple[str, str]:
    names = [str(column) for column in frame.columns]
    for wanted in TARGET_NAMES:
        for name in names:
            if name.strip().lower() == wanted:
                return name, f"guessed from its name {name!r}"
    for name in reversed(names):
        values, _ = _present(frame[name])
        if 2 <= values.nunique() <= MAX_TARGET_GUESS_VALUES:
            return name, f"guessed: the last column with 2 to {MAX_TARGET_GUESS_VALUES} values"
    raise InferenceError(
        f"could not guess the target column; pass --target COLUMN (the columns are "
        f"{', '.join(names[:30])})"
    )


def _target_spec(name: str, series: pd.Series) -> tuple[tabular.TargetSpec, str, list[str]]:
    values, missing = _present(series)
    counts = values.value_counts()
    warnings = []
    if len(counts) < 2:
        shown = f"only the value {counts.index[0]!r}" if len(counts) else "no values"
        raise InferenceError(
            f"target column {name!r} has {shown}; a label needs two or more values: pass "
            "--target with the column to predict"
        )
    if missing:
        first = _first_row(tabular.missing_mask(series))
        warnings.append(
            f"target {name!r}: {missing} rows have no label (first at row {first}, CSV line "
            f"{first + 1}); training refuses them: fill the labels in or remove those rows"
        )
    if len(counts) == 2 and _boolean_values(values):
        positive = sorted(v for v in counts.index if tabular.BOOLEAN_TOKENS[v.lower()] == 1.0)
        spec = tabular.TargetSpec(name, positive=tuple(positive))
        note = f"label 1 = {', '.join(map(repr, positive))} (the true value)"
    elif len(counts) == 2:
        # value_counts sorts by count, then by first appearance; ties: the later name sorted.
        rare = sorted(counts.index, key=lambda v: (-counts[v], v))[1]
        spec = tabular.TargetSpec(name, positive=(str(rare),))
        note = f"label 1 = {rare!r} (the rarer value, {counts[rare]} of {len(values)} rows)"
    else:
        common = str(counts.index[0])
        spec = tabular.TargetSpec(name, negative=(common,))
        note = (
            f"label 1 = any value other than {common!r} (the most common value, "
            f"{counts[common]} of {len(values)} rows; {len(counts)} values in all)"
        )
    return spec, note + "; if another value is the event to predict, edit the target", warnings


def propose_schema(
    frame: pd.DataFrame,
    *,
    target: str | None = None,
    sensitive: Sequence[str] = (),
    min_category_rows: int = DEFAULT_MIN_CATEGORY_ROWS,
    max_categories: int = tabular.DEFAULT_MAX_CATEGORIES,
) -> SchemaProposal:
    """Propose a dataset schema for a raw table (see the module docstring for the rules).

    Args:
        frame: the site's table as ``fedcore.tabular.load_table`` reads it.
        target: the label column; None: guessed, and the proposal says so.
        sensitive: columns to declare as sensitive attributes (categorical or boolean, or
            columns that are not features).
        min_category_rows: a categorical value is declared only when at least this many rows
            hold it (>= 1).
        max_categories: at most this many declared values per column (the most frequent).

    Returns:
        The proposal; its schema always passes ``DatasetSchema`` validation.

    Raises:
        InferenceError: an unknown column was named, the target has a single value, a
            sensitive column is numeric, or no column is left as a feature.
    """
    if isinstance(min_category_rows, bool) or not isinstance(min_category_rows, int):
        raise InferenceError(f"min_category_rows must be an integer, got {min_category_rows!r}")
    if min_category_rows < 1:
        raise InferenceError(f"min_category_rows must be >= 1, got {min_category_rows}")
    if not 1 <= max_categories <= tabular.MAX_MAX_CATEGORIES:
        raise InferenceError(f"max_categories must be in [1, {tabular.MAX_MAX_CATEGORIES}]")
    names = [str(column) for column in frame.columns]
    if len(frame) == 0:
        raise InferenceError("the data has a header but no rows; nothing to infer from")
    for name in [*([target] if target is not None else []), *sensitive]:
        if name not in names:
            raise InferenceError(
                f"column {name!r} is not in the data; the columns are {', '.join(names[:30])}"
                + (" ..." if len(names) > 30 else "")
            )
    guessed = target is None
    if target is None:
        target, how = _guess_target(frame)
    else:
        how = "given with --target"
    target_spec, label_note, warnings = _target_spec(target, frame[target])

    findings: list[ColumnFinding] = []
    for name in names:
        if name == target:
            values, missing = _present(frame[name])
            findings.append(
                ColumnFinding(
                    name,
                    "target",
                    None,
                    len(values),
                    missing,
                    int(values.nunique()),
                    "the label (see target below)",
                )
            )
            continue
        findings.append(
            _classify(name, frame[name], min_rows=min_category_rows, max_categories=max_categories)
        )

    by_name = {finding.name: finding for finding in findings}
    for name in sensitive:
        if name == target:
            raise InferenceError(f"sensitive column {name!r} is the target; choose another")
        finding = by_name[name]
        if finding.type == "numeric":
            raise InferenceError(
                f"sensitive column {name!r} is numeric ({finding.note}); groups need discrete "
                f"values: add a banded column to the data (e.g. {name}_band with values like "
                "'40-49') and pass that, or leave it out"
            )
        if finding.role == "ignored":
            by_name[name] = ColumnFinding(
                name,
                "sensitive",
                None,
                finding.rows,
                finding.missing,
                finding.distinct,
                f"sensitive attribute only, not a feature ({finding.note})",
            )
    findings = [by_name[finding.name] for finding in findings]

    features = [finding for finding in findings if finding.role == "feature"]
    if not features:
        raise InferenceError(
            "no column is usable as a feature (every one is the target, ignored or empty); "
            "see the findings and fix the data"
        )
    columns = tuple(
        tabular.ColumnSpec(
            name=finding.name,
            type=finding.type or "",
            transform=finding.transform,
            categories=finding.categories or None,
        )
        for finding in features
    )
    schema = tabular.DatasetSchema(
        columns=columns, target=target_spec, sensitive=tuple(dict.fromkeys(sensitive))
    )
    suggested = tuple(
        finding.name
        for finding in findings
        if finding.name not in sensitive
        and finding.role in ("feature", "ignored")
        and _name_words(finding.name) & set(SENSITIVE_NAME_WORDS)
    )
    return SchemaProposal(
        schema=schema,
        columns=tuple(findings),
        rows=len(frame),
        target_guessed=guessed,
        target_note=f"{target!r} ({how}): {label_note}",
        suggested_sensitive=suggested,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------------------------
# Checking a table against a schema, column by column


@dataclass(frozen=True)
class CheckFinding:
    """One column's result of ``check_frame``: ok, or the problem and what to do."""

    column: str
    role: str  # "feature", "feature, sensitive", "target", "sensitive" or "unused"
    level: str  # "ok", "warning" or "error"
    message: str


def check_frame(frame: pd.DataFrame, schema: tabular.DatasetSchema) -> list[CheckFinding]:
    """Every problem of the table against the schema, one finding per column (not only the
    first problem, unlike ``validate_frame``); rows count from 1 (CSV line = row + 1).

    Args:
        frame: the raw table (``load_table``).
        schema: the dataset schema.

    Returns:
        A finding per schema column (feature, target, sensitive), then one per data column the
        schema does not use. No error finding means ``validate_frame`` accepts the table.
    """
    present = {str(column) for column in frame.columns}
    findings: list[CheckFinding] = []
    allowed_types = {
        "numeric": "a number",
        "boolean": "t/f, true/false, yes/no, y/n, 1/0 or 1.0/0.0",
        "categorical": "any text",
    }
    for column in schema.columns:
        role = "feature, sensitive" if column.name in schema.sensitive else "feature"
        if column.name not in present:
            findings.append(_absent(column.name, role))
            continue
        series = frame[column.name]
        try:
            values, missing = tabular.parse_column(series, column)
        except tabular.DataValidationError as exc:
            findings.append(CheckFinding(column.name, role, "error", str(exc)))
            continue
        n_missing = int(missing.sum())
        what = f"{column.type}: {len(series) - n_missing} values ({allowed_types[column.type]})"
        what += f", {n_missing} missing ({_policy(column.missing)})"
        level = "ok"
        if column.missing == "error" and n_missing:
            level = "error"
            what += (
                f"; first missing at row {_first_row(missing)}: fill the values in or "
                "set the column's missing policy to 'impute' or 'drop'"
            )
        vocabulary = column.vocabulary() if column.type == "categorical" else None
        if vocabulary is not None:
            text = np.where(missing, tabular.MISSING_CATEGORY, values.astype(object))
            outside = int((~pd.Series(text).isin(vocabulary)).sum())
            if outside:
                what += f"; {outside} rows hold a value not in 'categories': encoded as 'other'"
                level = "warning" if level == "ok" else level
        findings.append(CheckFinding(column.name, role, level, what))

    target = schema.target.column
    if target not in present:
        findings.append(_absent(target, "target"))
    else:
        findings.append(_check_target(frame[target], schema.target))
    features = {column.name for column in schema.columns}
    for name in schema.sensitive:
        if name in features:
            continue
        if name not in present:
            findings.append(_absent(name, "sensitive"))
        else:
            n_missing = int(tabular.missing_mask(frame[name]).sum())
            findings.append(
                CheckFinding(
                    name, "sensitive", "ok", f"groups only, {n_missing} missing ('__missing__')"
                )
            )
    used = features | {target, *schema.sensitive}
    for name in frame.columns:
        if str(name) not in used:
            findings.append(
                CheckFinding(str(name), "unused", "ok", "not in the schema: never read")
            )
    return findings


def _policy(missing: str) -> str:
    return {
        "impute": "imputed",
        "drop": "rows dropped",
        "error": "refused",
    }[missing]


def _absent(name: str, role: str) -> CheckFinding:
    return CheckFinding(
        name,
        role,
        "error",
        f"the schema's {role} column {name!r} is not in the data: rename the data's column or "
        "change the schema",
    )


def _check_task_target(series: pd.Series, target: tabular.TargetSpec) -> CheckFinding:
    """A multi-class or regression target: the same checks the agent applies to its rows."""
    try:
        tabular.check_target(series, target)
    except tabular.DataValidationError as exc:
        return CheckFinding(target.column, "target", "error", str(exc))
    values = series.astype(str).str.strip()
    if target.task == "multiclass":
        counts = values.value_counts()
        unseen = [c for c in target.classes or () if c not in counts.index]
        message = "classes: " + ", ".join(
            f"{c!r} {int(counts.get(c, 0))}" for c in target.classes or ()
        )
        if unseen:
            return CheckFinding(
                target.column,
                "target",
                "warning",
                f"{message}; no row holds {', '.join(map(repr, unseen))}",
            )
        return CheckFinding(target.column, "target", "ok", message)
    numbers = pd.to_numeric(values)
    return CheckFinding(
        target.column,
        "target",
        "ok",
        f"regression target: {len(numbers)} values from {numbers.min():g} to {numbers.max():g}",
    )


def _check_target(series: pd.Series, target: tabular.TargetSpec) -> CheckFinding:
    if target.task != "binary":
        return _check_task_target(series, target)
    name = target.column
    missing = tabular.missing_mask(series)
    values = series[~missing].astype(str).str.strip()
    if target.positive is not None:
        positive = int(values.isin(target.positive).sum())
        rule = f"label 1 = {', '.join(map(repr, target.positive))}"
    else:
        positive = int((~values.isin(target.negative or ())).sum())
        rule = f"label 1 = any value but {', '.join(map(repr, target.negative or ()))}"
    negative = len(values) - positive
    message = f"{rule}: {positive} rows labelled 1, {negative} labelled 0"
    if missing.any():
        first = _first_row(missing)
        return CheckFinding(
            name,
            "target",
            "error",
            f"{message}; {int(missing.sum())} rows have no label (first at row {first}): "
            "every row needs a label, fill it in or remove the row",
        )
    listed = set(target.positive or target.negative or ())
    unseen = sorted(listed - set(values))
    if not positive or not negative:
        return CheckFinding(
            name,
            "target",
            "warning",
            f"{message}; every row has the same label here: check the target's values "
            f"({_listed(values.value_counts())})",
        )
    if unseen:
        return CheckFinding(
            name,
            "target",
            "warning",
            f"{message}; the schema lists {', '.join(map(repr, unseen))}, which no row holds",
        )
    return CheckFinding(name, "target", "ok", message)
