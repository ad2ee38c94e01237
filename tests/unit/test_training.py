"""Tests for fedcore.training: local training, prediction and evaluation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedcore.models import build_model
from fedcore.training import TrainingError, evaluate, predict_proba, train_local


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def separable_problem(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two Gaussian blobs separated by a margin along a random direction."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5)).astype(np.float32)
    direction = rng.normal(size=5)
    margin = X @ direction
    keep = np.abs(margin) > 0.3
    return X[keep], (margin[keep] > 0).astype(np.float32)


def test_logistic_regression_learns_a_separable_problem_deterministically():
    X, y = separable_problem()
    states, results = [], []
    for _ in range(2):
        model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=3)
        results.append(train_local(model, X, y, epochs=5, batch_size=32, lr=0.1, seed=11))
        states.append(model.state_dict())

    metrics = evaluate(model, X, y)

    assert metrics["accuracy"] > 0.95
    assert metrics["auc"] > 0.99
    assert results[0] == results[1]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_mlp_with_dropout_is_deterministic_and_leaves_global_rng_alone():
    X, y = separable_problem(seed=1)
    spec = {"kind": "mlp", "hidden": [16, 8], "dropout": 0.3}
    before = torch.get_rng_state()
    states = []
    for _ in range(2):
        model = build_model(spec, X.shape[1], seed=0)
        train_local(model, X, y, epochs=3, batch_size=16, lr=0.01, seed=5)
        states.append(model.state_dict())

    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_the_seed_changes_batch_order():
    X, y = separable_problem()
    states = []
    for seed in (0, 1):
        model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=3)
        train_local(model, X, y, epochs=1, batch_size=8, lr=0.1, optimizer="sgd", seed=seed)
        states.append(model.state_dict()["linear.weight"])

    assert not torch.equal(states[0], states[1])


def test_progress_callback_and_step_count():
    X, y = separable_problem(n=100)
    calls: list[tuple[int, int]] = []
    model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)
    per_epoch = -(-len(X) // 32)

    result = train_local(
        model,
        X,
        y,
        epochs=3,
        batch_size=32,
        lr=0.1,
        optimizer="sgd",
        momentum=0.9,
        weight_decay=1e-4,
        on_batch=lambda step, total: calls.append((step, total)),
    )

    assert result["steps"] == 3 * per_epoch
    assert result["epochs"] == 3
    assert calls == [(step, 3 * per_epoch) for step in range(1, 3 * per_epoch + 1)]
    assert result["train_loss"] > 0


def test_train_loss_is_the_mean_over_the_last_epoch():
    X, y = separable_problem(n=50)
    model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)
    # lr tiny: the weights barely move, so the last epoch's mean loss is the initial loss.
    initial = torch.nn.functional.binary_cross_entropy_with_logits(
        model(torch.from_numpy(X)).reshape(-1), torch.from_numpy(y)
    ).item()

    result = train_local(model, X, y, epochs=1, batch_size=7, lr=1e-9, optimizer="sgd")

    assert result["train_loss"] == pytest.approx(initial, rel=1e-5)


def test_model_mode_is_restored():
    X, y = separable_problem(n=50)
    model = build_model({"kind": "mlp", "hidden": [4], "dropout": 0.5}, X.shape[1], seed=0)
    model.eval()

    train_local(model, X, y, epochs=1, batch_size=16, lr=0.01)
    predict_proba(model, X)

    assert not model.training


def test_predict_proba_shape_and_range():
    X, _ = separable_problem(n=60)
    model = build_model({"kind": "mlp", "hidden": [4]}, X.shape[1], seed=0)

    probs = predict_proba(model, X)

    assert probs.shape == (len(X),)
    assert probs.dtype == np.float64
    assert ((probs >= 0) & (probs <= 1)).all()
    assert predict_proba(model, X[:0]).shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"batch_size": 0}, "batch_size must be an integer >= 1"),
        ({"lr": 0.0}, "lr must be a finite number > 0"),
        ({"optimizer": "rmsprop"}, "optimizer 'rmsprop' is not supported"),
        ({"momentum": 0.9}, "momentum applies to optimizer 'sgd' only"),
        ({"weight_decay": -1.0}, "weight_decay must be a finite number >= 0"),
    ],
)
def test_bad_arguments_are_refused(kwargs, message):
    X, y = separable_problem(n=20)
    model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)
    arguments = {"epochs": 1, "batch_size": 4, "lr": 0.1, **kwargs}

    with pytest.raises(TrainingError, match=message):
        train_local(model, X, y, **arguments)


def test_non_binary_labels_and_shape_mismatch_are_refused():
    X, y = separable_problem(n=20)
    model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)

    with pytest.raises(TrainingError, match="binary labels 0/1"):
        train_local(model, X, y * 2, epochs=1, batch_size=4, lr=0.1)
    with pytest.raises(TrainingError, match=f"X has {len(X)} rows but y has 3 labels"):
        train_local(model, X, y[:3], epochs=1, batch_size=4, lr=0.1)


def test_divergence_is_reported_not_returned():
    X, y = separable_problem(n=20)
    X[3, 0] = np.nan
    model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)

    with pytest.raises(TrainingError, match="training diverged: loss is nan at epoch 1"):
        train_local(model, X, y, epochs=1, batch_size=64, lr=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("adam", {"lr": 0.01}),
        ("adam", {"lr": 0.05, "weight_decay": 0.01}),
        ("sgd", {"lr": 0.1}),
        ("sgd", {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.001}),
    ],
)
def test_own_optimizers_match_torch_optim_step_by_step(name, kwargs):
    from fedcore.training import _SGD, _Adam

    torch.manual_seed(0)
    reference = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    ours = copy.deepcopy(reference)
    torch_cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
    own_cls = _Adam if name == "adam" else _SGD
    torch_opt = torch_cls(reference.parameters(), **kwargs)
    own_opt = own_cls(list(ours.parameters()), **kwargs)
    data = torch.Generator().manual_seed(1)
    for _ in range(25):
        x = torch.randn(8, 5, generator=data)
        for model, opt in ((reference, torch_opt), (ours, own_opt)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
    for a, b in zip(reference.parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_fedprox_term_adds_mu_times_the_distance_to_the_reference_to_the_gradient():
    X, y = separable_problem(n=50)
    start = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)
    reference = {name: p.detach() + 0.5 for name, p in start.named_parameters()}
    plain, prox = copy.deepcopy(start), copy.deepcopy(start)
    one_step = {"epochs": 1, "batch_size": len(X), "lr": 0.1, "optimizer": "sgd"}

    train_local(plain, X, y, **one_step)
    result = train_local(prox, X, y, **one_step, prox_mu=2.0, prox_reference=reference)

    # SGD on BCE + mu/2 ||w - ref||²: w1 = w0 - lr (grad_BCE + mu (w0 - ref)), and w0 - ref = -0.5
    for name, p in prox.named_parameters():
        expected = dict(plain.named_parameters())[name] - 0.1 * 2.0 * (-0.5)
        torch.testing.assert_close(p, expected)
    assert result["train_loss"] == train_local(copy.deepcopy(start), X, y, **one_step)["train_loss"]


def test_fedprox_keeps_the_model_near_the_starting_weights_by_default():
    X, y = separable_problem()
    start = build_model({"kind": "mlp", "hidden": [8]}, X.shape[1], seed=0)
    initial = copy.deepcopy(start.state_dict())

    def drift(mu: float) -> float:
        model = copy.deepcopy(start)
        train_local(model, X, y, epochs=5, batch_size=16, lr=0.05, seed=1, prox_mu=mu)
        state = model.state_dict()
        return sum(float((state[k] - initial[k]).square().sum()) for k in state) ** 0.5

    free, anchored, off = drift(0.0), drift(5.0), drift(0.0)

    assert anchored < 0.5 * free
    assert off == free  # prox_mu = 0 is the plain training


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prox_mu": -0.1}, "prox_mu must be a finite number >= 0"),
        ({"prox_mu": 0.1, "prox_reference": {}}, "prox_reference has no tensor for parameter"),
        (
            {"prox_mu": 0.1, "prox_reference": {"linear.weight": torch.zeros(3)}},
            r"prox_reference\['linear.weight'\] has shape \(3,\)",
        ),
    ],
)
def test_bad_fedprox_arguments_are_refused(kwargs, message):
    X, y = separable_problem(n=20)
    model = build_model({"kind": "logistic_regression"}, X.shape[1], seed=0)

    with pytest.raises(TrainingError, match=message):
        train_local(model, X, y, epochs=1, batch_size=4, lr=0.1, **kwargs)
