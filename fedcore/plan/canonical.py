"""Training plans as data: canonical JSON and its hash.

A plan's identity is the SHA-256 of its canonical JSON (sorted keys, no insignificant white
space, UTF-8, no NaN/Infinity), so the server, every approver and every site agent compute the same
hash for the same content whatever the key order they received.
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
