"""Site onboarding: ``quorum-agent init`` (propose schema.json and site.toml from the data) and the
schema part of ``quorum-agent check``.

Everything happens on this machine: the data file is read here and nothing is sent. The
inference rules are in :mod:`fedcore.schema_inference`; this module reads files, writes the
proposal and prints what the steward has to review (docs/site-onboarding.md).
"""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TextIO

import pandas as pd

from clientagent.config import DATA_SUFFIXES
from clientagent.data import DataFileError, LocalData
from fedcore import schema_inference, tabular

SCHEMA_FILE = "schema.json"
CONFIG_FILE = "site.toml"
TOKEN_PLACEHOLDER = "token.txt"
SERVER_URL_PLACEHOLDER = "wss://quorum.example.org/ws/agent/"
PUBLIC_KEY_PLACEHOLDER = "ed25519:PASTE-THE-SERVER-KEY-HERE"
ROW_NOTE = "rows count data rows from 1 (the header is line 1, so CSV line = row + 1)"


class OnboardingError(Exception):
    """A problem to report in one line and exit 2 (the message names file and fix)."""


def read_data(path: Path) -> pd.DataFrame:
    """The raw table of a data file, or OnboardingError naming the file and the problem."""
    if not path.name.lower().endswith(DATA_SUFFIXES):
        raise OnboardingError(
            f"{path}: use a .csv, .csv.gz, .parquet or .pq file (convert the data first)"
        )
    if not path.is_file():
        raise OnboardingError(f"{path}: no such file; check the path")
    problem = schema_inference.csv_header_problem(path)
    if problem is not None:
        raise OnboardingError(f"{path}: {problem}")
    try:
        return LocalData(path).load()
    except (DataFileError, ValueError) as exc:
        raise OnboardingError(" ".join(str(exc).split())) from None


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are valid TOML escapes)."""
    return json.dumps(value, ensure_ascii=False)


def _agent_name(data: Path) -> str:
    stem = data.name.split(".")[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", stem).strip("-") or "site"


def site_toml(
    *,
    data: Path,
    out: Path,
    rows: int,
    min_category_rows: int,
    server_url: str | None = None,
    server_key: str | None = None,
    steward_keys: Sequence[str] = (),
) -> str:
    """The proposed site.toml: every value a steward must fill in or review is marked REVIEW.

    ``server_url``, ``server_key`` fill in what would otherwise be placeholders; ``steward_keys``
    pins the stewards' public keys in ``[governance]``, and then a steward's signature is the
    site's approval (``require_local_approval = false``).
    """
    # Relative when the data sits in the output folder (the pair can move together), else absolute.
    shown = data.relative_to(out).as_posix() if data.is_relative_to(out) else str(data)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"""\
# site.toml proposed by `quorum-agent init` on {now} from {data.name} ({rows} rows).
# Review every line marked REVIEW, then run: quorum-agent check --config {CONFIG_FILE}
# (docs/site-onboarding.md). Relative paths are resolved against this file's folder.

[server]
# REVIEW: the consortium server's agent address, from the consortium admin.
url = {_toml_string(server_url or SERVER_URL_PLACEHOLDER)}
# REVIEW: the file holding this silo's agent token. The consortium admin sees the token once,
# when admitting the silo registered with {SCHEMA_FILE}; save it in this file, readable only
# by the agent's user (or write token = "..." instead of token_file).
token_file = {_toml_string(TOKEN_PLACEHOLDER)}
# REVIEW: the server's signing key, pinned: `python manage.py server_key` on the server, or
# GET /api/v1/server-key/; compare the two.
public_key = {_toml_string(server_key or PUBLIC_KEY_PLACEHOLDER)}

[data]
# Read on this machine only: no row leaves the site, only model weights and aggregates.
path = {_toml_string(shown)}
# REVIEW: the proposed dataset schema (column types, target, sensitive attributes, declared
# categories). Register the silo with it; `quorum-agent check` validates the data against it.
schema = {_toml_string(SCHEMA_FILE)}

[agent]
name = {_toml_string(_agent_name(data))}  # REVIEW: shown in the server's logs

