"""FedAvg as a strategy, and the server optimisers FedAvgM, FedAdam, FedYogi and FedAdagrad.

All of them stream: memory is O(model) whatever the number of updates.

Server optimisers (Reddi et al., 2021, "Adaptive Federated Optimization", Algorithm 2) treat the
round's average client change as a gradient step. With ``x_t`` the global model and ``x_k`` the
weights site ``k`` sends back after local training, the round computes

    Δ_t = Σ_k w_k (x_k - x_t) / Σ_k w_k           (w_k: the update's weight, its example count;
                                                   the paper averages uniformly: pass w_k = 1)
    m_t = β1 m_{t-1} + (1 - β1) Δ_t
    v_t = v_{t-1} + Δ_t²                           FedAdagrad
    v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)   FedYogi
    v_t = β2 v_{t-1} + (1 - β2) Δ_t²               FedAdam
    x_{t+1} = x_t + η m_t / (√v_t + τ)

element-wise, with ``m_{-1} = 0`` and ``v_{-1} = τ²`` (the paper requires ``v_{-1} >= τ²``) and no
bias correction, as in the paper. ``-Δ_t`` is the pseudo-gradient. FedAvgM (Hsu et al., 2019,
"Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification")
is heavy-ball momentum on the same quantity: ``v_t = β v_{t-1} + Δ_t``, ``x_{t+1} = x_t + η v_t``;
with ``η = 1`` and ``β = 0`` it is FedAvg.

Server state. ``m`` and ``v`` (and FedAvgM's velocity) persist across rounds in the strategy
object. A server that rebuilds the strategy each round (another worker, a restart) must persist
it: after round ``r`` store ``encode_state_dict(strategy.state_dict())`` with the model version of
round ``r`` (same transaction), and before round ``r + 1`` call
``strategy.load_state_dict(decode_state_dict(blob))``. The state records the last round it
aggregated and refuses to aggregate that round or an earlier one again: re-running a round after
a crash must start from the state saved with the previous round, or the optimiser would step
twice. A failed ``aggregate`` leaves the state unchanged.

The optimisers apply to every floating tensor of the state dict, including floating buffers such
as BatchNorm's running statistics; integer and bool tensors take the element-wise maximum.
Optimiser state is kept in float32 (float64 for float64 tensors) and the new model is cast back to
the model's dtypes.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import torch

from fedcore.aggregation.base import (
    IntegerMax,
    RunningMean,
    StateDict,
    Strategy,
    _Screened,
    accumulator_dtype,
    floating_names,
)
from fedcore.aggregation.fedavg import StreamingFedAvg
from fedcore.aggregation_params import (
    ADAPTIVE_DEFAULTS,
    MOMENTUM_DEFAULTS,
    STRATEGY_PARAMS,
    check_adaptive,
    check_momentum,
    check_norm_bound_required,
)

__all__ = ["FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedYogi", "NormBoundFedAvg"]

_ROUND_KEY = "round"


class FedAvg(Strategy):
    """Federated averaging (McMahan et al., 2017): the example-weighted mean of the updates.

    The result equals :func:`fedcore.aggregation.fedavg` of the accepted updates bit for bit.
    """

    name: ClassVar[str] = "fedavg"
    fuses_screening: ClassVar[bool] = True

    def _combine(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterator[_Screened],
        *,
        round_number: int,
    ) -> tuple[StateDict, dict[str, Any]]:
        """Stream the updates into a :class:`StreamingFedAvg`, one read of each update.

        Deferred updates (no norm bound) are checked for NaN/Inf and measured while they are
        blended; the others were checked and measured by screening and are only blended.
        """
        aggregator = StreamingFedAvg()
        for update in updates:
            if update.deferred is not None:
                squared = aggregator._add_fused(
                    update.state, update.weight, update.where, reference=global_state
                )
                update.record_norm(math.sqrt(squared))
            else:
                aggregator._add_fused(update.state, update.weight, update.where, check=False)
            del update  # not alive while the iterator builds (decodes) the next one
        return aggregator._take_result(), {}


class NormBoundFedAvg(FedAvg):
    """FedAvg over the updates whose delta norm is within ``norm_bound``; the others are dropped.

    Norm-bound rejection (as in Sun et al., 2019, "Can You Really Backdoor Federated
    Learning?", which clips instead): a scaled-up malicious update cannot dominate the mean.
    Every strategy accepts ``norm_bound``; this one requires it.
    """

    name: ClassVar[str] = "norm_bound"

    def __init__(self, *, norm_bound: float | None = None, flag_threshold: float = 3.5) -> None:
        """Set the bound.

        Args:
            norm_bound: maximum Euclidean norm of ``update - global`` over the floating
                tensors, > 0. Required.
            flag_threshold: see :class:`Strategy`.

        Raises:
            ValueError: ``norm_bound`` is missing or not a number > 0.
        """
        check_norm_bound_required(self.name, {"norm_bound": norm_bound})
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)


class _ServerOptimizer(Strategy):
    """Shared mechanics: weighted mean delta, stateful step, state export and import."""

    _SLOTS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, flag_threshold: float = 3.5, norm_bound: float | None = None) -> None:
        """Start with empty optimiser state."""
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)
        self._slots: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self._SLOTS}
        self._last_round: int | None = None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return ``{"round": int64, "<slot>.<tensor name>": tensor}``; ``{}`` before round 1.

        The slots are FedAvgM's ``velocity`` or the adaptive optimisers' ``m`` and ``v``, one
        tensor per floating model tensor, in float32 (float64 for float64 tensors). The
        tensors are copies.
        """
        if self._last_round is None:
            return {}
        state = {_ROUND_KEY: torch.tensor(self._last_round, dtype=torch.int64)}
        for slot, tensors in self._slots.items():
            for name, tensor in tensors.items():
                state[f"{slot}.{name}"] = tensor.clone()
        return state

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore the optimiser state saved by :meth:`state_dict` (``{}`` resets it).

        Shapes are checked against the model at the next :meth:`aggregate`.

        Raises:
            ValueError: a key is not ``round`` or ``<slot>.<name>`` of this strategy's slots,
                a value is not a finite floating tensor, or ``round`` is missing.
        """
        if len(state) == 0:
            self._slots = {slot: {} for slot in self._SLOTS}
            self._last_round = None
            return
        if _ROUND_KEY not in state:
            raise ValueError(f"{self.name}: optimiser state has no {_ROUND_KEY!r} entry")
        round_tensor = state[_ROUND_KEY]
        if not isinstance(round_tensor, torch.Tensor) or round_tensor.numel() != 1:
            raise ValueError(f"{self.name}: optimiser state {_ROUND_KEY!r} must be a scalar tensor")
        slots: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self._SLOTS}
        for key, tensor in state.items():
            if key == _ROUND_KEY:
                continue
            slot, _, name = key.partition(".")
            if slot not in slots or not name:
                raise ValueError(
                    f"{self.name}: unexpected optimiser state key {key!r}; expected "
                    f"'{_ROUND_KEY}' or '<slot>.<tensor name>' with slot in "
                    f"{', '.join(self._SLOTS)}"
                )
            if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
                raise ValueError(f"{self.name}: optimiser state {key!r} must be a float tensor")
            if not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{self.name}: optimiser state {key!r} holds NaN or Inf")
            slots[slot][name] = tensor.detach().to("cpu", copy=True)
        names = [set(tensors) for tensors in slots.values()]
        if any(n != names[0] for n in names):
            raise ValueError(f"{self.name}: optimiser state slots name different tensors")
        self._slots = slots
        self._last_round = int(round_tensor.item())

    def _combine(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterator[_Screened],
        *,
        round_number: int,
    ) -> tuple[StateDict, dict[str, Any]]:
        """Average the deltas, take one optimiser step, commit the state only on success."""
        if self._last_round is not None and round_number <= self._last_round:
            raise ValueError(
                f"{self.name}: the optimiser state has already aggregated round "
                f"{self._last_round}; to redo round {round_number}, load the state saved "
                "with the previous round's model"
            )
        names = floating_names(global_state)
        self._check_slots(global_state, names)
        # The global model in the accumulator dtypes: the base of every delta and of the step.
        base = {
            name: global_state[name].detach().to("cpu", accumulator_dtype(global_state[name].dtype))
            for name in names
        }
        mean = RunningMean()
        integers = IntegerMax(global_state)
        for update in updates:
            deltas = {
                name: update.state[name].detach().to("cpu", base[name].dtype) - base[name]
                for name in names
            }
            mean.add(deltas, update.weight)
            integers.add(update.state)
        new_slots: dict[str, dict[str, torch.Tensor]] = {slot: {} for slot in self._SLOTS}
        result: StateDict = {}
        squared_norm = 0.0
        for name in names:
            delta = mean.mean[name]
            squared_norm += float(delta.double().square().sum())
            previous = {
                slot: None if name not in tensors else tensors[name].to(delta.dtype)
                for slot, tensors in self._slots.items()
            }
            step, updated = self._step(delta, previous)
            for slot, tensor in updated.items():
                new_slots[slot][name] = tensor
            result[name] = (base[name] + step).to(global_state[name].dtype)
        result.update(integers.values)
        self._slots = new_slots
        self._last_round = round_number
        return result, {"pseudo_gradient_norm": squared_norm**0.5}

    def _check_slots(self, global_state: Mapping[str, torch.Tensor], names: list[str]) -> None:
        """Raise unless loaded optimiser state matches the model's floating tensors."""
        for slot, tensors in self._slots.items():
            if not tensors:
                continue
            if set(tensors) != set(names):
                missing = sorted(set(names) - set(tensors))
                extra = sorted(set(tensors) - set(names))
                raise ValueError(
                    f"{self.name}: optimiser state slot {slot!r} does not match the model "
                    f"(missing {missing[:3]}, unexpected {extra[:3]}); it belongs to another plan"
                )
            for name in names:
                if tuple(tensors[name].shape) != tuple(global_state[name].shape):
                    raise ValueError(
                        f"{self.name}: optimiser state {slot}.{name} has shape "
                        f"{tuple(tensors[name].shape)}, the model "
                        f"{tuple(global_state[name].shape)}"
                    )

    def _step(
        self, delta: torch.Tensor, previous: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return (change to add to the model, new slot tensors) for one tensor."""
        raise NotImplementedError


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al., 2019): ``v = β v + Δ``, ``x += η v``."""

    name: ClassVar[str] = "fedavgm"
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["fedavgm"]
    _SLOTS: ClassVar[tuple[str, ...]] = ("velocity",)

    def __init__(
        self,
        *,
        server_lr: float = MOMENTUM_DEFAULTS["server_lr"],
        momentum: float = MOMENTUM_DEFAULTS["momentum"],
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set the server learning rate and momentum.

        Args:
            server_lr: η, > 0. 1.0 takes the full averaged step.
            momentum: β in [0, 1). Hsu et al. use 0.9 with η = 1 on non-IID CIFAR-10, and
                note that effective step ``η / (1 - β)`` is what to keep fixed when tuning.
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)
        own = check_momentum(self.name, {"server_lr": server_lr, "momentum": momentum})
        self.server_lr: float = own["server_lr"]
        self.momentum: float = own["momentum"]

    def _step(
        self, delta: torch.Tensor, previous: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Heavy-ball momentum on the mean delta."""
        velocity = previous["velocity"]
        velocity = delta.clone() if velocity is None else velocity * self.momentum + delta
        return velocity * self.server_lr, {"velocity": velocity}


class _Adaptive(_ServerOptimizer):
    """FedAdam, FedYogi and FedAdagrad: Reddi et al. (2021), Algorithm 2."""

    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["fedadam"]
    _SLOTS: ClassVar[tuple[str, ...]] = ("m", "v")

    def __init__(
        self,
        *,
        server_lr: float = ADAPTIVE_DEFAULTS["server_lr"],
        beta1: float = ADAPTIVE_DEFAULTS["beta1"],
        beta2: float = ADAPTIVE_DEFAULTS["beta2"],
        tau: float = ADAPTIVE_DEFAULTS["tau"],
        flag_threshold: float = 3.5,
        norm_bound: float | None = None,
    ) -> None:
        """Set the server optimiser's hyperparameters (the paper's names in brackets).

        Args:
            server_lr: server learning rate [η], > 0. Each round moves a coordinate by at most
                about η, so it sets the pace: the paper tunes it over 10^-3..10^1 per task.
            beta1: first-moment decay [β1] in [0, 1).
            beta2: second-moment decay [β2] in [0, 1); FedAdagrad does not use it.
            tau: adaptivity [τ] > 0: ``√v`` is offset by τ and ``v`` starts at τ². The paper
                uses 10^-3 by default; smaller means more adaptive.
            flag_threshold: see :class:`Strategy`.
            norm_bound: see :class:`Strategy`.

        Raises:
            ValueError: a parameter is out of range.
        """
        super().__init__(flag_threshold=flag_threshold, norm_bound=norm_bound)
        own = check_adaptive(
            self.name, {"server_lr": server_lr, "beta1": beta1, "beta2": beta2, "tau": tau}
        )
        self.server_lr: float = own["server_lr"]
        self.beta1: float = own["beta1"]
        self.beta2: float = own["beta2"]
        self.tau: float = own["tau"]

    def _step(
        self, delta: torch.Tensor, previous: dict[str, torch.Tensor | None]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One step of Algorithm 2 for one tensor."""
        m_prev, v_prev = previous["m"], previous["v"]
        if m_prev is None or v_prev is None:
            m_prev = torch.zeros_like(delta)
            v_prev = torch.full_like(delta, self.tau**2)
        m = m_prev * self.beta1 + delta * (1 - self.beta1)
        v = self._second_moment(v_prev, delta.square())
        return self.server_lr * m / (v.sqrt() + self.tau), {"m": m, "v": v}

    def _second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Return v_t from v_{t-1} and Δ_t²."""
        raise NotImplementedError


class FedAdagrad(_Adaptive):
    """FedAdagrad (Reddi et al., 2021): ``v_t = v_{t-1} + Δ_t²``."""

    name: ClassVar[str] = "fedadagrad"

    def _second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Accumulate the squared deltas."""
        return v_prev + delta_sq


class FedYogi(_Adaptive):
    """FedYogi (Reddi et al., 2021): ``v_t = v_{t-1} - (1 - β2) Δ_t² sign(v_{t-1} - Δ_t²)``."""

    name: ClassVar[str] = "fedyogi"

    def _second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Yogi's additive, sign-controlled update of v."""
        return v_prev - (1 - self.beta2) * delta_sq * torch.sign(v_prev - delta_sq)


class FedAdam(_Adaptive):
    """FedAdam (Reddi et al., 2021): ``v_t = β2 v_{t-1} + (1 - β2) Δ_t²``."""

    name: ClassVar[str] = "fedadam"

    def _second_moment(self, v_prev: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
        """Exponential moving average of the squared deltas."""
        return v_prev * self.beta2 + delta_sq * (1 - self.beta2)
