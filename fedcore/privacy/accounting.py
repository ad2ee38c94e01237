"""Privacy accounting: epsilon of Poisson-subsampled Gaussian mechanisms and of a plan.

Every mechanism Quorum runs is a Poisson-subsampled Gaussian mechanism described by a triple
``(noise_multiplier, sample_rate, steps)``: DP-SGD at a site (sample-level DP, one entry per local
training run) and DP-FedAvg at the server (client-level DP, one entry per round). A silo's
*history* is the list of those triples; its epsilon at a given delta is computed by an accountant
over the whole history (tight composition, never a sum of per-entry epsilons):

- ``"rdp"``: Renyi DP of the sampled Gaussian mechanism (Mironov, 2017; Mironov, Talwar & Zhang,
  2019) with Opacus's RDP-to-(epsilon, delta) conversion (Balle et al., 2020). Opacus's orders,
  extended with large orders (up to 512, as TensorFlow Privacy does) so that high-noise settings
  get a tight bound; where the optimum lies among Opacus's own orders the result is Opacus's.
- ``"prv"``: numerical composition of privacy loss random variables (Gopi, Lee & Wutschitz,
  2021), usually tighter than RDP; Opacus returns an upper bound within ``eps_error = 0.01``.

Both come from Opacus (``opacus.accountants``), imported on first use: importing Opacus costs
about 1.5 s of CPU, which a site agent that never trains with DP should not pay.

Sample-level and client-level entries may share one history: a client-level guarantee for a
whole silo implies the same guarantee for each example in it (an example is part of its silo),
so composing both kinds gives a valid, conservative per-example epsilon.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, TypeGuard

import numpy as np

__all__ = [
    "ACCOUNTANTS",
    "PLAN_PRIVACY_DEFAULTS",
    "PRIVACY_MODES",
    "epsilon",
    "epsilon_of_history",
    "noise_multiplier_for",
    "plan_mechanism",
    "plan_noise_multiplier",
    "project_plan_epsilon",
    "resolve_noise_multiplier",
]

ACCOUNTANTS: tuple[str, ...] = ("rdp", "prv")
PRIVACY_MODES: tuple[str, ...] = ("none", "sample", "client")
# The plan spec's privacy section with its defaults (docs/internals/governance.md); a key the
# plan leaves out takes its value from here.
PLAN_PRIVACY_DEFAULTS: dict[str, Any] = {
    "mode": "none",
    "noise_multiplier": 1.1,
    "target_epsilon": 3.0,
    "clip": 1.0,
    "delta": 1e-5,
    # client mode only: {"target_quantile", "learning_rate", "count_noise_std"} (Andrew et al.
    # 2021); the clip then starts at "clip" and follows the quantile of the update norms
    "adaptive_clip": None,
    # epsilon-DP of the statistics pass's numeric statistics (Laplace, fedcore.tabular); None:
    # exact statistics. Independent of mode: it noises no training step.
    "statistics_epsilon": None,
}

# TensorFlow Privacy's extra large orders: for high noise the optimal order passes Opacus's
# largest (63) and its bound would be loose (e.g. 0.10 instead of 0.004 for z=50, q=0.001).
_RDP_ORDERS: list[float] = (
    [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [80, 96, 128, 192, 256, 512]
)
# Search bounds for noise_multiplier_for: beyond them the target is not reachable in practice.
_MAX_NOISE = 1e4
_MIN_NOISE = 1e-3


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_mechanism(
    noise_multiplier: object, sample_rate: object, steps: object, where: str = ""
) -> tuple[float, float, int]:
    if not _is_number(noise_multiplier) or noise_multiplier <= 0:
        raise ValueError(
            f"{where}noise_multiplier must be a finite number > 0, got {noise_multiplier!r}; "
            "without noise there is no differential privacy (epsilon is infinite)"
        )
    if not _is_number(sample_rate) or not 0 < sample_rate <= 1:
        raise ValueError(
            f"{where}sample_rate must be a number in (0, 1], got {sample_rate!r} "
            "(batch_size / rows for DP-SGD, the fraction of silos per round for client DP)"
        )
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{where}steps must be an integer >= 1, got {steps!r}")
    return float(noise_multiplier), float(sample_rate), steps


def _check_delta(delta: object) -> float:
    if not _is_number(delta) or not 0 < delta < 1:
        raise ValueError(
            f"delta must be a number in (0, 1), got {delta!r}; typically below 1 / rows"
        )
    return float(delta)


def _check_accountant(accountant: object) -> str:
    if accountant not in ACCOUNTANTS:
        raise ValueError(
            f"unknown accountant {accountant!r}; allowed: {', '.join(map(repr, ACCOUNTANTS))}"
        )
    return str(accountant)


def _check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _compute(history: list[tuple[float, float, int]], delta: float, accountant: str) -> float:
    """Run Opacus's accountant over an already validated, non-empty history."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
        # "Optimal order is the largest/smallest alpha" (RDP, also used inside PRV to size its
        # domain): the bound stays valid, only less tight. log(1 - q) = -inf for q = 1 inside
        # the PRV is handled correctly.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        if accountant == "rdp":
            rdp = RDPAccountant()
            rdp.history = list(history)
            return float(rdp.get_epsilon(delta=delta, alphas=_RDP_ORDERS))
        prv = PRVAccountant()
        prv.history = list(history)
        return float(prv.get_epsilon(delta=delta))


def epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Return the epsilon of ``steps`` compositions of a Poisson-subsampled Gaussian mechanism.

    Args:
        noise_multiplier: noise standard deviation divided by the L2 sensitivity (the clip), > 0.
        sample_rate: probability that each record (DP-SGD) or silo (client DP) takes part in a
            step, in (0, 1].
        steps: number of steps (optimizer steps, or rounds for client DP), >= 1.
        delta: the delta of the (epsilon, delta) guarantee, in (0, 1).
        accountant: "rdp" or "prv".

    Returns:
        epsilon (an upper bound) at ``delta``.

    Raises:
        ValueError: an argument is out of range or the accountant is unknown.
    """
    mechanism = _check_mechanism(noise_multiplier, sample_rate, steps)
    return _compute([mechanism], _check_delta(delta), _check_accountant(accountant))


def epsilon_of_history(
    history: Sequence[tuple[float, float, int]],
    *,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Return the epsilon of a silo's whole history, composed by the accountant.

    Args:
        history: ``(noise_multiplier, sample_rate, steps)`` of every mechanism run on the silo's
            data, in any order (composition is commutative). Empty: nothing spent, 0.0.
        delta: the delta of the guarantee, in (0, 1); one delta for the whole history.
        accountant: "rdp" or "prv".

    Returns:
        epsilon at ``delta`` of the composition, never more than the sum of the entries'
        epsilons and usually much less.

    Raises:
        ValueError: an entry is malformed (the message names its index), delta is out of range
            or the accountant is unknown.
    """
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)
    checked: list[tuple[float, float, int]] = []
    for index, entry in enumerate(history):
        if not isinstance(entry, tuple | list) or len(entry) != 3:
            raise ValueError(
                f"history entry #{index}: expected (noise_multiplier, sample_rate, steps), "
                f"got {entry!r}"
            )
        checked.append(_check_mechanism(*entry, where=f"history entry #{index}: "))
    if not checked:
        return 0.0
    return _compute(checked, delta, accountant)


