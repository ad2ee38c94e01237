"""A secure round's task part: the sites' parts as fixed-point tail cells, summed as the masked
ring sums them, give the merged part of the clear path (fedcore.secure_updates)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from fedcore import secure_updates, task_metrics


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def summed(tails: list[list[int]]) -> list[int]:
    """What the unmasked ring sum holds: each cell added over the sites, mod 2^32."""
    return [int(v) % (1 << 32) for v in np.sum(np.asarray(tails, dtype=np.int64), axis=0)]


@pytest.mark.parametrize("seed", [0, 1])
def test_a_multiclass_tail_sums_to_the_merged_part(seed: int) -> None:
    rng = np.random.default_rng(seed)
    bins = task_metrics.round_bins(4)
    layout = secure_updates.task_layout("multiclass", 4, bins)
    parts, ys, ps = [], [], []
    for n in (50, 7, 120):
        y = rng.integers(0, 4, size=n)
        p = softmax(rng.normal(size=(n, 4)) + 2 * np.eye(4)[y])
        parts.append(task_metrics.multiclass_part(y, p, bins=bins))
        ys.append(y)
        ps.append(p)
    tails = [secure_updates.task_part_to_tail(p, "multiclass", layout) for p in parts]
    assert all(0 <= v < 1 << 16 for tail in tails for v in tail)
    merged = secure_updates.task_part_from_tail(summed(tails), "multiclass", layout)
    clear = task_metrics.merge_multiclass(parts)
    assert merged["confusion"] == clear["confusion"]
    assert merged["histograms"] == clear["histograms"] and merged["bins"] == bins == 200
    assert merged["loss_sum"] == pytest.approx(clear["loss_sum"], abs=3 * 2.0**-32)
    report = task_metrics.multiclass_report(
        task_metrics.check_multiclass_part(merged, classes=4, bins=bins)
    )
    y, p = np.concatenate(ys), np.concatenate(ps)
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(y, p.argmax(axis=1)), abs=1e-12)
    assert report["loss"] == pytest.approx(skm.log_loss(y, p, labels=range(4)), abs=1e-9)
    exact = skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
    assert abs(report["auc_ovr"] - exact) <= report["auc_error_bound"] + 1e-12


@pytest.mark.parametrize("center", [0.0, 152.1])
def test_a_regression_tail_sums_to_the_merged_part(center: float) -> None:
    rng = np.random.default_rng(3)
    layout = secure_updates.task_layout("regression")
    parts, ys, preds = [], [], []
    for n, shift in ((80, -30.0), (1, 0.0), (140, 45.0)):
        y = 150 + shift + 60 * rng.normal(size=n)
        pred = y + 40 * rng.normal(size=n) - 5
        parts.append(task_metrics.regression_part(y, pred))
        ys.append(y)
        preds.append(pred)
    tails = [
        secure_updates.task_part_to_tail(p, "regression", layout, center=center) for p in parts
    ]
    merged = secure_updates.task_part_from_tail(summed(tails), "regression", layout, center=center)
    report = task_metrics.regression_report(task_metrics.check_regression_part(merged))
    y, pred = np.concatenate(ys), np.concatenate(preds)
    assert merged["count"] == y.size
    assert report["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, pred)), abs=1e-9)
    assert report["mae"] == pytest.approx(skm.mean_absolute_error(y, pred), abs=1e-9)
    assert report["r2"] == pytest.approx(skm.r2_score(y, pred), abs=1e-9)
    assert report["mean_error"] == pytest.approx(float(np.mean(pred - y)), abs=1e-9)


def test_a_sum_too_large_or_not_finite_is_refused_and_a_binary_plan_has_no_cells() -> None:
    layout = secure_updates.task_layout("regression")
    part = task_metrics.regression_part([1.0, 2.0], [1.5, 2.5])
    with pytest.raises(ValueError, match="sum_sq_error"):
        secure_updates.task_part_to_tail(
            {**part, "sum_sq_error": float("inf")}, "regression", layout
        )
    with pytest.raises(ValueError, match="does not match the round's layout"):
        secure_updates.task_part_to_tail(part, "regression", layout[:-1])
    assert secure_updates.task_layout("binary") == ()
