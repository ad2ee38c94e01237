"""Aggregation strategies: combine site updates into the next global model."""

from fedcore.aggregation.fedavg import StreamingFedAvg, fedavg

__all__ = ["StreamingFedAvg", "fedavg"]
