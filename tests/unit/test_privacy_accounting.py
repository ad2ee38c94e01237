"""Tests for fedcore.privacy.accounting: epsilon, composition, calibration, plan projection."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedcore.privacy import (
    epsilon,
    epsilon_of_history,
    noise_multiplier_for,
    plan_mechanism,
    plan_noise_multiplier,
    project_plan_epsilon,
)

# The DP-SGD MNIST benchmark (Abadi et al., 2016; Opacus's README): 60 epochs of batches of 256.
BAR = {"noise_multiplier": 1.1, "sample_rate": 256 / 60000, "steps": 14062, "delta": 1e-5}


def test_bar_rdp_matches_opacus_and_the_published_value():
    opacus = RDPAccountant()
    opacus.history = [(BAR["noise_multiplier"], BAR["sample_rate"], BAR["steps"])]
    expected = opacus.get_epsilon(delta=BAR["delta"])

    ours = epsilon(**BAR, accountant="rdp")

    assert abs(ours - expected) / expected < 1e-6
    assert ours == pytest.approx(2.597, abs=5e-4)


def test_bar_prv_matches_opacus_and_the_published_value():
    opacus = PRVAccountant()
    opacus.history = [(BAR["noise_multiplier"], BAR["sample_rate"], BAR["steps"])]
    expected = float(opacus.get_epsilon(delta=BAR["delta"]))

    ours = epsilon(**BAR, accountant="prv")

    assert abs(ours - expected) / expected < 1e-6
    assert abs(ours - 2.392) / 2.392 < 1e-2
    assert ours < epsilon(**BAR, accountant="rdp")  # PRV is the tighter bound here


def test_more_noise_fewer_steps_or_a_lower_rate_spend_less():
    base = epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-5)

    assert epsilon(noise_multiplier=2.0, sample_rate=0.01, steps=1000, delta=1e-5) < base
    assert epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=100, delta=1e-5) < base
    assert epsilon(noise_multiplier=1.0, sample_rate=0.001, steps=1000, delta=1e-5) < base
    assert epsilon(noise_multiplier=1.0, sample_rate=0.01, steps=1000, delta=1e-3) < base


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_high_noise_gets_a_tight_bound_beyond_opacus_default_orders():
    # The optimal Renyi order here is far above Opacus's largest default (63).
    opacus = RDPAccountant()
    opacus.history = [(50.0, 0.001, 10)]
    loose = opacus.get_epsilon(delta=1e-5)

    ours = epsilon(noise_multiplier=50.0, sample_rate=0.001, steps=10, delta=1e-5)

    assert ours < loose / 10


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_history_composition_is_tighter_than_the_sum(accountant):
    sample = (1.1, 0.05, 60)  # DP-SGD at the site
    client = (2.0, 1.0, 10)  # DP-FedAvg rounds

    alone = [epsilon_of_history([m], delta=1e-5, accountant=accountant) for m in (sample, client)]
    both = epsilon_of_history([sample, client], delta=1e-5, accountant=accountant)
    reversed_order = epsilon_of_history([client, sample], delta=1e-5, accountant=accountant)

    assert max(alone) < both < sum(alone)
    assert reversed_order == pytest.approx(both, rel=1e-9)


def test_history_of_one_entry_equals_epsilon_and_splitting_steps_changes_nothing():
    whole = epsilon(noise_multiplier=1.3, sample_rate=0.02, steps=500, delta=1e-6)

    assert epsilon_of_history([(1.3, 0.02, 500)], delta=1e-6) == pytest.approx(whole, rel=1e-12)
    split = epsilon_of_history([(1.3, 0.02, 200), (1.3, 0.02, 300)], delta=1e-6)
    assert split == pytest.approx(whole, rel=1e-9)


def test_empty_history_spent_nothing():
    assert epsilon_of_history([], delta=1e-5) == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"noise_multiplier": 0.0}, "noise_multiplier must be a finite number > 0"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"noise_multiplier": True}, "noise_multiplier"),
        ({"sample_rate": 0.0}, r"sample_rate must be a number in \(0, 1\]"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": 0}, "steps must be an integer >= 1"),
        ({"steps": 2.0}, "steps"),
        ({"delta": 0.0}, r"delta must be a number in \(0, 1\)"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "unknown accountant 'gdp'; allowed: 'rdp', 'prv'"),
    ],
)
def test_bad_arguments_are_refused_with_a_clear_message(kwargs, message):
    arguments = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 10, "delta": 1e-5}

    with pytest.raises(ValueError, match=message):
        epsilon(**{**arguments, **kwargs})


def test_bad_history_entry_is_named():
    with pytest.raises(ValueError, match="history entry #1: noise_multiplier"):
        epsilon_of_history([(1.0, 0.1, 5), (0.0, 0.1, 5)], delta=1e-5)
    with pytest.raises(ValueError, match="history entry #0: expected"):
        epsilon_of_history([(1.0, 0.1)], delta=1e-5)


def test_noise_multiplier_for_reaches_the_target_from_below_rdp():
    target, q, steps = 3.0, 0.064, 160

    z = noise_multiplier_for(target_epsilon=target, sample_rate=q, steps=steps, delta=1e-5)
    spent = epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=1e-5)

    assert target * (1 - 1e-3) <= spent <= target
    # A little less noise would overspend: z is (close to) the smallest that fits.
    assert epsilon(noise_multiplier=z * 0.99, sample_rate=q, steps=steps, delta=1e-5) > target


def test_noise_multiplier_for_reaches_the_target_from_below_prv():
    z = noise_multiplier_for(
        target_epsilon=1.0, sample_rate=1.0, steps=5, delta=1e-5, accountant="prv"
    )
    spent = epsilon(noise_multiplier=z, sample_rate=1.0, steps=5, delta=1e-5, accountant="prv")

    assert 1.0 * (1 - 1e-3) <= spent <= 1.0


def test_noise_multiplier_for_an_unreachable_target_says_so():
    with pytest.raises(ValueError, match="needs a noise multiplier above"):
        noise_multiplier_for(target_epsilon=1e-9, sample_rate=1.0, steps=1000, delta=1e-5)


def test_noise_multiplier_for_a_huge_target_needs_little_noise():
    z = noise_multiplier_for(target_epsilon=1e6, sample_rate=0.01, steps=10, delta=1e-5)

    assert 0 < z < 0.01


PLAN_SHAPE = {"rows": 1000, "batch_size": 64, "local_epochs": 2, "rounds": 5}


def test_sample_mode_projection_uses_batch_over_rows_and_ceil_steps():
    privacy = {"mode": "sample", "noise_multiplier": 1.1, "target_epsilon": None, "delta": 1e-5}

    projected = project_plan_epsilon(privacy, **PLAN_SHAPE)

    # q = 64 / 1000, steps = 5 rounds * 2 epochs * ceil(1000 / 64) = 160
    assert plan_mechanism(privacy, **PLAN_SHAPE) == (1.1, 0.064, 160)
    assert projected == epsilon(noise_multiplier=1.1, sample_rate=0.064, steps=160, delta=1e-5)


def test_sample_mode_with_only_a_target_spends_the_target():
    privacy = {"mode": "sample", "noise_multiplier": None, "target_epsilon": 2.0, "delta": 1e-5}

    projected = project_plan_epsilon(privacy, **PLAN_SHAPE)

    assert 2.0 * (1 - 1e-3) <= projected <= 2.0


def test_with_both_the_larger_noise_wins():
    weak_noise = {"mode": "sample", "noise_multiplier": 0.3, "target_epsilon": 2.0}
    strong_noise = {"mode": "sample", "noise_multiplier": 5.0, "target_epsilon": 2.0}

    # 0.3 alone would overspend: the target raises the noise.
    assert project_plan_epsilon(weak_noise, **PLAN_SHAPE) <= 2.0
    assert plan_noise_multiplier(weak_noise, **PLAN_SHAPE) > 0.3
    # 5.0 already spends less than the target: it is kept.
    assert plan_noise_multiplier(strong_noise, **PLAN_SHAPE) == 5.0
    assert project_plan_epsilon(strong_noise, **PLAN_SHAPE) == epsilon(
        noise_multiplier=5.0, sample_rate=0.064, steps=160, delta=1e-5
    )


def test_client_mode_counts_rounds_and_the_fraction_of_silos():
    privacy = {"mode": "client", "noise_multiplier": 1.0, "target_epsilon": None, "delta": 1e-5}

    everyone = project_plan_epsilon(privacy, **PLAN_SHAPE)
    half = project_plan_epsilon(privacy, **PLAN_SHAPE, clients_per_round_fraction=0.5)
    other_silo = project_plan_epsilon(privacy, **{**PLAN_SHAPE, "rows": 10})

    assert everyone == epsilon(noise_multiplier=1.0, sample_rate=1.0, steps=5, delta=1e-5)
    assert half == epsilon(noise_multiplier=1.0, sample_rate=0.5, steps=5, delta=1e-5)
    assert other_silo == everyone  # client-level DP does not depend on the silo's rows


def test_batch_larger_than_the_silo_samples_every_row():
    privacy = {"mode": "sample", "noise_multiplier": 2.0, "target_epsilon": None}

    assert plan_mechanism(privacy, **{**PLAN_SHAPE, "rows": 40}) == (2.0, 1.0, 10)


def test_mode_none_projects_zero_whatever_the_silo():
    assert project_plan_epsilon({"mode": "none"}, **PLAN_SHAPE) == 0.0
    assert project_plan_epsilon({}, rows=0, batch_size=0, local_epochs=0, rounds=0) == 0.0
    assert plan_noise_multiplier({"mode": "none"}, **PLAN_SHAPE) is None


def test_missing_keys_take_the_plan_defaults_and_never_overspend_the_target():
    # Defaults: noise_multiplier 1.1, target_epsilon 3.0, delta 1e-5. Five full rounds with
    # z = 1.1 would spend about 10.9, so the default target raises the noise.
    projected = project_plan_epsilon({"mode": "client"}, **PLAN_SHAPE)

    assert epsilon(noise_multiplier=1.1, sample_rate=1.0, steps=5, delta=1e-5) > 3.0
    assert 3.0 * (1 - 1e-3) <= projected <= 3.0
    assert plan_noise_multiplier({"mode": "client"}, **PLAN_SHAPE) > 1.1


@pytest.mark.parametrize(
    ("privacy", "shape", "message"),
    [
        ({"mode": "central"}, {}, "privacy.mode must be one of none, sample, client"),
        ({"mode": "sample", "epsilon": 1}, {}, "unknown key"),
        ({"mode": "sample", "noise_multiplier": None, "target_epsilon": None}, {}, "give"),
        ({"mode": "sample"}, {"rows": 0}, "rows must be an integer >= 1"),
        ({"mode": "client"}, {"clients_per_round_fraction": 0.0}, "clients_per_round_fraction"),
        ({"mode": "sample", "delta": 2}, {}, "delta"),
    ],
)
def test_bad_plans_are_refused(privacy, shape, message):
    with pytest.raises(ValueError, match=message):
        project_plan_epsilon(privacy, **{**PLAN_SHAPE, **shape})
