"""A released analysis result as one table: the rows under the dashboard's chart, the CSV export
and the ``quorum run analysis`` table are this table (server and CLI both use it)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["analysis_table"]


def analysis_table(result: Mapping[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """A released analysis result as one table: the header and the rows (None: suppressed).

    The table under the dashboard's chart and the CSV export are this table."""
    kind = result["kind"]
    if kind == "kaplan_meier":
        header = ["group", "time", "survival", "ci_lower", "ci_upper", "at_risk", "events"]
        rows = [
            [group, *values]
            for group, curve in result["curves"].items()
            for values in zip(*(curve[key] for key in header[1:]), strict=True)
        ]
        return header, rows
    if kind in ("cox", "linear_regression", "logistic_regression"):
        ratio = [k for k in ("hazard_ratio", "odds_ratio") if k in result]
        header = ["term", "coef", "se", "statistic", "p_value", "ci_lower", "ci_upper", *ratio]
        return header, [[name, *(result[k][name] for k in header[1:])] for name in result["coef"]]
    if kind == "quantile":
        header = ["quantile", "value"]
        return header, [[p, v] for p, v in zip(result["probs"], result["values"], strict=True)] + [
            ["n", result["n"]]
        ]
    if kind == "moments":
        header = ["column", "n", "mean", "variance", "sd"]
        return header, [
            [name, result["n"], result["mean"][i], result["variance"][i], result["sd"][i]]
            for i, name in enumerate(result["columns"])
        ]
    if kind == "histogram":
        edges = result["edges"]
        bounds = [None, *edges, None]
        header = ["from", "to", "count"]
        return header, [
            [bounds[i], bounds[i + 1], count] for i, count in enumerate(result["cells"])
        ] + [["total", "", result["total"]]]
    if "col_levels" in result:  # crosstab
        header = ["", *result["col_levels"], "total"]
        rows = [
            [level, *cells, total]
            for level, cells, total in zip(
                result["row_levels"], result["cells"], result["row_totals"], strict=True
            )
        ]
        return header, [*rows, ["total", *result["col_totals"], result["total"]]]
    header = ["level", "count"]
    rows = [
        [level, count] for level, count in zip(result["row_levels"], result["cells"], strict=True)
    ]
    return header, [*rows, ["total", result["total"]]]
