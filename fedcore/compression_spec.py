"""A plan's ``compression`` section, read and checked without torch.

The methods, :class:`CompressionSpec` and its errors. :mod:`fedcore.compression` (the encoder
and decoder, which need torch) imports them from here, and so does the plan language: checking
a plan loads no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "COMPRESSED_METHODS",
    "METHODS",
    "CompressionError",
    "CompressionSpec",
    "CompressionSpecError",
]

METHODS: tuple[str, ...] = ("none", "float16", "int8", "topk")
COMPRESSED_METHODS: tuple[str, ...] = ("float16", "int8", "topk")


class CompressionError(ValueError):
    """A compressed update cannot be encoded or decoded; ``code`` is the error frame's code."""

    code = "invalid_update"


class CompressionSpecError(CompressionError):
    """The plan's ``compression`` section is invalid; ``field`` is its dotted path."""

    code = "invalid_task"

    def __init__(self, message: str, field: str = "compression") -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CompressionSpec:
    """A plan's compression: the method and, for ``topk``, the fraction of coordinates sent."""

    method: str = "none"
    ratio: float | None = None

    @classmethod
    def from_section(cls, section: Any) -> CompressionSpec:
        """Parse a plan's ``compression`` value (None = no compression).

        Raises:
            CompressionSpecError: naming the field and the problem.
        """
        if section is None:
            return cls()
        if not isinstance(section, Mapping):
            raise CompressionSpecError(
                'compression must be an object such as {"method": "topk", "ratio": 0.01}'
            )
        unknown = sorted(str(key) for key in section if key not in ("method", "ratio"))
        if unknown:
            raise CompressionSpecError(
                f"compression has unknown key(s) {', '.join(map(repr, unknown))}; "
                "allowed: method, ratio"
            )
        method = section.get("method", "none")
        if method not in METHODS:
            raise CompressionSpecError(
                f"compression.method {method!r} is unknown; choose one of {', '.join(METHODS)}",
                "compression.method",
            )
        ratio = section.get("ratio")
        if method == "topk":
            if (
                isinstance(ratio, bool)
                or not isinstance(ratio, int | float)
                or not math.isfinite(ratio)
                or not 0 < ratio <= 1
            ):
                raise CompressionSpecError(
                    f"compression.ratio must be a number in (0, 1] for topk (the fraction of "
                    f"each tensor's coordinates sent), got {ratio!r}",
                    "compression.ratio",
                )
            return cls(method, float(ratio))
        if ratio is not None:
            raise CompressionSpecError(
                f"compression.ratio applies to topk only, not {method!r}", "compression.ratio"
            )
        return cls(method)

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any]) -> CompressionSpec:
        """The compression of a plan spec (its ``compression`` key, default none)."""
        return cls.from_section(plan.get("compression"))

    @property
    def compressed(self) -> bool:
        """Whether updates travel as a compressed change rather than dense weights."""
        return self.method != "none"

    def k(self, numel: int) -> int:
        """Coordinates of a change of ``numel`` elements that top-k sends: ceil(ratio * n)."""
        assert self.ratio is not None
        # round() first: 0.1 * 30 is 3.0000000000000004 in floating point, which is 3.
        return min(numel, max(1, math.ceil(round(self.ratio * numel, 9)))) if numel else 0

    def to_dict(self) -> dict[str, Any]:
        """The plan section this spec stands for."""
        return {"method": self.method} | ({"ratio": self.ratio} if self.ratio is not None else {})