def noise_multiplier_for(
    *,
    target_epsilon: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
    tolerance: float = 1e-3,
) -> float:
    """Return the smallest noise multiplier found whose epsilon is at most ``target_epsilon``.

    A bracketing search on the noise multiplier: the result ``z`` always satisfies
    ``epsilon(z) <= target_epsilon`` (computed by the same function the ledger uses, so the
    plan's guarantee holds exactly), and ``epsilon(z) >= target_epsilon * (1 - tolerance)`` unless
    the bracket on ``z`` shrank below a relative width of 1e-9 first.

    Args:
        target_epsilon: the epsilon to reach, > 0.
        sample_rate: as for :func:`epsilon`, in (0, 1].
        steps: as for :func:`epsilon`, >= 1.
        delta: the delta of the guarantee, in (0, 1).
        accountant: "rdp" or "prv".
        tolerance: relative slack below the target accepted to stop, in (0, 1).

    Returns:
        the noise multiplier, > 0.

    Raises:
        ValueError: an argument is out of range, or the target needs a noise multiplier above
            1e4 (the target is too small for these steps and sample rate).
    """
    if not _is_number(target_epsilon) or target_epsilon <= 0:
        raise ValueError(f"target_epsilon must be a finite number > 0, got {target_epsilon!r}")
    if not _is_number(tolerance) or not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a number in (0, 1), got {tolerance!r}")
    _, sample_rate, steps = _check_mechanism(1.0, sample_rate, steps)
    delta = _check_delta(delta)
    accountant = _check_accountant(accountant)

    def eps(z: float) -> float:
        return _compute([(z, sample_rate, steps)], delta, accountant)

    # Bracket: eps(high) <= target < eps(low). Epsilon decreases as the noise grows.
    high, eps_high = 1.0, eps(1.0)
    if eps_high <= target_epsilon:
        low, eps_low = high / 2, eps(high / 2)
        while eps_low <= target_epsilon:
            if low < _MIN_NOISE:
                return low  # a huge target: almost no noise reaches it
            high, eps_high = low, eps_low
            low, eps_low = low / 2, eps(low / 2)
    else:
        low, eps_low = high, eps_high
        while eps_high > target_epsilon:
            if high * 2 > _MAX_NOISE:
                raise ValueError(
                    f"target_epsilon {target_epsilon:g} needs a noise multiplier above "
                    f"{_MAX_NOISE:g} for sample_rate {sample_rate:g} and {steps} steps; raise "
                    "the target or take fewer steps (rounds, epochs) or a smaller sample rate"
                )
            low, eps_low = high, eps_high
            high, eps_high = high * 2, eps(high * 2)
    # Illinois (regula falsi that halves the value kept twice) on log(epsilon) against
    # log(noise), a nearly straight line: a few accountant calls where plain bisection needs
    # some twenty.
    log_target = math.log(target_epsilon)
    x_low, g_low = math.log(low), math.log(eps_low) - log_target
    x_high, g_high = math.log(high), math.log(eps_high) - log_target
    kept = 0  # +1: the low end was kept by the last step, -1: the high end
    for _ in range(200):
        if target_epsilon - eps_high <= tolerance * target_epsilon or high - low <= 1e-9 * high:
            break
        x = (x_low + x_high) / 2
        if math.isfinite(g_low):
            secant = (x_low * g_high - x_high * g_low) / (g_high - g_low)
            if x_low < secant < x_high:
                x = secant
        z = math.exp(x)
        eps_z = eps(z)
        if eps_z <= target_epsilon:
            x_high, g_high, high, eps_high = x, math.log(eps_z) - log_target, z, eps_z
            if kept == 1:
                g_low /= 2
            kept = 1
        else:
            x_low, g_low, low = x, math.log(eps_z) - log_target, z
            if kept == -1:
                g_high /= 2
            kept = -1
    return high


