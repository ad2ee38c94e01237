"""Aggregation strategy names, without torch: what a plan's ``aggregation.strategy`` may say.

:mod:`fedcore.aggregation` (the strategies, which need torch) checks at import that its registry
holds exactly these names, in this order; the plan language and client-level DP read them from
here, so checking a plan loads no torch.
"""

from __future__ import annotations

__all__ = ["DP_WRAPPABLE", "STRATEGY_NAMES"]

# fedcore.aggregation.STRATEGIES, in its order (the order error messages list them in).
STRATEGY_NAMES: tuple[str, ...] = (
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "qfedavg",
    "norm_bound",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
)
# The strategies that consume only the (weighted) mean of the updates: the ones client-level DP
# (fedcore.privacy.wrapper) may wrap.
DP_WRAPPABLE: tuple[str, ...] = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad")
