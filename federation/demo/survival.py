"""The survival demo's result: the released analyses in the JSON line of the issue's format, and
the lines the demo prints.

``manage.py demo --scenario survival`` runs the scenario's analysis plans (``scenarios.survival``)
as governed runs and hands their released results here, in the scenario's order: the cohort
cross-table, Kaplan-Meier by sex with the log-rank test, Cox stratified by site, Cox with one
baseline hazard. No Django: the test checks this JSON against lifelines on the pooled rows.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from federation.demo.scenarios import LUNG_SILOS, Scenario

__all__ = ["survival_lines", "survival_summary"]

CURVE_KEYS = ("time", "survival", "ci_lower", "ci_upper")


def survival_summary(scenario: Scenario, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of the survival demo (without ``seconds``, which the command adds)."""
    _, km, stratified, unstratified = results
    return {
        "scenario": scenario.name,
        "sites": {silo: list(LUNG_SILOS[silo]) for silo in scenario.sites},
        "kaplan_meier": {
            group: {key: curve[key] for key in CURVE_KEYS} for group, curve in km["curves"].items()
        },
        "logrank": {
            "statistic": km["logrank"]["statistic"],
            "p_value": km["logrank"]["p_value"],
        },
        "cox": {
            name: {"coef": cox["coef"], "se": cox["se"]}
            for name, cox in (("stratified", stratified), ("unstratified", unstratified))
        },
    }


def survival_lines(results: Sequence[dict[str, Any]]) -> list[str]:
    """What the demo prints of each released result."""
    counts, km, *models = results
    lines = [f"Cohort: sex by ECOG score ({counts['sites']} sites, suppressed cells shown as -)"]
    header = ["sex \\ ECOG", *counts["col_levels"], "total"]
    lines.append("  " + "".join(f"{h:>11}" for h in header))
    rows = zip(counts["row_levels"], counts["cells"], counts["row_totals"], strict=True)
    for level, cells, total in rows:
        shown = ["-" if c is None else str(c) for c in [*cells, total]]
        lines.append("  " + "".join(f"{v:>11}" for v in [level, *shown]))
    totals = ["-" if c is None else str(c) for c in [*counts["col_totals"], counts["total"]]]
    lines.append("  " + "".join(f"{v:>11}" for v in ["total", *totals]))
    lines.append(
        f"  {counts.get('suppressed', 0)} entries withheld: {counts.get('suppressed_primary', 0)} "
        f"below the minimum cell count of {counts['min_cell_count']}, the others so that no "
        "released total reveals them"
    )
    lines.append("Kaplan-Meier by sex (exponential Greenwood 95% intervals):")
    for group, curve in km["curves"].items():
        median = next(
            (t for t, s in zip(curve["time"], curve["survival"], strict=True) if s <= 0.5), None
        )
        lines.append(
            f"  sex {group}: {curve['at_risk'][0]} patients, {sum(curve['events'])} deaths, "
            f"median survival {median if median is not None else 'not reached'}"
        )
    logrank = km["logrank"]
    lines.append(
        f"  log-rank test: chi-square {logrank['statistic']:.4f}, p = {logrank['p_value']:.4g}"
    )
    for cox in models:
        title = (
            "Cox model stratified by site"
            if cox["stratified_by_site"]
            else f"Cox model, one baseline hazard ({cox['ties']} ties; {cox['coarsening']})"
        )
        lines.append(
            f"{title}: {cox['rows']} complete cases, {cox['events']} deaths, "
            f"{cox['newton_steps']} Newton steps"
        )
        lines.append(
            f"  {'covariate':<10}{'coef':>10}{'se':>10}{'HR':>10}{'95% CI of HR':>22}{'p':>10}"
        )
        for name in cox["coef"]:
            interval = (
                f"{math.exp(cox['ci_lower'][name]):.3f}-{math.exp(cox['ci_upper'][name]):.3f}"
            )
            lines.append(
                f"  {name:<10}{cox['coef'][name]:>10.4f}{cox['se'][name]:>10.4f}"
                f"{cox['hazard_ratio'][name]:>10.3f}{interval:>22}{cox['p_value'][name]:>10.4g}"
            )
    return lines