[policy]
# REVIEW: what this site accepts whatever the server asks (docs/operations.md, "A site agent").
{_approval_lines(steward_keys)}
# A categorical value held fewer times here is never named in the statistics sent to the
# server; the same floor init used to declare categories.
min_category_count = {min_category_rows}
{_governance_table(steward_keys)}"""


def _approval_lines(steward_keys: Sequence[str]) -> str:
    if steward_keys:
        return (
            "# The stewards' keys are pinned in [governance] below: a plan trains here only when\n"
            "# one of them signed its approval (docs/governance.md), so no second, local approval.\n"
            "require_local_approval = false"
        )
    return (
        "# Train only on plan hashes approved here with `quorum-agent approve <hash>`; or pin your\n"
        "# stewards' keys in [governance] steward_keys and set this to false.\n"
        "require_local_approval = true"
    )


def _governance_table(steward_keys: Sequence[str]) -> str:
    if not steward_keys:
        return ""
    keys = ", ".join(_toml_string(key) for key in steward_keys)
    return (
        "\n[governance]\n# REVIEW: the public keys of the stewards whose signed approvals this site "
        f"accepts.\nsteward_keys = [{keys}]\n"
    )


def with_target_labels(
    proposal: schema_inference.SchemaProposal,
    frame: pd.DataFrame,
    *,
    positive: Sequence[str] = (),
    negative: Sequence[str] = (),
) -> schema_inference.SchemaProposal:
    """The proposal with the target's labels given by the operator (``--positive`` or
    ``--negative``), checked against the values the target column holds.

    Raises:
        OnboardingError: both or neither given, a value the column never holds, or a target
            that is not a binary one.
    """
    if bool(positive) == bool(negative):
        raise OnboardingError("give the target's labels with --positive or --negative, not both")
    target = proposal.schema.target
    if target.task != "binary":
        raise OnboardingError(
            f"--positive/--negative set a binary target's labels; target {target.column!r} is "
            f"task {target.task!r}"
        )
    key, values = ("positive", list(positive)) if positive else ("negative", list(negative))
    column = frame[target.column]
    held = {str(value).strip() for value in column.dropna().unique()}
    unknown = [value for value in values if value not in held]
    if unknown:
        shown = ", ".join(sorted(held)[:20])
        raise OnboardingError(
            f"--{key} {' '.join(unknown)}: column {target.column!r} holds no such value; it "
            f"holds: {shown}"
        )
    schema_dict = proposal.schema.to_dict()
    schema_dict["target"] = {"column": target.column, key: values}
    try:
        schema = tabular.DatasetSchema.from_dict(schema_dict)
    except tabular.SchemaError as exc:
        raise OnboardingError(f"--{key}: {exc}") from None
    which = "label 1" if key == "positive" else "label 0"
    note = f"{target.column!r}: {which} = {', '.join(map(repr, values))} (given with --{key})"
    return replace(proposal, schema=schema, target_note=note)


def _refuse_existing(paths: Sequence[Path], force: bool) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing and not force:
        raise OnboardingError(
            f"{' and '.join(existing)} already {'exists' if len(existing) == 1 else 'exist'}; "
            "nothing was written. Choose another --out folder, or pass --force to replace "
            f"{'it' if len(existing) == 1 else 'them'}"
        )


def _write(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _table(rows: Sequence[Sequence[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return [
        "  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]])
        for row in rows
    ]


def report_proposal(proposal: schema_inference.SchemaProposal, out: TextIO) -> None:
    """Print the per-column findings, the target and the sensitive attributes."""
    rows = [["COLUMN", "USE", "MISSING", "VALUES", "WHY / WHAT TO REVIEW"]]
    for finding in proposal.columns:
        use = finding.type if finding.role == "feature" else finding.role
        if finding.transform != "none":
            use += f"+{finding.transform}"
        rows.append(
            [finding.name, use or "", str(finding.missing), str(finding.distinct), finding.note]
        )
    for line in _table(rows):
        print(line.rstrip(), file=out)
    print(file=out)
    marker = "CONFIRM " if proposal.target_guessed else ""
    print(f"{marker}target: {proposal.target_note}", file=out)
    sensitive = proposal.schema.sensitive
    print(f"sensitive: {', '.join(sensitive) if sensitive else 'none declared'}", file=out)
    if proposal.suggested_sensitive:
        names = " ".join(proposal.suggested_sensitive)
        print(
            f"suggested sensitive attributes (by name, not added): {names}; declare them with "
            "--sensitive (a numeric one needs a banded column)",
            file=out,
        )
    for warning in proposal.warnings:
        print(f"WARNING: {warning}", file=out)


def init(
    *,
    data: str,
    target: str | None,
    sensitive: Sequence[str],
    out_dir: str,
    min_category_rows: int,
    force: bool,
    confirm: Callable[[str], bool] | None,
    out: TextIO | None = None,
    positive: Sequence[str] = (),
    negative: Sequence[str] = (),
    server_url: str | None = None,
    server_key: str | None = None,
    steward_keys: Sequence[str] = (),
) -> None:
    """``quorum-agent init``: propose schema.json and site.toml for a data file.

    Args:
        confirm: asked to confirm a guessed target (None: no one to ask; the output says
            that the guess needs confirming).
        positive, negative: the target's labels, instead of the guess (one of them).
        server_url, server_key, steward_keys: written into site.toml (see :func:`site_toml`).

    Raises:
        OnboardingError: the data, the options or the output folder are unusable; nothing
            was written.
    """
    out = out or sys.stdout
    data_path = Path(data).expanduser().resolve()
    out_path = Path(out_dir).expanduser().resolve()
    if out_path.exists() and not out_path.is_dir():
        raise OnboardingError(f"--out {out_path} is a file; give a folder")
    schema_path, config_path = out_path / SCHEMA_FILE, out_path / CONFIG_FILE
    _refuse_existing((schema_path, config_path), force)
    frame = read_data(data_path)
    try:
        proposal = schema_inference.propose_schema(
            frame, target=target, sensitive=sensitive, min_category_rows=min_category_rows
        )
    except schema_inference.InferenceError as exc:
        raise OnboardingError(f"{data_path}: {exc}") from None
    if positive or negative:
        proposal = with_target_labels(proposal, frame, positive=positive, negative=negative)
    print(
        f"read {data_path}: {proposal.rows} rows, {len(frame.columns)} columns (on this machine "
        "only; nothing was sent)",
        file=out,
    )
    print(f"missing values: empty cells and {_tokens()} (docs/site-onboarding.md)\n", file=out)
    report_proposal(proposal, out)
    column = proposal.schema.target.column
    if proposal.target_guessed and confirm is not None:
        if not confirm(f"use {column!r} as the target (the column to predict)? [y/N] "):
            raise OnboardingError(
                f"target {column!r} not confirmed; nothing was written. Run init again with "
                "--target COLUMN"
            )
    out_path.mkdir(parents=True, exist_ok=True)
    _write(schema_path, json.dumps(proposal.schema.to_dict(), indent=2, ensure_ascii=False) + "\n")
    _write(
        config_path,
        site_toml(
            data=data_path,
            out=out_path,
            rows=proposal.rows,
            min_category_rows=min_category_rows,
            server_url=server_url,
            server_key=server_key,
            steward_keys=steward_keys,
        ),
    )
    features = len(proposal.schema.columns)
    print(f"\nwrote {schema_path} ({features} feature columns)", file=out)
    print(f"wrote {config_path}", file=out)
    print("next:", file=out)
    if proposal.target_guessed and confirm is None:
        print(
            f"  - the target {column!r} was GUESSED: confirm it, or run init again with "
            "--target COLUMN --force",
            file=out,
        )
    print(
        f"  - review {SCHEMA_FILE} (types, target, sensitive, categories) and the REVIEW lines "
        f"of {CONFIG_FILE}",
        file=out,
    )
    print(f"  - quorum-agent check --config {config_path}", file=out)
    print(
        f"  - register the silo with {SCHEMA_FILE} (dashboard, or POST /api/v1/silos/); "
        "the token shown at admission goes into the token file",
        file=out,
    )


def _tokens() -> str:
    return " ".join(repr(token) for token in tabular.MISSING_TOKENS if token)


def load_schema_file(path: Path) -> tabular.DatasetSchema:
    """Read and validate a dataset schema JSON file; OnboardingError names file, place and fix."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise OnboardingError(
            f"{path}: no such schema file; write it with `quorum-agent init`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise OnboardingError(f"{path}: cannot read the schema file: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise OnboardingError(
            f"{path}: line {exc.lineno} column {exc.colno}: not valid JSON ({exc.msg})"
        ) from None
    try:
        return tabular.DatasetSchema.from_dict(document)
    except (tabular.SchemaError, TypeError, AttributeError) as exc:
        raise OnboardingError(
            f"{path}: not a dataset schema: {exc} (the format: docs/site-onboarding.md)"
        ) from None


