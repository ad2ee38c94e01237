"""Aggregation strategy parameters, without torch: their names, defaults and ranges.

Each strategy's constructor (:mod:`fedcore.aggregation`, torch) checks its parameters with the
functions here, and the plan language checks a plan's ``aggregation`` section with
:func:`check_strategy_spec`, so checking a plan loads no torch and the two cannot disagree.

A strategy's parameters are checked level by level, in the order its constructor runs them:
the ones every strategy shares first (``Strategy.__init__``), then its family's (server
optimiser, robust rule), then its own; the first bad one raises ``ValueError``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any

from fedcore.aggregation_names import STRATEGY_NAMES

__all__ = [
    "ADAPTIVE_DEFAULTS",
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "MOMENTUM_DEFAULTS",
    "STRATEGY_PARAMS",
    "check_adaptive",
    "check_int",
    "check_krum",
    "check_momentum",
    "check_multi_krum",
    "check_norm_bound_required",
    "check_number",
    "check_qfedavg",
    "check_robust",
    "check_shared",
    "check_strategy_params",
    "check_strategy_spec",
    "check_trimmed_mean",
    "is_int",
    "is_number",
]

DEFAULT_MEMORY_BUDGET_BYTES = 256 * 1024 * 1024
DEFAULT_FLAG_THRESHOLD = 3.5
MOMENTUM_DEFAULTS: dict[str, float] = {"server_lr": 1.0, "momentum": 0.9}
ADAPTIVE_DEFAULTS: dict[str, float] = {
    "server_lr": 0.01,
    "beta1": 0.9,
    "beta2": 0.99,
    "tau": 1e-3,
}
DEFAULT_Q = 1.0
DEFAULT_BETA = 0.1
DEFAULT_F = 1

_SHARED = ("flag_threshold", "norm_bound")
_ROBUST = ("memory_budget_bytes", *_SHARED)
_KRUM = ("f", *_ROBUST)
_ADAPTIVE = (*ADAPTIVE_DEFAULTS, *_SHARED)

# The parameters a plan may set for each strategy (its ``SPEC_PARAMS``), in the order error
# messages list them.
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "fedavg": _SHARED,
    "fedavgm": (*MOMENTUM_DEFAULTS, *_SHARED),
    "fedadam": _ADAPTIVE,
    "fedyogi": _ADAPTIVE,
    "fedadagrad": _ADAPTIVE,
    "qfedavg": ("q", "lipschitz", *_SHARED),
    "norm_bound": _SHARED,
    "median": _ROBUST,
    "trimmed_mean": ("beta", *_ROBUST),
    "krum": _KRUM,
    "multi_krum": ("m", *_KRUM),
}
assert tuple(STRATEGY_PARAMS) == STRATEGY_NAMES, "parameters drifted from aggregation_names"


def is_number(value: object) -> bool:
    """Return True for a finite real number that is not a bool."""
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def is_int(value: object) -> bool:
    """Return True for an int that is not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_number(
    strategy: str,
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float, or raise ValueError naming the strategy, parameter and range."""
    inside = is_number(value)
    number = float(value) if inside else math.nan  # type: ignore[arg-type]
    if inside and low is not None:
        inside = number > low if low_open else number >= low
    if inside and high is not None:
        inside = number < high if high_open else number <= high
    if not inside:
        if low is not None and high is not None:
            where = f" in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        elif low is not None:
            where = f" {'>' if low_open else '>='} {low:g}"
        elif high is not None:
            where = f" {'<' if high_open else '<='} {high:g}"
        else:
            where = ""
        raise ValueError(f"{strategy}: {name} must be a finite number{where}, got {value!r}")
    return number


def check_int(strategy: str, name: str, value: object, *, low: int) -> int:
    """Return ``value`` as an int >= low, or raise ValueError naming the strategy and parameter."""
    if not is_int(value) or int(value) < low:  # type: ignore[call-overload]
        raise ValueError(f"{strategy}: {name} must be an integer >= {low}, got {value!r}")
    return int(value)  # type: ignore[call-overload]


# --- one level each: given the parameters (absent ones take their defaults), the checked values


def check_shared(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``flag_threshold`` (> 0) and ``norm_bound`` (None or > 0), which every strategy takes."""
    norm_bound = params.get("norm_bound")
    return {
        "flag_threshold": check_number(
            strategy,
            "flag_threshold",
            params.get("flag_threshold", DEFAULT_FLAG_THRESHOLD),
            low=0.0,
            low_open=True,
        ),
        "norm_bound": None
        if norm_bound is None
        else check_number(strategy, "norm_bound", norm_bound, low=0.0, low_open=True),
    }


def check_norm_bound_required(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``norm_bound`` strategy requires its bound (checked before the shared parameters)."""
    if params.get("norm_bound") is None:
        raise ValueError(
            "norm_bound: parameter 'norm_bound' is required (the largest accepted delta "
            "norm, e.g. a few times the median norm of a clean round)"
        )
    return {}


def check_momentum(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """FedAvgM: ``server_lr`` > 0 and ``momentum`` in [0, 1)."""
    server_lr = params.get("server_lr", MOMENTUM_DEFAULTS["server_lr"])
    momentum = params.get("momentum", MOMENTUM_DEFAULTS["momentum"])
    return {
        "server_lr": check_number(strategy, "server_lr", server_lr, low=0.0, low_open=True),
        "momentum": check_number(strategy, "momentum", momentum, low=0.0, high=1.0, high_open=True),
    }


def check_adaptive(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """FedAdam, FedYogi, FedAdagrad: ``server_lr`` > 0, ``beta1``/``beta2`` in [0, 1), ``tau`` > 0."""
    v = {key: params.get(key, default) for key, default in ADAPTIVE_DEFAULTS.items()}
    return {
        "server_lr": check_number(strategy, "server_lr", v["server_lr"], low=0.0, low_open=True),
        "beta1": check_number(strategy, "beta1", v["beta1"], low=0.0, high=1.0, high_open=True),
        "beta2": check_number(strategy, "beta2", v["beta2"], low=0.0, high=1.0, high_open=True),
        "tau": check_number(strategy, "tau", v["tau"], low=0.0, low_open=True),
    }


def check_qfedavg(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """q-FedAvg: ``q`` >= 0 and ``lipschitz`` > 0, required."""
    q = check_number(strategy, "q", params.get("q", DEFAULT_Q), low=0.0)
    lipschitz = params.get("lipschitz")
    if lipschitz is None:
        raise ValueError(
            "qfedavg: parameter 'lipschitz' is required; Li et al. use L = 1 / local "
            "learning rate (e.g. 100 for lr 0.01)"
        )
    return {
        "q": q,
        "lipschitz": check_number(strategy, "lipschitz", lipschitz, low=0.0, low_open=True),
    }


def check_robust(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The robust rules: ``memory_budget_bytes``, an integer >= 1."""
    budget = params.get("memory_budget_bytes", DEFAULT_MEMORY_BUDGET_BYTES)
    return {"memory_budget_bytes": check_int(strategy, "memory_budget_bytes", budget, low=1)}


def check_trimmed_mean(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Trimmed mean: ``beta`` in [0, 0.5)."""
    beta = params.get("beta", DEFAULT_BETA)
    return {"beta": check_number(strategy, "beta", beta, low=0.0, high=0.5, high_open=True)}


def check_krum(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Krum and Multi-Krum: ``f``, an integer >= 0."""
    return {"f": check_int(strategy, "f", params.get("f", DEFAULT_F), low=0)}


def check_multi_krum(strategy: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Multi-Krum: ``m``, None (``n - f``) or an integer >= 1."""
    m = params.get("m")
    return {"m": None if m is None else check_int(strategy, "m", m, low=1)}


_Check = Callable[[str, Mapping[str, Any]], dict[str, Any]]
_ROBUST_LEVELS: tuple[_Check, ...] = (check_shared, check_robust)
_ADAPTIVE_LEVELS: tuple[_Check, ...] = (check_shared, check_adaptive)
# Each strategy's levels in the order its constructor checks them (super().__init__ first).
_LEVELS: dict[str, tuple[_Check, ...]] = {
    "fedavg": (check_shared,),
    "fedavgm": (check_shared, check_momentum),
    "fedadam": _ADAPTIVE_LEVELS,
    "fedyogi": _ADAPTIVE_LEVELS,
    "fedadagrad": _ADAPTIVE_LEVELS,
    "qfedavg": (check_shared, check_qfedavg),
    "norm_bound": (check_norm_bound_required, check_shared),
    "median": _ROBUST_LEVELS,
    "trimmed_mean": (*_ROBUST_LEVELS, check_trimmed_mean),
    "krum": (*_ROBUST_LEVELS, check_krum),
    "multi_krum": (*_ROBUST_LEVELS, check_krum, check_multi_krum),
}
assert tuple(_LEVELS) == STRATEGY_NAMES, "parameter checks drifted from aggregation_names"


def check_strategy_params(name: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Every parameter of strategy ``name``, checked, defaults filled in, in SPEC_PARAMS order.

    Args:
        name: a name in :data:`STRATEGY_PARAMS`.
        params: the strategy's parameters (only its own; see :func:`check_strategy_spec`).

    Raises:
        ValueError: a parameter is missing where required or out of range; the message is the
            one the strategy's constructor raises.
    """
    values: dict[str, Any] = {}
    for check in _LEVELS[name]:
        values.update(check(name, params))
    return {key: values[key] for key in STRATEGY_PARAMS[name]}


def check_strategy_spec(spec: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A plan's ``aggregation`` spec such as ``{"strategy": "trimmed_mean", "beta": 0.2}``.

    Returns:
        the strategy's name and its parameters, checked, every default spelled out.

    Raises:
        ValueError: the spec is not a mapping, the name is unknown (the message lists the
            allowed names), a parameter is unknown (the message lists the strategy's
            parameters), missing where required, or out of range.
    """
    if not isinstance(spec, Mapping):
        raise ValueError(
            f'aggregation spec must be an object such as {{"strategy": "fedavg"}}, got '
            f"{type(spec).__name__}"
        )
    name = spec.get("strategy", "fedavg")
    if not isinstance(name, str) or name not in STRATEGY_PARAMS:
        raise ValueError(f"unknown strategy {name!r}; allowed: {', '.join(STRATEGY_PARAMS)}")
    allowed = STRATEGY_PARAMS[name]
    params = {key: value for key, value in spec.items() if key != "strategy"}
    unknown = sorted(set(params) - set(allowed), key=str)
    if unknown:
        raise ValueError(
            f"{name}: unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; allowed: {', '.join(allowed)}"
        )
    return name, check_strategy_params(name, params)
