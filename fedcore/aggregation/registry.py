"""Strategies by name, and building one from a plan's ``aggregation`` spec."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from fedcore.aggregation.base import Strategy
from fedcore.aggregation.qfedavg import QFedAvg
from fedcore.aggregation.robust import Krum, Median, MultiKrum, TrimmedMean, _Robust
from fedcore.aggregation.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    NormBoundFedAvg,
)
from fedcore.aggregation_names import STRATEGY_NAMES
from fedcore.aggregation_params import STRATEGY_PARAMS, check_strategy_spec

__all__ = ["STRATEGIES", "make_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        QFedAvg,
        NormBoundFedAvg,
        Median,
        TrimmedMean,
        Krum,
        MultiKrum,
    )
}
# The plan language reads the names from fedcore.aggregation_names (no torch): one list.
assert tuple(STRATEGIES) == STRATEGY_NAMES, "strategies drifted from fedcore.aggregation_names"
# ... and their parameters from fedcore.aggregation_params, which each constructor checks with.
assert all(cls.SPEC_PARAMS == STRATEGY_PARAMS[name] for name, cls in STRATEGIES.items())


def make_strategy(
    spec: Mapping[str, Any], *, spill_dir: str | os.PathLike[str] | None = None
) -> Strategy:
    """Build a strategy from a spec such as ``{"strategy": "trimmed_mean", "beta": 0.2}``.

    Args:
        spec: ``"strategy"`` (a name in :data:`STRATEGIES`, default ``"fedavg"``) and the
            strategy's parameters (its ``SPEC_PARAMS``; omitted ones take their defaults).
            This is the plan's ``aggregation`` object.
        spill_dir: where the robust strategies spill stacked updates beyond their memory
            budget (None: the system temporary directory); a server setting, ignored by the
            others.

    Returns:
        a new strategy object with fresh state.

    Raises:
        ValueError: the spec is not a mapping, the name is unknown (the message lists the
            allowed names), a parameter is unknown (the message lists the strategy's
            parameters), missing where required, or out of range.
    """
    name, _ = check_strategy_spec(spec)  # the name, its parameters' names and ranges
    cls = STRATEGIES[name]
    params = {key: value for key, value in spec.items() if key != "strategy"}
    if issubclass(cls, _Robust):
        return cls(**params, spill_dir=spill_dir)
    return cls(**params)
