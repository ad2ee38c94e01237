"""Site summaries as named arrays, and the one merge the server does: an elementwise sum.

Every site-side function in ``fedcore.analytics`` returns a *summary*: a ``dict`` of name to
``numpy`` array whose names and shapes are fixed by the analysis request alone (the grid, the
levels, the number of covariates), never by the site's data. So the server's merge is the sum of
the sites' arrays, name by name, and the same summaries can travel under secure aggregation,
which reveals only that sum. Every summary carries ``"sites": 1``; the merged ``"sites"`` is the
number of sites in the sum, which the minimum-sites rule reads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["Summary", "merge_sums", "summary"]

Summary = dict[str, np.ndarray]


def summary(**arrays: ArrayLike) -> Summary:
    """Build a site summary: the given arrays (float64 or int64) plus ``sites = 1``."""
    out: Summary = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
            out[name] = array.astype(np.int64)
        else:
            out[name] = array.astype(np.float64)
    out["sites"] = np.asarray(1, dtype=np.int64)
    return out


def merge_sums(parts: Sequence[Mapping[str, ArrayLike]]) -> Summary:
    """Sum the sites' summaries name by name (what secure aggregation would reveal).

    Args:
        parts: one summary per site, all with the same names and shapes.

    Raises:
        ValueError: no parts, a name missing or extra at one site, a shape that differs, or a
            value that is not finite. The message names the site (0-based) and the array.
    """
    if not parts:
        raise ValueError("no site summaries to merge; at least one site must answer")
    names = sorted(parts[0])
    total: Summary = {}
    for index, part in enumerate(parts):
        if sorted(part) != names:
            missing = sorted(set(names) - set(part))
            extra = sorted(set(part) - set(names))
            raise ValueError(
                f"site summary {index} does not match site 0: missing {missing}, extra {extra}; "
                "every site must answer the same request"
            )
        for name in names:
            array = np.asarray(part[name])
            if array.dtype.kind not in "biuf":
                raise ValueError(f"site summary {index}: {name!r} is not numeric ({array.dtype})")
            if not np.all(np.isfinite(array)):
                raise ValueError(f"site summary {index}: {name!r} holds a non-finite value")
            if name not in total:
                total[name] = array.astype(np.float64 if array.dtype.kind == "f" else np.int64)
                continue
            if array.shape != total[name].shape:
                raise ValueError(
                    f"site summary {index}: {name!r} has shape {array.shape}, site 0 sent "
                    f"{total[name].shape}; every site must answer the same request"
                )
            if array.dtype.kind == "f" and total[name].dtype != np.float64:
                total[name] = total[name].astype(np.float64)
            total[name] = total[name] + array
    return total
