"""Federated analytics: what each site computes from its rows, how the server merges, the result.

Every analysis is split in three, so that the wiring (plans, rounds, the agent) only moves data:

1. a site part, ``site_*``, run by the agent on its own rows after its disclosure policy
   (``disclosure``) allowed the analysis: it returns a summary of sums (``_sums.summary``);
2. the merge, ``merge_sums``: an elementwise sum, so it can run under secure aggregation;
3. the result, ``*_result`` (or a server-side driver, ``QuantileSearch``, ``NewtonRaphson``, for
   the analyses that need several rounds).

Modules: ``cohort`` (filters, counts and cross-tabulations, moments, histograms, quantiles),
``survival`` (Kaplan-Meier, log-rank, Cox), ``regression`` (linear, logistic), ``disclosure``
(minimum cell count with complementary suppression, minimum sites, allowed kinds, time
coarsening). docs/analytics.md describes what each site sends and what that reveals.
"""

from fedcore.analytics._newton import ConvergenceError, NewtonRaphson, coefficient_table
from fedcore.analytics._sums import Summary, merge_sums, summary
from fedcore.analytics.disclosure import (
    ANALYSIS_KINDS,
    DisclosurePolicy,
    DisclosureRefused,
    suppress_table,
)

__all__ = [
    "ANALYSIS_KINDS",
    "ConvergenceError",
    "DisclosurePolicy",
    "DisclosureRefused",
    "NewtonRaphson",
    "Summary",
    "coefficient_table",
    "merge_sums",
    "summary",
    "suppress_table",
]
