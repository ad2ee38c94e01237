"""Aggregation strategies: combine site updates into the next global model.

``fedavg`` is the plain streaming weighted mean. The :class:`Strategy` classes add server
optimisers, robust rules, q-FedAvg, norm-bound rejection and per-round anomaly flags behind one
interface; ``make_strategy(plan["aggregation"])`` builds one by name (see ``STRATEGIES``).
"""

from fedcore.aggregation.base import AggregateResult, ClientUpdate, Strategy
from fedcore.aggregation.fedavg import StreamingFedAvg, fedavg
from fedcore.aggregation.qfedavg import QFedAvg
from fedcore.aggregation.registry import STRATEGIES, make_strategy
from fedcore.aggregation.robust import (
    DEFAULT_MEMORY_BUDGET_BYTES,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    krum_scores,
)
from fedcore.aggregation.server_opt import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedYogi,
    NormBoundFedAvg,
)

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "STRATEGIES",
    "AggregateResult",
    "ClientUpdate",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedYogi",
    "Krum",
    "Median",
    "MultiKrum",
    "NormBoundFedAvg",
    "QFedAvg",
    "Strategy",
    "StreamingFedAvg",
    "TrimmedMean",
    "fedavg",
    "krum_scores",
    "make_strategy",
]
