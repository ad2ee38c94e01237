"""Site summaries under secure aggregation: named arrays as the integer cells SecAgg sums.

An analysis plan with ``"secure_aggregation": true`` never lets a site's summary reach the server
in clear (docs/analytics.md, "Secure aggregation of analysis sums"). The site sends its answer
without the summary, and in its place the summary's *layout* (:func:`layout`: every array's name,
shape and kind, fixed by the request alone, so every site sends the same one); the summary itself
rides in the count tail of a SecAgg vector (``fedcore.secagg``, the machinery of secure training
rounds) and the server learns only the sum over the sites.

Encoding (the fixed point of secure rounds' task parts, ``fedcore.secure_updates.fixed_limbs``):
every value of every array becomes ``TASK_LIMBS`` (8) 16-bit limbs of a 128-bit two's complement
integer; the limbs are summed exactly in the ring (each at most 65,535, below the quantiser's L
for up to 65,537 sites) and :func:`from_cells` recombines them into the exact sum of the sites'
encoded values.

- integer arrays (counts, the number of rows, ``sites``): the integer itself, no fractional
  bits. Their sum is exact; noised counts (which may be negative) too.
- float arrays (moment sums, X'X, X'y, a Newton step's log-likelihood, gradient and Hessian,
  risk-set sums): fixed point with ``TASK_FRACTION_BITS`` (32) fractional bits: each site's
  value is rounded to the nearest multiple of 2^-32, so a merged value is within ``m * 2^-33``
  (1.2e-10 per site) of the sum of the sites' doubles, and exactly the sum of their rounded
  values. A value whose magnitude reaches ``TASK_MAX_ABS`` (2^60) is refused by the site.

The vector's one float coordinate (the quantised part SecAgg requires) is 1.0 for every site:
its unmasked sum counts the contributors, a check on the roster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import Any

import numpy as np

from fedcore.secure_updates import TASK_FRACTION_BITS, TASK_LIMBS, fixed_limbs, fixed_sum

__all__ = [
    "MAX_CELLS",
    "Layout",
    "check_layout",
    "from_cells",
    "layout",
    "to_cells",
    "vector_lengths",
]

# A layout is [[name, shape, kind], ...], kind "int" or "float", names sorted.
Layout = list[list[Any]]
INT, FLOAT = "int", "float"
# The most values a secure summary may hold: its masked vector (4 bytes per limb, 8 limbs per
# value, base64 in a JSON control frame of at most 1 MiB) must fit one frame.
MAX_CELLS = 20_000
# How far one site's encoded real may be from its double: half a step of 2^-32.
RESOLUTION = 2.0**-TASK_FRACTION_BITS / 2


def layout(summary: Mapping[str, Any]) -> Layout:
    """The layout of a site summary (names sorted; shapes and kinds as the arrays have them)."""
    out: Layout = []
    for name in sorted(summary):
        array = np.asarray(summary[name])
        if array.dtype.kind not in "biuf":
            raise ValueError(f"summary array {name!r} is not numeric ({array.dtype})")
        kind = FLOAT if array.dtype.kind == "f" else INT
        out.append([str(name), [int(d) for d in array.shape], kind])
    check_layout(out)
    return out


def check_layout(value: Any) -> Layout:
    """A layout received from a site, checked (ValueError saying what is wrong)."""
    if not isinstance(value, list) or not value:
        raise ValueError("a secure answer's layout must be a non-empty list of [name, shape, kind]")
    names = []
    cells = 0
    for entry in value:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not isinstance(entry[0], str)
            or not isinstance(entry[1], list)
            or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry[1])
            or entry[2] not in (INT, FLOAT)
        ):
            raise ValueError(f"layout entry {entry!r} is not [name, shape, 'int' | 'float']")
        names.append(entry[0])
        cells += math.prod(entry[1])
    if names != sorted(set(names)):
        raise ValueError("a layout's names must be distinct and sorted")
    if cells > MAX_CELLS:
        raise ValueError(
            f"the summary holds {cells} values; a secure summary holds at most {MAX_CELLS} "
            "(a coarser grid, fewer levels or fewer covariates)"
        )
    return value


def vector_lengths(spec: Layout) -> tuple[int, int]:
    """(vector_length, count_length) of the SecAgg vector that carries a summary of ``spec``."""
    cells = sum(math.prod(shape) for _, shape, _ in spec)
    return 1 + TASK_LIMBS * cells, TASK_LIMBS * cells


def to_cells(summary: Mapping[str, Any], spec: Layout) -> list[int]:
    """A site's summary as the count tail of its SecAgg vector, in ``spec``'s order.

    Raises:
        ValueError: the summary does not match the layout, or a value cannot be encoded.
    """
    if layout(summary) != spec:
        raise ValueError("the summary does not match the layout the site announced")
    cells: list[int] = []
    for name, _, kind in spec:
        values = np.asarray(summary[name]).reshape(-1)
        for value in values.tolist():
            if kind == INT:
                cells.extend(fixed_limbs(int(value), f"{name!r}", fraction_bits=0))
            else:
                cells.extend(fixed_limbs(float(value), f"{name!r}"))
    return cells


def from_cells(values: Sequence[int] | np.ndarray, spec: Layout) -> dict[str, np.ndarray]:
    """The merged summary from the unmasked sum of the sites' count tails.

    Integer arrays are exact int64; float arrays the exact sum of the sites' fixed-point values,
    rounded once to the nearest double.
    """
    values = [int(v) for v in values]
    if len(values) != vector_lengths(spec)[1]:
        raise ValueError(f"{len(values)} summed cells for a layout of {vector_lengths(spec)[1]}")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, kind in spec:
        size = math.prod(shape)
        numbers = []
        for _ in range(size):
            limbs = values[offset : offset + TASK_LIMBS]
            offset += TASK_LIMBS
            if kind == INT:
                numbers.append(fixed_sum(limbs, fraction_bits=0)[0])
            else:
                numerator, denominator = fixed_sum(limbs, fraction_bits=TASK_FRACTION_BITS)
                numbers.append(float(Fraction(numerator, denominator)))
        dtype = np.int64 if kind == INT else np.float64
        out[name] = np.asarray(numbers, dtype=dtype).reshape(shape)
    return out
