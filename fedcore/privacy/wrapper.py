"""Client-level differential privacy as a wrapper around a server strategy.

:class:`ClientDPStrategy` clips each site's model delta to ``C`` (fixed, or following a quantile
of the update norms with :class:`~fedcore.privacy.client_dp.AdaptiveClip`), sums the clipped
deltas, adds Gaussian noise of std ``z C`` and divides by the number of silos selected
(:class:`~fedcore.privacy.client_dp.DPFedAvg`): the noised mean. The wrapped strategy then takes
that mean as its only update, so a server optimiser (FedAvgM, FedAdam, FedYogi, FedAdagrad)
steps with the privatised pseudo-gradient, as Flower's server-side DP wrappers do. Post-
processing a DP release costs no privacy, so the optimiser's state and step are free.

Sound only for strategies that need nothing but the mean (:data:`DP_WRAPPABLE`): a robust rule
(median, trimmed mean, Krum), a norm bound or q-FedAvg's loss weighting looks at each update,
which this mechanism never releases; the plan language refuses them with client-level DP.

With distributed noise (secure aggregation) the sites add the noise before masking and the
server unmasks the noised sum; that mean is handed to the strategy the same way
(:meth:`ClientDPStrategy.step`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedcore.aggregation.base import AggregateResult, ClientUpdate, Strategy
from fedcore.aggregation_names import DP_WRAPPABLE
from fedcore.privacy.client_dp import AdaptiveClip, DPFedAvg, NoiseSource

__all__ = ["DP_WRAPPABLE", "ClientDPResult", "ClientDPStrategy"]


@dataclass(frozen=True)
class ClientDPResult:
    """One DP round: the strategy's result on the noised mean, and what the ledger records.

    ``info``: ``noise_multiplier`` (z, the round's accounted mechanism), ``clip`` (this round's),
    ``update_noise_multiplier`` (the noise on the update; below z with adaptive clipping) and,
    with adaptive clipping, ``next_clip``.
    """

    result: AggregateResult
    info: dict[str, Any] = field(default_factory=dict)


class ClientDPStrategy:
    """Client-level DP (central noise) around a strategy that steps with the mean."""

    def __init__(
        self,
        strategy: Strategy,
        *,
        clip: float,
        noise_multiplier: float,
        adaptive: AdaptiveClip | None = None,
        source: NoiseSource | None = None,
    ) -> None:
        """Args:
        strategy: the plan's strategy (its name must be in :data:`DP_WRAPPABLE`).
        clip: ``C``, the L2 bound of each silo's delta (ignored with ``adaptive``: its clip).
        noise_multiplier: ``z``, the noise multiplier the round is accounted with.
        adaptive: adaptive clipping; the update then gets ``z_delta`` < ``z`` and the rest of
            the budget noises the clip count (Andrew et al. 2021, Theorem 1).
        source: the noise; a fresh cryptographically keyed :class:`NoiseSource` when None
            (tests pass a keyed one to reproduce the noise).

        Raises:
            ValueError: the strategy looks at each update, so wrapping it would be unsound.
        """
        if strategy.name not in DP_WRAPPABLE:
            raise ValueError(
                f"client-level DP cannot wrap {strategy.name!r}: it needs each silo's update, "
                f"and the mechanism releases only their noised mean; use one of "
                f"{', '.join(DP_WRAPPABLE)}"
            )
        self.strategy = strategy
        self.clip = float(adaptive.clip if adaptive is not None else clip)
        self.noise_multiplier = float(noise_multiplier)
        self.adaptive = adaptive
        self._source = source

    @property
    def update_noise_multiplier(self) -> float:
        """The noise multiplier on the update itself (``z``, or ``z_delta`` when adaptive)."""
        if self.adaptive is None:
            return self.noise_multiplier
        return self.adaptive.update_noise_multiplier(self.noise_multiplier)

    def noised_mean(
        self,
        global_state: Mapping[str, torch.Tensor],
        states: Iterable[Mapping[str, torch.Tensor]],
        *,
        num_clients_expected: int,
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The DP-FedAvg model ``global + noised mean of the clipped deltas``, and its info."""
        mean = DPFedAvg(
            clip=self.clip, noise_multiplier=self.update_noise_multiplier, source=self._source
        )
        reports = 0.0
        for state in states:
            norm = mean.add({name: state[name] - global_state[name] for name in global_state})
            if self.adaptive is not None:
                reports += self.adaptive.client_report(norm)
        delta = mean.result(num_clients_expected=num_clients_expected)
        noised = {
            name: (value + delta[name]).to(value.dtype) if value.is_floating_point() else value
            for name, value in global_state.items()
        }
        info: dict[str, Any] = {
            "noise_multiplier": self.noise_multiplier,
            "clip": self.clip,
            "update_noise_multiplier": self.update_noise_multiplier,
        }
        if self.adaptive is not None:
            info["next_clip"] = self.adaptive.update(reports, num_clients_expected)
        return noised, info

    def step(
        self,
        global_state: Mapping[str, torch.Tensor],
        noised: Mapping[str, torch.Tensor],
        *,
        round: int,
    ) -> AggregateResult:
        """The wrapped strategy's step with an already noised mean model as its one update."""
        update = ClientUpdate(state=noised, weight=1.0, client_id="dp_mean")
        return self.strategy.aggregate(global_state, [update], round=round)

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        states: Iterable[Mapping[str, torch.Tensor]],
        *,
        round: int,
        num_clients_expected: int,
    ) -> ClientDPResult:
        """Clip, sum, noise and average the silos' full states, then step the strategy.

        Args:
            global_state: the model the round's silos started from.
            states: each silo's full weights after local training (streamed).
            round: the round number (the strategy's state refuses a repeat).
            num_clients_expected: the silos selected: the fixed denominator ``m``.
        """
        noised, info = self.noised_mean(
            global_state, states, num_clients_expected=num_clients_expected
        )
        return ClientDPResult(self.step(global_state, noised, round=round), info)