def resolve_noise_multiplier(
    *,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """Return the noise multiplier to train with, from a fixed value, a target epsilon or both.

    With both, the larger of ``noise_multiplier`` and the one calibrated to ``target_epsilon``
    is used: the run adds at least the noise the plan names and spends at most its target.

    Args:
        noise_multiplier: a fixed noise multiplier > 0, or None.
        target_epsilon: the epsilon the run may spend over ``steps``, > 0, or None.
        sample_rate: as for :func:`epsilon`.
        steps: total steps of the run (all rounds), as for :func:`epsilon`.
        delta: the delta of the guarantee, in (0, 1).
        accountant: "rdp" or "prv".

    Returns:
        the noise multiplier, > 0.

    Raises:
        ValueError: both are None, or an argument is out of range.
    """
    if noise_multiplier is None and target_epsilon is None:
        raise ValueError("give noise_multiplier or target_epsilon (or both) to calibrate noise")
    _check_delta(delta)
    _check_accountant(accountant)
    fixed = 0.0
    if noise_multiplier is not None:
        fixed, _, _ = _check_mechanism(noise_multiplier, sample_rate, steps)
    if target_epsilon is None:
        return fixed
    calibrated = noise_multiplier_for(
        target_epsilon=target_epsilon,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=accountant,
    )
    return max(fixed, calibrated)


def _plan_section(privacy: Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(privacy, Mapping):
        raise ValueError("the plan's privacy section must be an object")
    unknown = sorted(str(key) for key in privacy if key not in PLAN_PRIVACY_DEFAULTS)
    if unknown:
        raise ValueError(
            f"privacy: unknown key(s) {', '.join(map(repr, unknown))}; "
            f"allowed: {', '.join(PLAN_PRIVACY_DEFAULTS)}"
        )
    section = {**PLAN_PRIVACY_DEFAULTS, **privacy}
    if section["mode"] not in PRIVACY_MODES:
        raise ValueError(
            f"privacy.mode must be one of {', '.join(PRIVACY_MODES)}, got {section['mode']!r}"
        )
    return section


def plan_mechanism(
    privacy: Mapping[str, Any],
    *,
    rows: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    clients_per_round_fraction: float = 1.0,
    accountant: str = "rdp",
) -> tuple[float, float, int] | None:
    """Return the ``(noise_multiplier, sample_rate, steps)`` a plan runs at one silo.

    Sample mode (DP-SGD at the site, Abadi et al., 2016, with Poisson sampling):
    ``sample_rate = min(1, batch_size / rows)`` and
    ``steps = rounds * local_epochs * ceil(rows / batch_size)`` -- with Poisson sampling a
    batch holds ``sample_rate * rows = batch_size`` rows on average, so an epoch is
    ``ceil(1 / sample_rate)`` steps, the same number of steps as without DP. The projection
    assumes the silo takes part in every round (an upper bound when silos are sampled).

    Client mode (DP-FedAvg at the server, McMahan et al., 2018): each round is one step of
    the sampled Gaussian mechanism on the silo's whole update: ``sample_rate =
    clients_per_round_fraction`` (1.0 when every silo takes part in every round; below 1 the
    orchestrator must sample silos independently with that probability for the amplification
    to hold) and ``steps = rounds``. ``rows`` and ``batch_size`` play no part.

    Noise: :func:`resolve_noise_multiplier` from the plan's ``noise_multiplier`` and
    ``target_epsilon`` over those steps (either may be null, not both).

    Args:
        privacy: the plan's privacy section (mode, noise_multiplier, target_epsilon, clip,
            delta); missing keys take :data:`PLAN_PRIVACY_DEFAULTS`.
        rows: the silo's training rows, >= 1.
        batch_size: the plan's ``training.batch_size``, >= 1.
        local_epochs: the plan's ``training.local_epochs``, >= 1.
        rounds: the plan's ``training.rounds``, >= 1.
        clients_per_round_fraction: probability that a silo takes part in a round, in (0, 1].
        accountant: "rdp" or "prv", used to calibrate noise to ``target_epsilon``.

    Returns:
        the triple, or None for mode "none" (the other arguments are then not checked).

    Raises:
        ValueError: the privacy section or an argument is invalid, or the target epsilon is
            unreachable.
    """
    section = _plan_section(privacy)
    if section["mode"] == "none":
        return None
    rows = _check_positive_int("rows", rows)
    batch_size = _check_positive_int("batch_size", batch_size)
    local_epochs = _check_positive_int("local_epochs", local_epochs)
    rounds = _check_positive_int("rounds", rounds)
    if not _is_number(clients_per_round_fraction) or not 0 < clients_per_round_fraction <= 1:
        raise ValueError(
            "clients_per_round_fraction must be a number in (0, 1], "
            f"got {clients_per_round_fraction!r}"
        )
    if section["mode"] == "sample":
        sample_rate = min(1.0, batch_size / rows)
        steps = rounds * local_epochs * math.ceil(rows / batch_size)
    else:
        sample_rate = float(clients_per_round_fraction)
        steps = rounds
    noise = resolve_noise_multiplier(
        noise_multiplier=section["noise_multiplier"],
        target_epsilon=section["target_epsilon"],
        sample_rate=sample_rate,
        steps=steps,
        delta=section["delta"],
        accountant=accountant,
    )
    return noise, sample_rate, steps


def plan_noise_multiplier(
    privacy: Mapping[str, Any],
    *,
    rows: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    clients_per_round_fraction: float = 1.0,
    accountant: str = "rdp",
) -> float | None:
    """Return the noise multiplier a plan trains with at one silo; None for mode "none".

    The site agent (sample mode) and the server (client mode) both call this, with the plan's
    totals, so that the noise they add is the noise the approval projected. Arguments as for
    :func:`plan_mechanism`.

    Args:
        privacy: the plan's privacy section.
        rows: the silo's training rows, >= 1.
        batch_size: the plan's batch size, >= 1.
        local_epochs: the plan's local epochs, >= 1.
        rounds: the plan's rounds, >= 1.
        clients_per_round_fraction: probability that a silo takes part in a round, in (0, 1].
        accountant: "rdp" or "prv".
    """
    mechanism = plan_mechanism(
        privacy,
        rows=rows,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        clients_per_round_fraction=clients_per_round_fraction,
        accountant=accountant,
    )
    return None if mechanism is None else mechanism[0]


def project_plan_epsilon(
    privacy: Mapping[str, Any],
    *,
    rows: int,
    batch_size: int,
    local_epochs: int,
    rounds: int,
    clients_per_round_fraction: float = 1.0,
    accountant: str = "rdp",
) -> float:
    """Return the epsilon a plan would spend at one silo over the whole run; 0.0 without DP.

    The mechanism is :func:`plan_mechanism` (formulas and references there) and its epsilon is
    :func:`epsilon` at the plan's delta. With a ``target_epsilon`` the result is at most that
    target (equal within the calibration tolerance when the target sets the noise).

    Args:
        privacy: the plan's privacy section (mode, noise_multiplier, target_epsilon, clip,
            delta); missing keys take :data:`PLAN_PRIVACY_DEFAULTS`.
        rows: the silo's training rows, >= 1.
        batch_size: the plan's ``training.batch_size``, >= 1.
        local_epochs: the plan's ``training.local_epochs``, >= 1.
        rounds: the plan's ``training.rounds``, >= 1.
        clients_per_round_fraction: probability that a silo takes part in a round, in (0, 1].
        accountant: "rdp" or "prv"; use the ledger's accountant.

    Raises:
        ValueError: the privacy section or an argument is invalid, or the target epsilon is
            unreachable.
    """
    mechanism = plan_mechanism(
        privacy,
        rows=rows,
        batch_size=batch_size,
        local_epochs=local_epochs,
        rounds=rounds,
        clients_per_round_fraction=clients_per_round_fraction,
        accountant=accountant,
    )
    if mechanism is None:
        return 0.0
    noise, sample_rate, steps = mechanism
    return epsilon(
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=steps,
        delta=_plan_section(privacy)["delta"],
        accountant=accountant,
    )
