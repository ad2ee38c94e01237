"""q-FedAvg (Li et al., 2020, "Fair Resource Allocation in Federated Learning", Algorithm 2).

q-FFL minimises ``Σ_k p_k F_k(w)^(q+1) / (q+1)``: the larger q, the more weight the sites where
the model does badly get. With ``w_t`` the round's global model, ``w_k`` site k's weights after
local training, ``F_k = F_k(w_t)`` site k's loss of ``w_t`` on its training data (measured before
training), ``L`` the Lipschitz constant estimate and ``p_k`` the update's weight, one round is

    Δw_k = L (w_t - w_k)
    Δ_k  = F_k^q Δw_k
    h_k  = q F_k^(q-1) ||Δw_k||² + L F_k^q
    w_{t+1} = w_t - Σ_k p_k Δ_k / Σ_k p_k h_k

with ``||.||`` over all floating tensors. ``F_k`` is offset by 1e-10 so that a zero loss with
q < 1 stays finite (as Flower's QFedAvg does). The paper samples sites with probability
``p_k = n_k / n`` and then averages uniformly; the server here takes every selected site, so it
weights by ``p_k`` instead, which has the same expectation. Pass weight 1 for every update to get
Algorithm 2's uniform sum. With q = 0 the rule is the weighted mean of the ``w_k``: FedAvg.

The paper sets ``L = 1 / η`` with η the local learning rate.

What the agents must report: for each update, besides its weights and example count, the loss
``F_k(w_t)`` (:attr:`ClientUpdate.loss`): the plan's training loss (binary cross-entropy) of the
global model it received, evaluated on its own training split before the first local step.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from fedcore.aggregation.base import (
    IntegerMax,
    StateDict,
    Strategy,
    _Screened,
    floating_names,
)
from fedcore.aggregation_params import DEFAULT_Q, STRATEGY_PARAMS, check_qfedavg, is_number

__all__ = ["QFedAvg"]

_LOSS_OFFSET = 1e-10


class QFedAvg(Strategy):
    """q-FedAvg: fairer accuracy across sites by weighting updates with their loss to the q."""

    name: ClassVar[str] = "qfedavg"
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["qfedavg"]

    def __init__(
        self,
        *,
        q: float = DEFAULT_Q,
        lipschitz: float | None = None,
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set the fairness exponent and the Lipschitz estimate.

        Args:
            q: fairness exponent >= 0; 0 is FedAvg, the paper uses 0.1..15 depending on data.
            lipschitz: L > 0, required. The paper uses ``1 / local learning rate`` (100 for
                lr 0.01).
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is missing or out of range.
        """
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)
        own = check_qfedavg(self.name, {"q": q, "lipschitz": lipschitz})
        self.q: float = own["q"]
        self.lipschitz: float = own["lipschitz"]

    def _combine(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterator[_Screened],
        *,
        round_number: int,
    ) -> tuple[StateDict, dict[str, Any]]:
        """Accumulate Σ p_k Δ_k (float64 tensors) and Σ p_k h_k (a number), then step."""
        names = floating_names(global_state)
        numerator: dict[str, torch.Tensor] = {}
        denominator = 0.0
        integers = IntegerMax(global_state)
        losses: list[float] = []
        for update in updates:
            if update.loss is None or not is_number(update.loss) or update.loss < 0:
                raise ValueError(
                    f"update #{update.index} (client {update.client!r}): qfedavg needs the "
                    "site's loss of the global model before training (ClientUpdate.loss, "
                    f"finite and >= 0), got {update.loss!r}"
                )
            loss = float(update.loss) + _LOSS_OFFSET
            losses.append(float(update.loss))
            loss_q = loss**self.q
            # ||Δw_k|| = L ||w_t - w_k||, and ||w_t - w_k|| is the delta norm screening measured.
            grad_sq = (self.lipschitz * update.norm) ** 2
            h = self.q * loss ** (self.q - 1) * grad_sq + self.lipschitz * loss_q
            denominator += update.weight * h
            scale = update.weight * loss_q * self.lipschitz
            for name in names:
                delta = global_state[name].detach().to("cpu", torch.float64) - update.state[
                    name
                ].detach().to("cpu", torch.float64)
                if name in numerator:
                    numerator[name].add_(delta, alpha=scale)
                else:
                    numerator[name] = delta.mul_(scale)
            integers.add(update.state)
        if not (math.isfinite(denominator) and denominator > 0):
            raise ValueError(
                f"qfedavg: the step's denominator Σ p_k h_k is {denominator!r}; lower q or "
                "check the reported losses"
            )
        result: StateDict = {}
        for name in names:
            current = global_state[name].detach().to("cpu", torch.float64)
            result[name] = (current - numerator[name] / denominator).to(global_state[name].dtype)
        result.update(integers.values)
        return result, {"losses": losses, "h_sum": denominator}