def check_schema(
    *, data: Path, schema_path: Path, frame: pd.DataFrame, out: TextIO | None = None
) -> bool:
    """Check the data against the schema file column by column; print the findings.

    Returns:
        Whether the data passes (no error finding).

    Raises:
        OnboardingError: the schema file is unusable.
    """
    out = out or sys.stdout
    schema = load_schema_file(schema_path)
    print(f"schema: {schema_path}: valid, hash {tabular.schema_hash(schema)[:16]}", file=out)
    findings = schema_inference.check_frame(frame, schema)
    rows = [["LEVEL", "COLUMN", "ROLE", "FINDING"]]
    rows += [[f.level.upper(), f.column, f.role, f.message] for f in findings]
    for line in _table(rows):
        print(line.rstrip(), file=out)
    errors = sum(f.level == "error" for f in findings)
    warnings = sum(f.level == "warning" for f in findings)
    if errors:
        print(
            f"{data}: {errors} column(s) with errors, {warnings} with warnings ({ROW_NOTE})",
            file=out,
        )
        return False
    try:  # the check above mirrors validate_frame; training runs validate_frame itself
        valid = tabular.validate_frame(frame, schema)
    except tabular.DataValidationError as exc:
        print(f"ERROR {data}: {exc} ({ROW_NOTE})", file=out)
        return False
    print(
        f"{data}: the data matches the schema ({len(valid)} rows usable, {warnings} warning(s))",
        file=out,
    )
    return True
