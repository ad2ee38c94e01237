"""The strategy interface: aggregate one round's updates into the next global model.

A strategy receives data, never transport (as Flower's ``Strategy``): the round's global state and
an iterable of updates, each a ``(state_dict, weight)`` pair or a :class:`ClientUpdate` (which
adds a client id and, for q-FedAvg, the client's loss). Updates are full model weights, as the
agents send them; a strategy derives the delta ``update - global`` itself where it needs one.

Every strategy, before combining, screens each update in the order received:

1. validates it (a mapping of real tensors, the global state's keys, shapes and dtypes, finite
   values, a weight that is a finite number > 0); a bad update raises ``ValueError`` naming its
   0-based index, like :func:`fedcore.aggregation.fedavg`;
2. measures its delta norm ``||update - global||_2`` over the floating tensors (float32
   differences summed in float64 chunk by chunk, relative error about 1e-6; float64 models in
   float64), one pass over the update that also proves it finite;
3. drops it when the strategy has a ``norm_bound`` and the norm exceeds it (flag ``norm_bound``).

Strategies with ``fuses_screening`` (FedAvg, and the robust rules) take over step 1's
finiteness check and step 2 when there is no norm bound: they measure the norm and check
finiteness from the same cache-resident chunks they blend into the mean (FedAvg) or copy into the
stacked updates (robust rules), so each update is read from memory once instead of twice. The
results are the same; a bad update still fails the round with the same message.

After combining, the delta norms of all received updates are scored with the modified z-score of
Iglewicz and Hoaglin (1993), ``z = 0.6745 * (norm - median) / MAD``; an update with ``|z|`` above
``flag_threshold`` is flagged ``norm_outlier``. When the MAD is 0 (most norms equal), the scale
``MAD / 0.6745`` is replaced by ``1.253314 * mean absolute deviation``. The scale is never below
10% of the median norm: with similar sites the MAD is tiny and ordinary variation would be flagged;
with the default threshold 3.5 an update must be at least 35% off the median. When the scale is
0 (every norm 0) nothing is flagged. Fewer than 3 updates are never scored: with two there is no
majority to be an outlier from.

Integer and bool tensors (buffers such as BatchNorm's ``num_batches_tracked``) are never averaged
or optimised: every strategy returns their element-wise maximum over the updates it accepted, the
rule of ``fedavg``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from fedcore.aggregation._kernels import delta_squared_norm, first_non_finite
from fedcore.aggregation.fedavg import _check_weight
from fedcore.aggregation_params import (
    DEFAULT_FLAG_THRESHOLD,
    STRATEGY_PARAMS,
    check_int,
    check_shared,
)
from fedcore.tensors import IncompatibleStateDict, check_compatible, signature

__all__ = [
    "AggregateResult",
    "ClientUpdate",
    "Strategy",
]

StateDict = dict[str, torch.Tensor]

# Iglewicz & Hoaglin (1993): 0.6745 is the 0.75 quantile of the standard normal, so the modified
# z-score of a normal sample matches its z-score; they recommend flagging |z| > 3.5.
_MAD_SCALE = 0.6745
_MEAN_AD_SCALE = 1.253314  # sqrt(pi / 2): mean absolute deviation -> standard deviation
_MIN_UPDATES_TO_SCORE = 3
# Sites with similar data send near-equal norms (MAD 1-7% of the median over 10 IID thyroid silos
# in bench/poisoning.py), where |z| > 3.5 would flag a 10% deviation. The floor makes an update
# at least 35% off the median before it is flagged at the default threshold.
_MIN_RELATIVE_SCALE = 0.1


@dataclass(frozen=True)
class ClientUpdate:
    """One site's update with the metadata some strategies and the anomaly flags use.

    Attributes:
        state: tensor name -> tensor, the site's full model weights after local training.
        weight: the update's weight, typically its number of training examples; finite, > 0.
        client_id: how flags and stats name this update (e.g. the silo id); defaults to its
            0-based index in the round.
        loss: q-FedAvg only: ``F_k(w_t)``, the loss of the round's global model on the site's
            training data, measured before local training (finite, >= 0).
    """

    state: Mapping[str, torch.Tensor]
    weight: float
    client_id: str | int | None = None
    loss: float | None = None


@dataclass
class AggregateResult:
    """The outcome of one round of aggregation.

    Attributes:
        state: the next global model: tensor name -> tensor, the global state's keys (in its
            order), shapes and dtypes.
        flags: one dict per anomaly, each with ``index`` (0-based position in the round),
            ``client`` (the client id, or the index), ``kind`` (``"norm_outlier"`` or
            ``"norm_bound"``), ``norm`` (the delta norm), ``score`` (modified z-score, or
            norm / bound) and ``reason`` (a sentence for the audit log and the dashboard).
        stats: JSON-able numbers about the round: ``strategy``, ``round``, ``updates``
            (received), ``aggregated`` (accepted), ``total_weight`` (of the accepted),
            ``delta_norms`` (per received update), ``delta_norm_median``, plus what the
            strategy adds (e.g. Krum's ``selected`` clients).
    """

    state: StateDict
    flags: list[dict[str, Any]] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Screened:
    """An update that passed validation and the norm bound.

    With ``deferred`` set, the finiteness check and the delta norm are left to the strategy's
    ``_combine``, which reports the norm with :meth:`record_norm` (``norm`` is nan until then).
    """

    index: int
    client: str | int
    state: Mapping[str, torch.Tensor]
    weight: float
    norm: float
    loss: float | None
    where: str = ""
    deferred: _RoundLog | None = None

    def record_norm(self, norm: float) -> None:
        """Set the delta norm measured by ``_combine`` (deferred screening)."""
        self.norm = norm
        if self.deferred is not None:
            self.deferred.norms[self.index] = norm


@dataclass
class _RoundLog:
    """What screening saw: per received update its client and delta norm, and the rejections."""

    clients: list[str | int] = field(default_factory=list)
    norms: list[float] = field(default_factory=list)
    flags: list[dict[str, Any]] = field(default_factory=list)
    accepted: int = 0
    total_weight: float = 0.0


def floating_names(state: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating tensors, sorted: the ones strategies average or optimise."""
    return [name for name in sorted(state) if state[name].is_floating_point()]


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 are computed in float32 (as fedavg does); float32/float64 as they are."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class IntegerMax:
    """Element-wise maximum of the integer and bool tensors of the updates added."""

    def __init__(self, global_state: Mapping[str, torch.Tensor]) -> None:
        """Track the non-floating tensors of ``global_state``'s signature."""
        self.names = [n for n in sorted(global_state) if not global_state[n].is_floating_point()]
        self.values: dict[str, torch.Tensor] = {}

    def add(self, state: Mapping[str, torch.Tensor]) -> None:
        """Fold one update's integer tensors into the maximum."""
        for name in self.names:
            tensor = state[name].detach().to("cpu")
            if name in self.values:
                torch.maximum(self.values[name], tensor, out=self.values[name])
            else:
                self.values[name] = tensor.clone()


class RunningMean:
    """Weighted running mean (West, 1979) of float tensors, in their accumulator dtypes.

    ``mean += (w_k / W_k) * (x_k - mean)`` as :class:`~fedcore.aggregation.StreamingFedAvg`
    does, so equal inputs give back that input exactly.
    """

    def __init__(self) -> None:
        """Start empty."""
        self.mean: dict[str, torch.Tensor] = {}
        self.total_weight = 0.0

    def add(self, values: Mapping[str, torch.Tensor], weight: float) -> None:
        """Fold in one dict of tensors with a weight > 0."""
        self.total_weight += weight
        fraction = weight / self.total_weight
        for name, value in values.items():
            if name in self.mean:
                acc = self.mean[name]
                acc.lerp_(value.to(acc.dtype), fraction)
            else:
                self.mean[name] = value.to(
                    device="cpu", dtype=accumulator_dtype(value.dtype), copy=True
                )


class Strategy:
    """Base class of aggregation strategies: screening, anomaly flags, parameters and state.

    Subclasses set ``name`` and ``SPEC_PARAMS`` (the parameters a plan spec may set, each a
    keyword of ``__init__``) and implement :meth:`_combine`. A strategy object may be reused
    for every round of a run; the server optimisers (FedAvgM, FedAdam, ...) keep their state in
    it between rounds, see :meth:`state_dict`.
    """

    name: ClassVar[str] = ""
    SPEC_PARAMS: ClassVar[tuple[str, ...]] = STRATEGY_PARAMS["fedavg"]
    #: True when aggregation holds O(model) memory whatever the number of updates.
    streaming: ClassVar[bool] = True
    #: True when ``_combine`` checks finiteness and measures delta norms itself for updates
    #: screened with ``deferred`` set (see the module docstring).
    fuses_screening: ClassVar[bool] = False

    def __init__(
        self, *, flag_threshold: float = DEFAULT_FLAG_THRESHOLD, norm_bound: float | None = None
    ) -> None:
        """Set the screening parameters shared by every strategy.

        Args:
            flag_threshold: an update whose delta norm has a modified z-score above this (in
                absolute value) is flagged ``norm_outlier``; > 0. It is flagged, not dropped.
            norm_bound: when set (> 0), updates whose delta norm exceeds it are dropped before
                combining and flagged ``norm_bound``. None keeps every update.

        Raises:
            ValueError: a parameter is out of range; the message names the strategy.
        """
        shared = check_shared(
            self.name, {"flag_threshold": flag_threshold, "norm_bound": norm_bound}
        )
        self.flag_threshold: float = shared["flag_threshold"]
        self.norm_bound: float | None = shared["norm_bound"]

    def spec(self) -> dict[str, Any]:
        """Return the canonical spec: ``{"strategy": name, every parameter: its value}``.

        ``make_strategy(strategy.spec())`` builds an equal strategy, so a plan can store the
        spec with every default spelled out.
        """
        return {"strategy": self.name, **{key: getattr(self, key) for key in self.SPEC_PARAMS}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Return the state that must persist between rounds; empty for stateless strategies.

        Tensors only, so ``fedcore.tensors.encode_state_dict`` can store it next to the model
        version it produced.
        """
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore a state from :meth:`state_dict`; stateless strategies accept only ``{}``.

        Raises:
            ValueError: the state is not empty.
        """
        if len(state) != 0:
            raise ValueError(
                f"{self.name} keeps no state between rounds, got keys {sorted(state)[:5]}"
            )

    def aggregate(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterable[tuple[Mapping[str, torch.Tensor], float] | ClientUpdate],
        *,
        round: int,
    ) -> AggregateResult:
        """Combine one round's updates into the next global model.

        Args:
            global_state: the model the round's sites started from (tensor name -> tensor).
                Not modified.
            updates: ``(state_dict, weight)`` pairs or :class:`ClientUpdate` objects, each a
                site's full weights after local training. Consumed once, lazily: streaming
                strategies hold one update at a time, so a generator reading blobs keeps
                memory at O(model).
            round: the round number (an integer >= 0), recorded in flags and stats; server
                optimisers refuse a round that is not after the last one they aggregated.

        Returns:
            the new state, the anomaly flags and the round's stats.

        Raises:
            ValueError: no update, no update left after the norm bound, a bad update or
                weight (the message names its index), a strategy-specific condition (e.g.
                Krum needs more than ``2f + 2`` updates). The strategy's state is unchanged.
            IncompatibleStateDict: an update's keys, shapes or dtypes differ from the global
                state's.
        """
        round_number = check_int(self.name, "round", round, low=0)
        reference = _check_global(global_state)
        log = _RoundLog()
        screened = self._screen(global_state, reference, updates, log)
        state, extra = self._combine(global_state, screened, round_number=round_number)
        flags = self._norm_outliers(log) + log.flags
        flags.sort(key=lambda flag: (flag["index"], flag["kind"]))
        for flag in flags:
            flag["round"] = round_number
        norms = log.norms
        stats: dict[str, Any] = {
            "strategy": self.name,
            "round": round_number,
            "updates": len(norms),
            "aggregated": log.accepted,
            "total_weight": log.total_weight,
            "delta_norms": list(norms),
            "delta_norm_median": _median(norms),
        }
        stats.update(extra)
        ordered = {name: state[name] for name in global_state}
        return AggregateResult(state=ordered, flags=flags, stats=stats)

    def _combine(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: Iterator[_Screened],
        *,
        round_number: int,
    ) -> tuple[StateDict, dict[str, Any]]:
        """Return the new state and extra stats from the screened updates (subclasses)."""
        raise NotImplementedError

    def _screen(
        self,
        global_state: Mapping[str, torch.Tensor],
        reference: dict[str, tuple[str, tuple[int, ...]]],
        updates: Iterable[tuple[Mapping[str, torch.Tensor], float] | ClientUpdate],
        log: _RoundLog,
    ) -> Iterator[_Screened]:
        """Validate updates one at a time, record their delta norms, drop those over the bound."""
        names = floating_names(global_state)
        defer = self.fuses_screening and self.norm_bound is None
        cache: dict[torch.dtype, torch.Tensor] = {}  # the norm's chunk buffers, reused
        for index, item in enumerate(updates):
            if isinstance(item, ClientUpdate):
                state, weight, client, loss = item.state, item.weight, item.client_id, item.loss
            elif isinstance(item, tuple | list) and len(item) == 2:
                (state, weight), client, loss = item, None, None
            else:
                raise ValueError(
                    f"update #{index}: expected a (state_dict, weight) pair or a ClientUpdate"
                )
            del item
            client = index if client is None else client
            where = f"update #{index}" + ("" if client == index else f" (client {client!r})")
            weight = _check_weight(weight, where)
            if defer:
                _check_update(state, reference, where, finite=False)
                log.clients.append(client)
                log.norms.append(math.nan)
                log.accepted += 1
                log.total_weight += weight
                yield _Screened(index, client, state, weight, math.nan, loss, where, log)
                del state
                continue
            _check_update(state, reference, where, finite=False)
            norm = _delta_norm(state, global_state, names, cache)
            if math.isnan(norm):
                bad = first_non_finite(state)
                raise ValueError(f"{where}: tensor {bad!r} holds NaN or Inf; refuse this update")
            log.clients.append(client)
            log.norms.append(norm)
            if self.norm_bound is not None and norm > self.norm_bound:
                log.flags.append(
                    {
                        "index": index,
                        "client": client,
                        "kind": "norm_bound",
                        "norm": norm,
                        "score": norm / self.norm_bound,
                        "reason": (
                            f"dropped: delta norm {norm:.4g} exceeds the bound "
                            f"{self.norm_bound:.4g}"
                        ),
                    }
                )
                continue
            log.accepted += 1
            log.total_weight += weight
            yield _Screened(index, client, state, weight, norm, loss, where)
            del state
        if not log.norms:
            raise ValueError(f"{self.name} needs at least one update; the iterable was empty")
        if log.accepted == 0:
            raise ValueError(
                f"{self.name}: all {len(log.norms)} updates exceed the norm bound "
                f"{self.norm_bound:g} (delta norms {min(log.norms):.4g}..{max(log.norms):.4g}); "
                "nothing left to aggregate"
            )

    def _norm_outliers(self, log: _RoundLog) -> list[dict[str, Any]]:
        """Flag updates whose delta norm has a modified z-score beyond the threshold."""
        norms = log.norms
        if len(norms) < _MIN_UPDATES_TO_SCORE:
            return []
        median = _median(norms)
        deviations = [abs(n - median) for n in norms]
        mad = _median(deviations)
        if mad > 0:
            scale, basis = mad / _MAD_SCALE, "MAD"
        else:
            scale = _MEAN_AD_SCALE * sum(deviations) / len(deviations)
            basis = "mean absolute deviation (the MAD is 0)"
        if scale < _MIN_RELATIVE_SCALE * median:
            scale, basis = _MIN_RELATIVE_SCALE * median, "scale floor of 10% of the median"
        if scale <= 0:
            return []
        flags = []
        for index, (client, norm) in enumerate(zip(log.clients, norms, strict=True)):
            score = (norm - median) / scale
            if abs(score) <= self.flag_threshold:
                continue
            side = "above" if score > 0 else "below"
            flags.append(
                {
                    "index": index,
                    "client": client,
                    "kind": "norm_outlier",
                    "norm": norm,
                    "score": score,
                    "reason": (
                        f"delta norm {norm:.4g} is far {side} the round's median {median:.4g} "
                        f"(robust z-score {score:+.1f} from the {basis}; threshold "
                        f"{self.flag_threshold:g})"
                    ),
                }
            )
        return flags


def _median(values: list[float]) -> float:
    """Median of a non-empty list (mean of the middle two for an even length); nan if empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _check_global(global_state: object) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Validate the global state and return its signature."""
    if not isinstance(global_state, Mapping):
        raise ValueError(
            "global_state: expected a mapping of tensor name -> tensor, got "
            f"{type(global_state).__name__}"
        )
    for name, tensor in global_state.items():
        if not isinstance(tensor, torch.Tensor) or tensor.is_complex():
            raise ValueError(
                f"global_state: tensor {name!r} must be a real torch.Tensor, got "
                f"{getattr(tensor, 'dtype', type(tensor).__name__)}"
            )
    bad = first_non_finite(global_state)
    if bad is not None:
        raise ValueError(f"global_state: tensor {bad!r} holds NaN or Inf")
    return signature(global_state)


def _check_update(
    state: object,
    reference: dict[str, tuple[str, tuple[int, ...]]],
    where: str,
    *,
    finite: bool = True,
) -> None:
    """Raise unless ``state`` is a state dict with the global state's signature (and, with
    ``finite``, no NaN/Inf; callers that measure the delta norm get that check from it)."""
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{where}: expected a mapping of tensor name -> tensor, got {type(state).__name__}"
        )
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(
                f"{where}: tensor {name!r} is {type(tensor).__name__}, expected torch.Tensor"
            )
    try:
        check_compatible(state, reference)
    except IncompatibleStateDict as exc:
        raise IncompatibleStateDict(
            f"{where} does not match the global model: {exc}; every site must send the full "
            "state dict of the plan's model"
        ) from exc
    if finite:
        bad = first_non_finite(state)
        if bad is not None:
            raise ValueError(f"{where}: tensor {bad!r} holds NaN or Inf; refuse this update")


def _delta_norm(
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    names: list[str],
    cache: dict[torch.dtype, torch.Tensor] | None = None,
) -> float:
    """Euclidean norm of ``state - global`` over the floating tensors; nan if any is not finite.

    One chunked pass (:func:`fedcore.aggregation._kernels.delta_squared_norm`): no full-size
    temporaries.
    """
    total = 0.0
    for name in names:
        total += delta_squared_norm(state[name], global_state[name], cache)
        if math.isnan(total):
            return math.nan
    return math.sqrt(total)
