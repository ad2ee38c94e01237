"""Local training choices a plan names, without torch: optimizers and regression losses.

:mod:`fedcore.training` (which needs torch) and the plan language both read them from here, so
checking a plan loads no torch.
"""

from __future__ import annotations

__all__ = ["OPTIMIZERS", "REGRESSION_LOSSES"]

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
REGRESSION_LOSSES: tuple[str, ...] = ("mse", "huber")
