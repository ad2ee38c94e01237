"""Reading a plan file (YAML or JSON) and checking it locally with the plan language."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedcore.plan import plan_errors, plan_hash, versioned_spec
from quorum.client import QuorumError

try:  # PyYAML is optional: without it plan files are JSON only.
    import yaml
except ImportError:  # pragma: no cover - the dev install has it
    yaml = None

YAML_SUFFIXES = (".yaml", ".yml")
# A plan file is either a bare spec, or these keys around one (the CLI's options override them).
WRAPPER_KEYS = ("name", "description", "consortium", "silos", "spec")


@dataclass
class PlanFile:
    """A plan file's spec and, when the file wraps it, the proposal's other fields."""

    path: Path
    spec: Any
    name: str | None = None
    description: str | None = None
    consortium: int | None = None
    silos: list[int] | None = None
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def hash(self) -> str:
        """The hash the plan's version will have: with its name and description when the file
        names it (as the server computes it), else of the bare spec."""
        if self.name and isinstance(self.spec, dict):
            return plan_hash(
                versioned_spec(self.spec, name=self.name, description=self.description)
            )
        return plan_hash(self.spec)


def _parse(path: Path, text: str) -> Any:
    if path.suffix.lower() in YAML_SUFFIXES:
        if yaml is None:
            raise QuorumError(
                f"{path}: YAML plan files need PyYAML, which is not installed "
                "(pip install pyyaml), or write the plan as JSON"
            )
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            problem = getattr(exc, "problem", None) or str(exc)
            raise QuorumError(f"{path}: not valid YAML{where}: {problem}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        hint = "" if yaml is not None else " (YAML needs a .yaml or .yml file name)"
        raise QuorumError(
            f"{path}: not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}{hint}"
        ) from None


def _ids(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(item, int) and not isinstance(item, bool) for item in value
    ):
        raise QuorumError(f"{where}: silos must be a list of silo ids, like [1, 2]")
    return value


def read_plan_file(path_text: str) -> PlanFile:
    """Read and check a plan file; ``errors`` maps each dotted path to its problem."""
    path = Path(path_text).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise QuorumError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise QuorumError(f"cannot read {path}: {exc}") from None
    document = _parse(path, text)
    plan = PlanFile(path=path, spec=document)
    if isinstance(document, dict) and "spec" in document:
        extra = sorted(str(key) for key in document if key not in WRAPPER_KEYS)
        if extra:
            plan.errors = {
                key: f"unknown key {key!r} beside 'spec'; allowed: {', '.join(WRAPPER_KEYS)}"
                for key in extra
            }
        plan.spec = document["spec"]
        for key in ("name", "description"):
            if document.get(key) is not None and not isinstance(document[key], str):
                plan.errors[key] = f"must be text, got {type(document[key]).__name__}"
        plan.name = document.get("name") if isinstance(document.get("name"), str) else None
        desc = document.get("description")
        plan.description = desc if isinstance(desc, str) else None
        consortium = document.get("consortium")
        if consortium is not None:
            if not isinstance(consortium, int) or isinstance(consortium, bool):
                plan.errors["consortium"] = "must be a consortium id (a whole number)"
            else:
                plan.consortium = consortium
        if document.get("silos") is not None:
            try:
                plan.silos = _ids(document["silos"], str(path))
            except QuorumError:
                plan.errors["silos"] = "must be a list of silo ids, like [1, 2]"
        prefix = "spec."
    else:
        prefix = ""
    found = plan_errors(plan.spec)
    if prefix and "spec" in found:  # the spec itself is not an object
        found = {"": found.pop("spec"), **found}
    plan.errors.update({f"{prefix}{key}".rstrip("."): msg for key, msg in found.items()})
    return plan
