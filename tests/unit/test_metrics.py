"""Tests for fedcore.metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from fedcore.metrics import binary_metrics, roc_auc


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_equals_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=300)
    # Few distinct, label-correlated scores: many ties within and across classes.
    scores = np.round(rng.normal(size=300) + 0.7 * y, 1)

    assert len(np.unique(scores)) < 100
    assert roc_auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_roc_auc_hand_computed():
    # Pairs (pos, neg): (0.8 > 0.4), (0.8 > 0.1), (0.4 = 0.4 counts half), (0.4 > 0.1) -> 3.5 / 4.
    assert roc_auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == 0.875
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([1, 0, 1, 0], [0.5, 0.5, 0.5, 0.5]) == 0.5


def test_roc_auc_is_nan_with_one_class():
    assert math.isnan(roc_auc([1, 1, 1], [0.1, 0.5, 0.9]))
    assert math.isnan(roc_auc([], []))


def test_binary_metrics_match_sklearn():
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, size=500)
    probs = np.clip(rng.beta(2, 2, size=500) * 0.6 + 0.4 * y, 0.0, 1.0)

    metrics = binary_metrics(y, probs)

    assert metrics["n"] == 500
    assert metrics["auc"] == pytest.approx(roc_auc_score(y, probs), abs=1e-12)
    assert metrics["accuracy"] == pytest.approx(accuracy_score(y, probs >= 0.5))
    assert metrics["loss"] == pytest.approx(log_loss(y, probs), rel=1e-9)


def test_binary_metrics_hand_computed():
    metrics = binary_metrics([1, 0, 1, 0], [0.9, 0.2, 0.4, 0.5])

    # Threshold 0.5 (inclusive): predictions 1, 0, 0, 1 -> 2 of 4 right.
    assert metrics["accuracy"] == 0.5
    expected_loss = -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.5)) / 4
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-12)
    assert metrics["auc"] == 0.75
    assert metrics["n"] == 4


def test_binary_metrics_confident_mistake_costs_finite_loss():
    metrics = binary_metrics([1, 0], [0.0, 1.0])

    assert math.isfinite(metrics["loss"])
    assert metrics["loss"] > 30


def test_undefined_metrics_are_none_so_json_stays_valid():
    one_class = binary_metrics([0, 0], [0.2, 0.7])
    empty = binary_metrics([], [])

    assert one_class["auc"] is None
    assert one_class["accuracy"] == 0.5
    assert empty == {"auc": None, "accuracy": None, "loss": None, "n": 0}


@pytest.mark.parametrize(
    ("y", "p", "message"),
    [
        ([1, 0], [0.5], "y_true has 2 values but probs has 1"),
        ([1, 2], [0.5, 0.5], "binary labels 0/1; found 2.0 at index 1"),
        ([1, 0], [0.5, 1.5], "probs must lie in \\[0, 1\\]; found 1.5 at index 1"),
        ([1, 0], [0.5, float("nan")], "probs must be finite; found nan at index 1"),
    ],
)
def test_binary_metrics_refuse_bad_input(y, p, message):
    with pytest.raises(ValueError, match=message):
        binary_metrics(y, p)
