"""The plan language's key definitions: one :class:`Key` per setting, checked, documented and
turned into JSON Schema from the same object.

A section is a tuple of keys. :func:`check_section` refuses unknown keys (naming the allowed
ones) and checks each given value's type and range; the cross-field rules that no single key can
express live in :mod:`fedcore.plan.spec`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


def is_int(value: object) -> bool:
    """A JSON integer (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: object) -> bool:
    """A finite JSON number (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(value)


@dataclass(frozen=True)
class Key:
    """One key of a plan section.

    ``type`` is a JSON Schema type name ("integer", "number", "boolean", "string", "object",
    "array"); ``minimum``/``maximum`` bound numbers (``exclusive_*`` makes a bound open);
    ``choices`` lists the allowed values; ``nullable`` lets the key be null (meaning: not used).
    """

    name: str
    type: str
    doc: str
    default: Any = REQUIRED
    minimum: float | None = None
    maximum: float | None = None
    exclusive_min: bool = False
    exclusive_max: bool = False
    choices: tuple[Any, ...] | None = None
    nullable: bool = False

    @property
    def required(self) -> bool:
        """Whether a plan must give this key."""
        return self.default is REQUIRED

    def expectation(self) -> str:
        """What the key accepts, in words ("an integer >= 1", "a number in (0, 1)")."""
        if self.choices is not None:
            text = "one of " + ", ".join(repr(c) for c in self.choices)
        else:
            noun = {
                "integer": "an integer",
                "number": "a number",
                "boolean": "true or false",
                "string": "a non-empty string",
                "object": "an object",
                "array": "a list",
            }[self.type]
            low, high = self.minimum, self.maximum
            if low is not None and high is not None:
                left = "(" if self.exclusive_min else "["
                right = ")" if self.exclusive_max else "]"
                text = f"{noun} in {left}{_fmt(low)}, {_fmt(high)}{right}"
            elif low == 0 and self.exclusive_min:
                text = f"a positive {self.type}"
            elif low is not None:
                text = f"{noun} {'>' if self.exclusive_min else '>='} {_fmt(low)}"
            elif high is not None:
                text = f"{noun} {'<' if self.exclusive_max else '<='} {_fmt(high)}"
            else:
                text = noun
        return text + (" (or null when not used)" if self.nullable else "")

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not acceptable for this key, or None."""
        if value is None and self.nullable:
            return None
        if not self._fits(value):
            return f"must be {self.expectation()}; got {value!r}"
        return None

    def _fits(self, value: Any) -> bool:
        if self.choices is not None:
            return any(value == c and type(value) is type(c) for c in self.choices)
        if self.type == "integer":
            ok = is_int(value)
        elif self.type == "number":
            ok = is_number(value)
        elif self.type == "boolean":
            return isinstance(value, bool)
        elif self.type == "string":
            return isinstance(value, str) and value.strip() != ""
        elif self.type == "object":
            return isinstance(value, Mapping)
        else:
            return isinstance(value, list)
        if not ok:
            return False
        if self.minimum is not None and (
            value < self.minimum or (self.exclusive_min and value == self.minimum)
        ):
            return False
        return self.maximum is None or not (
            value > self.maximum or (self.exclusive_max and value == self.maximum)
        )

    def json_schema(self) -> dict[str, Any]:
        """This key as a JSON Schema property."""
        schema: dict[str, Any] = {"description": self.doc}
        if self.choices is not None:
            schema["enum"] = [*self.choices, *([None] if self.nullable else [])]
        else:
            schema["type"] = [self.type, "null"] if self.nullable else self.type
            if self.minimum is not None:
                schema["exclusiveMinimum" if self.exclusive_min else "minimum"] = self.minimum
            if self.maximum is not None:
                schema["exclusiveMaximum" if self.exclusive_max else "maximum"] = self.maximum
            if self.type == "string":
                schema["minLength"] = 1
        if not self.required:
            schema["default"] = self.default
        return schema


def unknown_keys(section: Mapping[str, Any], allowed: tuple[str, ...]) -> str | None:
    """The message for keys of ``section`` not in ``allowed``, or None."""
    unknown = sorted(str(key) for key in section if key not in allowed)
    if not unknown:
        return None
    return f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(allowed)}"


def names(keys: tuple[Key, ...]) -> tuple[str, ...]:
    """The names of a section's keys, in order."""
    return tuple(key.name for key in keys)


def defaults(keys: tuple[Key, ...]) -> dict[str, Any]:
    """A section's defaults (required keys left out)."""
    return {key.name: key.default for key in keys if not key.required}


def check_section(
    section: Mapping[str, Any],
    keys: tuple[Key, ...],
    path: str,
    errors: dict[str, str],
    *,
    skip: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Check a section against its keys; return it with the defaults filled in.

    Unknown keys go under ``path``, a bad or missing value under ``path.key``. Keys in
    ``skip`` are left to the caller (validated by their own module).
    """
    if problem := unknown_keys(section, names(keys)):
        errors[path] = problem
    values = {**defaults(keys), **section}
    for key in keys:
        if key.name in skip:
            continue
        where = f"{path}.{key.name}" if path else key.name
        if key.name not in values:
            errors[where] = f"required: {key.expectation()} ({key.doc})"
        elif problem := key.problem(values[key.name]):
            errors[where] = problem
    return values


def section_schema(keys: tuple[Key, ...], doc: str, **extra: Any) -> dict[str, Any]:
    """A section as a JSON Schema object with no other keys allowed."""
    schema: dict[str, Any] = {
        "type": "object",
        "description": doc,
        "properties": {key.name: key.json_schema() for key in keys},
        "additionalProperties": False,
    }
    required = [key.name for key in keys if key.required]
    if required:
        schema["required"] = required
    schema["properties"].update(extra)
    return schema
