"""The server's side of the ``constraint`` mitigation (federated reductions): each round's
multiplier update from the contributors' group counts equals fedcore's maths step by step
(whose equality with fairlearn's ExponentiatedGradient tests/unit/test_fairness_mitigation.py
checks), and what cannot be computed raises MitigationError with the reason."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore import fairness_mitigation as fm
from fedcore.fairness import group_counts, merge_counts
from federation.fairness_outcome import constraint_status
from federation.services.mitigation import reduction_round


def site_rows(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.choice(["f", "m"], size=n, p=[0.45, 0.55])
    y = (rng.random(n) < np.where(a == "m", 0.6, 0.3)).astype(int)
    return y, a


def start(constraint: str, counts: dict) -> dict:
    return {
        "kind": "constraint",
        "attribute": "sex",
        "counts": counts,
        "constraint": constraint,
        "bound": 0.02,
        "eta": 2.0,
        "theta": {},
        "lambdas": {},
        "rounds": 0,
        "max_violation": None,
        "met": None,
        "example_weights": fm.reduction_weights({}, counts, constraint).to_json(),
    }


@pytest.mark.parametrize("constraint", fm.CONSTRAINTS)
def test_three_rounds_of_multiplier_updates_equal_fedcores_loop(constraint: str) -> None:
    sites = [site_rows(s) for s in range(3)]
    counts = fm.merge_label_counts([fm.label_counts(y, a) for y, a in sites])
    state = start(constraint, counts)
    theta: dict = {}
    rng = np.random.default_rng(7)
    for _ in range(3):
        # each contributor's counts of the model it received: predictions that favour 'm'
        sent = []
        for y, a in sites:
            pred = (rng.random(y.size) < np.where(a == "m", 0.7, 0.35)).astype(int)
            sent.append({"sex": group_counts(y, pred, a)})
        state = reduction_round(state, "sex", sent)

        confusion = merge_counts([s["sex"] for s in sent])
        gamma = fm.reduction_gamma(confusion, constraint)
        gains = fm.reduction_gains(counts, constraint)
        theta = {**theta, **fm.reduction_step(theta, gamma, bound=0.02, eta=2.0, gains=gains)}
        lambdas = fm.multipliers(theta, 0.02)
        expected = fm.reduction_weights(lambdas, counts, constraint).to_json()
        assert state["example_weights"] == expected
        assert state["theta"] == {"|".join(k): v for k, v in sorted(theta.items())}
        assert state["max_violation"] == pytest.approx(max(gamma.values()))
    assert state["rounds"] == 3
    assert state["met"] is False  # a 0.35 gap is far above the bound
    # the group favoured by the model is weighed down on its positives (DP: its positives'
    # signed weight shrinks), the other group's negatives get relabelled or lighter
    weights = fm.ExampleWeights.from_json(state["example_weights"])
    assert weights.cells["m"][1][1] < weights.cells["f"][1][1]
    assert "NOT met" in constraint_status(state) and "> bound 0.02" in constraint_status(state)


@pytest.mark.parametrize("schedule", ["averaged", "decaying"])
def test_averaged_multipliers_train_with_the_mean_and_decaying_steps_shrink(
    schedule: str,
) -> None:
    """``averaged``: theta steps as fairlearn's, the weights are those of the mean of every
    round's multipliers; ``decaying``: theta steps with eta / sqrt(t), the last multipliers."""
    sites = [site_rows(s) for s in range(3)]
    counts = fm.merge_label_counts([fm.label_counts(y, a) for y, a in sites])
    state = {**start("demographic_parity", counts), "multipliers": schedule}
    theta: dict = {}
    history: list[dict] = []
    rng = np.random.default_rng(3)
    gains = fm.reduction_gains(counts, "demographic_parity")
    for t in range(1, 5):
        sent = []
        for y, a in sites:
            pred = (rng.random(y.size) < np.where(a == "m", 0.7, 0.35)).astype(int)
            sent.append({"sex": group_counts(y, pred, a)})
        state = reduction_round(state, "sex", sent)
        gamma = fm.reduction_gamma(merge_counts([s["sex"] for s in sent]), "demographic_parity")
        eta = 2.0 / np.sqrt(t) if schedule == "decaying" else 2.0
        theta = {**theta, **fm.reduction_step(theta, gamma, bound=0.02, eta=eta, gains=gains)}
        lambdas = fm.multipliers(theta, 0.02)
        history.append(lambdas)
        if schedule == "averaged":
            keys = set().union(*history)
            used = {k: sum(h.get(k, 0.0) for h in history) / t for k in keys}
        else:
            used = lambdas
        assert state["theta"] == pytest.approx({"|".join(k): v for k, v in theta.items()})
        got = fm.ExampleWeights.from_json(state["example_weights"]).cells
        expected = fm.reduction_weights(used, counts, "demographic_parity").cells
        assert set(got) == set(expected)
        for group, cells in expected.items():
            for label, (target, weight) in cells.items():
                assert got[group][label][0] == target
                assert got[group][label][1] == pytest.approx(weight, rel=1e-12)
    assert history[-1] != history[0]  # the multipliers moved, so the schedules differ


def test_a_contributor_without_counts_or_a_single_group_is_refused_with_the_reason() -> None:
    y, a = site_rows(0)
    counts = fm.label_counts(y, a)
    state = start("demographic_parity", counts)
    good = {"sex": group_counts(y, y, a)}
    with pytest.raises(fm.MitigationError, match="an update came without them"):
        reduction_round(state, "sex", [good, None])
    only_f = {"sex": group_counts(y[a == "f"], y[a == "f"], a[a == "f"], groups=["f", "m"])}
    with pytest.raises(fm.MitigationError, match="at least two groups"):
        reduction_round(state, "sex", [only_f])


def test_a_group_without_training_rows_cannot_be_weighed() -> None:
    y, a = site_rows(0)
    counts = {**fm.label_counts(y, a), "x": {"negatives": 0, "positives": 0}}
    with pytest.raises(fm.MitigationError, match="'x'"):
        fm.reduction_weights({}, counts, "demographic_parity")


def test_the_step_gains_scale_each_group_by_its_size() -> None:
    counts = {
        "big": {"negatives": 300, "positives": 300},
        "small": {"negatives": 50, "positives": 10},
    }
    dp = fm.reduction_gains(counts, "demographic_parity")
    assert dp[("+", "all", "big")] == 1.0 and dp[("-", "all", "small")] == pytest.approx(0.1)
    eo = fm.reduction_gains(counts, "equalized_odds")
    assert eo[("+", "label=0", "small")] == pytest.approx(50 / 300)
    assert eo[("+", "label=1", "small")] == pytest.approx(10 / 300)
    # without gains the step is fairlearn's
    gamma = {("+", "all", "small"): 0.5}
    plain = fm.reduction_step({}, gamma, bound=0.01, eta=2.0)
    scaled = fm.reduction_step({}, gamma, bound=0.01, eta=2.0, gains=dp)
    assert plain[("+", "all", "small")] == pytest.approx(0.02 * 0.49)
    assert scaled[("+", "all", "small")] == pytest.approx(0.1 * 0.02 * 0.49)
