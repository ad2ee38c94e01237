"""Training plans as data: canonical JSON and its hash.

A plan's identity is the SHA-256 of its canonical JSON (sorted keys, no insignificant white
space, UTF-8, no NaN/Infinity), so the server, every approver and every site agent compute the same
hash for the same content whatever the key order they received.

A plan version holds its name and description inside the spec (:func:`versioned_spec`), so the
hash -- what stewards approve, sites approve locally and grants name -- covers them: a plan with
the same content under another name is another plan, with another hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def canonical_json(spec: Mapping[str, Any]) -> str:
    """Serialise a plan spec canonically.

    Args:
        spec: the plan as JSON-compatible data.

    Returns:
        The canonical JSON text.

    Raises:
        ValueError: the spec holds NaN, Infinity or a value JSON cannot represent.
    """
    return json.dumps(
        spec, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def plan_hash(spec: Mapping[str, Any]) -> str:
    """Return the hex SHA-256 of the plan's canonical JSON.

    Args:
        spec: the plan as JSON-compatible data.
    """
    return hashlib.sha256(canonical_json(spec).encode("utf-8")).hexdigest()


def versioned_spec(
    spec: Mapping[str, Any], *, name: str, description: str | None
) -> dict[str, Any]:
    """The spec as a plan version stores, hashes and sends it: with its name and description.

    Args:
        spec: the plan as JSON-compatible data (its own ``name``/``description`` are replaced).
        name: the plan's name.
        description: the plan's description; empty or None is stored as null.

    Returns:
        A new dict: ``spec`` with ``name`` and ``description`` set.
    """
    return {**spec, "name": name, "description": description or None}
