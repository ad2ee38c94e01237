"""Tests for fedcore.privacy.client_dp: clipping, ChaCha20 noise, DP-FedAvg, adaptive clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcore.privacy import (
    AdaptiveClip,
    DistributedNoise,
    DPFedAvg,
    NoiseSource,
    add_noise,
    clip_update,
    distributed_noise_share,
)
from fedcore.tensors import IncompatibleStateDict

KEY = bytes(range(32))


def norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(
        sum(float(t.double().square().sum()) for t in state.values() if t.is_floating_point())
    )


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small tensors: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# clip_update


def test_clip_scales_a_large_update_onto_the_ball_and_keeps_its_direction():
    delta = {"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor(7)}

    clipped, original = clip_update(delta, 1.0)

    assert original == pytest.approx(5.0)
    assert norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert norm(clipped) <= 1.0
    assert torch.allclose(clipped["w"], torch.tensor([0.6, 0.0]))
    assert torch.allclose(clipped["b"], torch.tensor([0.8]))
    # Integer buffers are outside the norm and come back unchanged.
    assert torch.equal(clipped["n"], torch.tensor(7))
    assert torch.equal(delta["w"], torch.tensor([3.0, 0.0]))  # the input is not modified


def test_clip_leaves_small_and_zero_updates_unchanged():
    small = {"w": torch.tensor([0.3, -0.4])}
    zero = {"w": torch.zeros(3), "steps": torch.tensor(5)}

    small_clipped, small_norm = clip_update(small, 1.0)
    zero_clipped, zero_norm = clip_update(zero, 1.0)

    assert small_norm == pytest.approx(0.5)
    assert torch.equal(small_clipped["w"], small["w"])
    assert zero_norm == 0.0
    assert torch.equal(zero_clipped["w"], torch.zeros(3))
    assert zero_clipped["w"] is not zero["w"]


def test_integer_buffers_do_not_count_in_the_norm():
    _, with_buffer = clip_update({"w": torch.tensor([0.6, 0.8]), "n": torch.tensor(1000)}, 10.0)

    assert with_buffer == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_clipped_norm_never_exceeds_the_bound_in_any_dtype(dtype):
    generator = torch.Generator().manual_seed(1)
    for trial in range(20):
        delta = {
            "a": (torch.randn(37, 5, generator=generator) * (trial + 1)).to(dtype),
            "b": torch.randn(11, generator=generator).to(dtype),
        }

        clipped, _ = clip_update(delta, 0.7)

        assert norm(clipped) <= 0.7
        assert norm(clipped) == pytest.approx(0.7, rel=2e-2)
        assert all(clipped[k].dtype == dtype for k in delta)


def test_clip_refuses_non_finite_values_and_a_bad_bound():
    with pytest.raises(ValueError, match="tensor 'w' holds NaN or Inf"):
        clip_update({"w": torch.tensor([1.0, math.nan])}, 1.0)
    with pytest.raises(ValueError, match="clip must be a finite number > 0"):
        clip_update({"w": torch.ones(2)}, 0.0)


# NoiseSource


def test_gaussian_has_the_requested_mean_std_and_shape():
    samples = NoiseSource(KEY).gaussian((400, 500), 2.5, dtype=torch.float64).flatten()
    n = samples.numel()

    assert samples.shape == (n,)
    assert abs(float(samples.mean())) < 5 * 2.5 / math.sqrt(n)
    assert float(samples.std()) == pytest.approx(2.5, rel=5 * math.sqrt(1 / (2 * n)))
    # Shape of the distribution: the share within one and two standard deviations.
    within_one = float((samples.abs() <= 2.5).double().mean())
    within_two = float((samples.abs() <= 5.0).double().mean())
    assert within_one == pytest.approx(math.erf(1 / math.sqrt(2)), abs=0.005)
    assert within_two == pytest.approx(math.erf(2 / math.sqrt(2)), abs=0.003)


def test_gaussian_values_are_uncorrelated_with_their_neighbours():
    samples = NoiseSource(KEY).gaussian(200_000, 1.0, dtype=torch.float64)

    lag_one = float((samples[1:] * samples[:-1]).mean())

    assert abs(lag_one) < 5 / math.sqrt(samples.numel())


def test_a_key_reproduces_and_fresh_sources_differ():
    first = NoiseSource(KEY)
    second = NoiseSource(KEY)

    a, b = first.gaussian(1000, 1.0), second.gaussian(1000, 1.0)
    again = first.gaussian(1000, 1.0)  # the next call continues with fresh keystream

    assert torch.equal(a, b)
    assert not torch.equal(a, again)
    assert not torch.equal(NoiseSource().gaussian(1000, 1.0), NoiseSource().gaussian(1000, 1.0))


def test_gaussian_dtypes_zero_std_and_errors():
    source = NoiseSource(KEY)

    assert source.gaussian((2, 3), 1.0, dtype=torch.bfloat16).dtype == torch.bfloat16
    assert torch.equal(source.gaussian((2, 3), 0.0), torch.zeros(2, 3))
    assert source.gaussian((0, 4), 1.0).shape == (0, 4)
    assert source.gaussian((), 1.0).shape == ()
    with pytest.raises(ValueError, match="std must be a finite number >= 0"):
        source.gaussian(3, -1.0)
    with pytest.raises(ValueError, match="floating dtype"):
        source.gaussian(3, 1.0, dtype=torch.int64)
    with pytest.raises(ValueError, match="32 bytes"):
        NoiseSource(b"short")


def test_uniform_is_in_the_unit_interval_and_flat():
    u = NoiseSource(KEY).uniform(100_000)

    assert u.dtype == torch.float64
    assert float(u.min()) >= 0.0 and float(u.max()) < 1.0
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    assert float((u < 0.1).double().mean()) == pytest.approx(0.1, abs=0.005)


def test_add_noise_noises_floats_only_and_copies():
    aggregate = {"w": torch.zeros(100_000), "n": torch.tensor([3, 4])}

    noised = add_noise(aggregate, 0.5, NoiseSource(KEY))

    assert float(noised["w"].std()) == pytest.approx(0.5, rel=0.02)
    assert torch.equal(noised["n"], torch.tensor([3, 4]))
    assert torch.equal(aggregate["w"], torch.zeros(100_000))


# DPFedAvg


def test_dpfedavg_is_the_unweighted_mean_of_clipped_deltas_over_the_expected_count():
    aggregator = DPFedAvg(clip=1.0, noise_multiplier=1e-9, source=NoiseSource(KEY))

    norms = [
        aggregator.add({"w": torch.tensor([3.0, 4.0])}),  # clipped to [0.6, 0.8]
        aggregator.add({"w": torch.tensor([0.3, 0.0])}),  # within the bound
    ]
    result = aggregator.result(num_clients_expected=4)

    assert norms == pytest.approx([5.0, 0.3])
    # (0.6 + 0.3) / 4, (0.8 + 0) / 4: the denominator is the expected count, not 2.
    assert torch.allclose(result["w"], torch.tensor([0.225, 0.2]), atol=1e-6)


def test_one_silo_moves_the_mean_by_at_most_clip_over_expected_count():
    others = [{"w": torch.tensor([0.1, -0.2, 0.3])}, {"w": torch.tensor([0.0, 0.5, 0.0])}]
    outlier = {"w": torch.tensor([1e6, -1e6, 1e6])}

    def round_mean(deltas):
        aggregator = DPFedAvg(clip=0.5, noise_multiplier=1e-9, source=NoiseSource(KEY))
        for delta in deltas:
            aggregator.add(delta)
        return aggregator.result(num_clients_expected=3)["w"]

    shift = float((round_mean([*others, outlier]) - round_mean(others)).norm())

    assert shift <= 0.5 / 3 + 1e-6


def test_dpfedavg_noise_has_std_z_clip_over_expected_count():
    aggregator = DPFedAvg(clip=2.0, noise_multiplier=1.5, source=NoiseSource(KEY))
    aggregator.add({"w": torch.zeros(200_000, dtype=torch.float64)})

    result = aggregator.result(num_clients_expected=10)

    assert aggregator.noise_std(10) == pytest.approx(0.3)
    assert float(result["w"].std()) == pytest.approx(0.3, rel=0.01)
    assert abs(float(result["w"].mean())) < 5 * 0.3 / math.sqrt(200_000)


def test_dpfedavg_keeps_dtypes_and_releases_no_integer_buffer():
    aggregator = DPFedAvg(clip=1.0, noise_multiplier=0.1, source=NoiseSource(KEY))
    aggregator.add({"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor(12)})
    aggregator.add({"w": torch.ones(3, dtype=torch.float16), "n": torch.tensor(40)})

    result = aggregator.result(num_clients_expected=2)

    assert result["w"].dtype == torch.float16
    assert result["n"].dtype == torch.int64
    assert torch.equal(result["n"], torch.tensor(0))


def test_dpfedavg_releases_once():
    aggregator = DPFedAvg(clip=1.0, noise_multiplier=1.0)
    aggregator.add({"w": torch.ones(2)})
    aggregator.result(num_clients_expected=1)

    with pytest.raises(ValueError, match="already released"):
        aggregator.result(num_clients_expected=1)
    with pytest.raises(ValueError, match="already released"):
        aggregator.add({"w": torch.ones(2)})


def test_dpfedavg_refused_delta_changes_nothing():
    aggregator = DPFedAvg(clip=1.0, noise_multiplier=1e-9, source=NoiseSource(KEY))
    aggregator.add({"w": torch.tensor([0.5, 0.0])})

    with pytest.raises(ValueError, match=r"delta #1: .*tensor 'w' holds NaN"):
        aggregator.add({"w": torch.tensor([math.inf, 0.0])})
    with pytest.raises(IncompatibleStateDict, match="delta #1 does not match delta #0"):
        aggregator.add({"w": torch.ones(3)})

    assert aggregator.count == 1
    result = aggregator.result(num_clients_expected=1)
    assert torch.allclose(result["w"], torch.tensor([0.5, 0.0]), atol=1e-6)


def test_dpfedavg_argument_errors():
    with pytest.raises(ValueError, match="noise_multiplier must be a finite number > 0"):
        DPFedAvg(clip=1.0, noise_multiplier=0.0)
    with pytest.raises(ValueError, match="clip must be"):
        DPFedAvg(clip=-1.0, noise_multiplier=1.0)
    with pytest.raises(ValueError, match="at least one delta"):
        DPFedAvg(clip=1.0, noise_multiplier=1.0).result(num_clients_expected=3)
    aggregator = DPFedAvg(clip=1.0, noise_multiplier=1.0)
    aggregator.add({"w": torch.ones(2)})
    with pytest.raises(ValueError, match="num_clients_expected must be an integer >= 1"):
        aggregator.result(num_clients_expected=0)


# Adaptive clipping


@pytest.mark.parametrize("quantile", [0.5, 0.9])
def test_adaptive_clip_converges_to_the_target_quantile(quantile):
    rng = np.random.default_rng(0)
    clients = 100
    clip = AdaptiveClip(
        initial_clip=0.05,
        target_quantile=quantile,
        learning_rate=0.2,
        noise_std_for_count=clients / 20,  # the paper's suggestion
        source=NoiseSource(KEY),
    )
    # Update norms: log-normal, median 1, 90th percentile exp(0.5 * 1.2816) = 1.90.
    true_quantile = math.exp(0.5 * {0.5: 0.0, 0.9: 1.2816}[quantile])
    fractions = []

    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=clients)
        fractions.append(float(np.mean(norms <= clip.clip)))
        clip.update(sum(clip.client_report(float(n)) for n in norms), clients)

    assert np.mean(fractions[-100:]) == pytest.approx(quantile, abs=0.04)
    assert clip.clip == pytest.approx(true_quantile, rel=0.2)


def test_adaptive_clip_moves_in_the_right_direction():
    clip = AdaptiveClip(initial_clip=1.0, noise_std_for_count=1e-9, source=NoiseSource(KEY))

    # Every update under the clip: the clip is too loose and shrinks, by exp(-0.2 * 0.5).
    assert clip.update(10 * clip.client_report(0.1), 10) == pytest.approx(math.exp(-0.1))
    # Every update above it: the clip grows back.
    assert clip.update(10 * clip.client_report(5.0), 10) == pytest.approx(1.0)


def test_adaptive_clip_update_noise_multiplier_keeps_the_round_total():
    clip = AdaptiveClip(initial_clip=1.0, noise_std_for_count=5.0)

    z_delta = clip.update_noise_multiplier(1.0)

    # Andrew et al. 2021, Theorem 1: the round is a Gaussian mechanism with
    # z = (z_delta^-2 + (2 sigma_b)^-2)^(-1/2).
    assert (z_delta**-2 + 10.0**-2) ** -0.5 == pytest.approx(1.0)
    assert z_delta > 1.0
    with pytest.raises(ValueError, match="needs noise_std_for_count above 6"):
        clip.update_noise_multiplier(12.0)


# Distributed noise


def test_shares_of_all_silos_sum_to_the_total_noise():
    total_std, silos = 3.0, 8
    shares = [
        distributed_noise_share({"w": (50_000,)}, total_std, silos, NoiseSource())
        for _ in range(silos)
    ]

    summed = torch.stack([share["w"] for share in shares]).sum(dim=0)

    assert float(summed.std()) == pytest.approx(total_std, rel=0.02)
    assert float(shares[0]["w"].std()) == pytest.approx(total_std / math.sqrt(silos), rel=0.02)


def test_dropouts_leave_less_noise_unless_the_threshold_plans_for_them():
    noise = DistributedNoise(total_std=2.0, threshold=10)
    tolerant = DistributedNoise(total_std=2.0, threshold=6)

    assert noise.effective_std(10) == pytest.approx(2.0)
    assert noise.effective_std(6) == pytest.approx(2.0 * math.sqrt(0.6))
    assert noise.effective_std(0) == 0.0
    # Planning for 6 honest survivors out of 10: the full noise survives 4 dropouts.
    assert tolerant.effective_std(6) == pytest.approx(2.0)
    assert tolerant.per_client_std == pytest.approx(2.0 / math.sqrt(6))
    assert tolerant.share({"a": (2, 2)}, NoiseSource(KEY))["a"].shape == (2, 2)
