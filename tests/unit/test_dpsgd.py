"""Tests for fedcore.privacy.dpsgd: DP-SGD with Opacus, Poisson sampling and accounting."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedcore.privacy import NoiseSource, epsilon
from fedcore.privacy.dpsgd import _PoissonSampler, make_private, train_dp
from fedcore.training import TrainingError, evaluate


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Small models: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable(rows: int, features: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Linearly separable-ish data: labels from a noisy linear score."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, features)).astype(np.float32)
    score = X @ rng.normal(size=features) + 0.3 * rng.normal(size=rows)
    return X, (score > 0).astype(np.float32)


def logistic(features: int = 5) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(features, 1))


def test_dp_training_learns_and_reports_the_accounted_epsilon():
    X, y = separable(2000)
    model = logistic()

    out = train_dp(
        model,
        X,
        y,
        epochs=3,
        batch_size=64,
        lr=0.5,
        clip=1.0,
        delta=1e-5,
        noise_multiplier=1.0,
        seed=1,
    )

    # 2000 rows in batches of 64: q = 0.032, 32 steps per epoch.
    assert out["sample_rate"] == 64 / 2000
    assert out["steps"] == 3 * 32
    assert out["noise_multiplier"] == 1.0
    assert out["epsilon"] == epsilon(
        noise_multiplier=1.0, sample_rate=0.032, steps=96, delta=1e-5, accountant="rdp"
    )
    assert evaluate(model, X, y)["accuracy"] > 0.85
    assert math.isfinite(out["train_loss"])


def test_a_target_epsilon_is_respected():
    X, y = separable(1000)

    out = train_dp(
        logistic(),
        X,
        y,
        epochs=2,
        batch_size=50,
        lr=0.5,
        clip=1.0,
        delta=1e-5,
        target_epsilon=1.5,
        seed=2,
    )

    assert 1.5 * (1 - 1e-3) <= out["epsilon"] <= 1.5
    assert out["epsilon"] == epsilon(
        noise_multiplier=out["noise_multiplier"], sample_rate=0.05, steps=40, delta=1e-5
    )


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_noise_on_the_gradient_is_noise_multiplier_times_clip_over_expected_batch():
    # All-zero features: every per-sample weight gradient is 0, so after one SGD step from
    # zero weights the weights are -lr * noise / (sample_rate * rows).
    rows, features, batch = 200, 4000, 50
    model = nn.Linear(features, 1)
    nn.init.zeros_(model.weight)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    private = make_private(
        model,
        optimizer,
        torch.zeros(rows, features),
        torch.zeros(rows),
        batch_size=batch,
        max_grad_norm=0.5,
        epochs=1,
        noise_multiplier=2.0,
        seed=3,
    )
    features_batch, targets = next(iter(private.data_loader))

    private.optimizer.zero_grad()
    logits = private.module(features_batch).reshape(-1)
    nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="sum").backward()
    private.optimizer.step()
    private.close()

    assert float(model.weight.detach().std()) == pytest.approx(2.0 * 0.5 / batch, rel=0.05)


def test_sample_rate_is_batch_over_rows_not_one_over_batches():
    # Opacus's make_private would use 1 / ceil(1000 / 64) = 1/16; the plan projects 64/1000.
    model = logistic()
    private = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        *separable(1000),
        batch_size=64,
        max_grad_norm=1.0,
        epochs=1,
        noise_multiplier=1.0,
        seed=0,
    )
    private.close()

    assert private.sample_rate == 0.064
    assert private.steps_per_epoch == 16
    assert len(private.data_loader) == 16


def test_poisson_sampler_picks_each_row_with_the_sample_rate():
    rows, rate, steps = 500, 0.04, 2000
    sampler = _PoissonSampler(rows, rate, steps, NoiseSource(bytes(32)))

    counts = torch.zeros(rows)
    sizes = []
    for batch in sampler:
        assert batch.unique().numel() == batch.numel()  # no row twice in a batch
        if batch.numel():
            assert int(batch.min()) >= 0 and int(batch.max()) < rows
        counts[batch] += 1
        sizes.append(batch.numel())

    # Each row: Binomial(2000, 0.04), mean 80, sd 8.8; batch sizes: mean 20, variance ~19.2.
    assert float(counts.mean()) == pytest.approx(80, rel=0.02)
    assert float(counts.std()) == pytest.approx(math.sqrt(steps * rate * (1 - rate)), rel=0.1)
    assert np.var(sizes) == pytest.approx(rows * rate * (1 - rate), rel=0.15)


def test_tiny_sample_rates_take_empty_batches_in_their_stride():
    X, y = separable(40)

    out = train_dp(
        logistic(),
        X,
        y,
        epochs=1,
        batch_size=1,
        lr=0.1,
        clip=1.0,
        delta=1e-3,
        noise_multiplier=1.0,
        seed=4,
    )

    assert out["steps"] == 40  # every step counted, empty batches included
    assert out["sample_rate"] == 1 / 40


def test_same_seed_reproduces_and_the_model_comes_back_clean():
    X, y = separable(300)
    first, second = logistic(), logistic()
    arguments = dict(
        epochs=1, batch_size=32, lr=0.3, clip=1.0, delta=1e-5, noise_multiplier=1.2, seed=7
    )

    train_dp(first, X, y, **arguments)
    train_dp(second, X, y, **arguments)

    for name, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[name])
    # No Opacus attribute or hook is left on the model: it saves and trains as before.
    assert list(first.state_dict()) == ["0.weight", "0.bias"]
    for p in first.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad")
    assert not any(m._forward_hooks or m._backward_hooks for m in first.modules())


def test_unsupported_models_and_bad_arguments_are_training_errors():
    X, y = separable(100)
    batchnorm = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    common = dict(epochs=1, batch_size=10, lr=0.1, clip=1.0, delta=1e-5, noise_multiplier=1.0)

    with pytest.raises(TrainingError, match="cannot be trained with DP-SGD"):
        train_dp(batchnorm, X, y, **common)
    with pytest.raises(TrainingError, match="noise_multiplier or target_epsilon"):
        train_dp(logistic(), X, y, **{**common, "noise_multiplier": None})
    with pytest.raises(TrainingError, match="optimizer 'rmsprop'"):
        train_dp(logistic(), X, y, **common, optimizer="rmsprop")
    with pytest.raises(TrainingError, match="binary labels"):
        train_dp(logistic(), X, y * 2, **common)
