"""Pooled multi-class and regression metrics from per-site parts equal scikit-learn on the pooled
held-out rows; group fairness from per-site parts equals fairlearn's MetricFrame."""

from __future__ import annotations

import numpy as np
import pytest
from fairlearn.metrics import MetricFrame, mean_prediction
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    recall_score,
    roc_auc_score,
)

from fedcore import evaluation, task_fairness, task_metrics

K = 4
SITES = (37, 120, 5, 260)  # rows per site: uneven on purpose (a mean of site metrics is wrong)


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def multiclass_sites(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate(SITES):
        y = rng.integers(0, K, n)
        logits = rng.normal(size=(n, K)) + 1.5 * np.eye(K)[y] * (i % 3)  # sites differ
        groups = rng.choice(["F", "M", "X"], n, p=[0.5, 0.4, 0.1])
        sites.append((y, softmax(logits), groups))
    return sites


def pooled(sites: list[tuple[np.ndarray, ...]]) -> tuple[np.ndarray, ...]:
    return tuple(np.concatenate(parts) for parts in zip(*sites, strict=True))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_multiclass_metrics_equal_sklearn_on_the_pooled_rows(seed: int) -> None:
    sites = multiclass_sites(seed)
    y, probs, _ = pooled(sites)

    merged = task_metrics.merge_multiclass(
        task_metrics.multiclass_part(y_i, p_i) for y_i, p_i, _ in sites
    )
    report = task_metrics.multiclass_report(merged)

    predicted = probs.argmax(axis=1)
    assert report["n"] == y.size
    assert report["confusion"] == confusion_matrix(y, predicted, labels=range(K)).tolist()
    assert report["accuracy"] == pytest.approx(accuracy_score(y, predicted), abs=1e-12)
    assert report["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-12)
    assert report["weighted_f1"] == pytest.approx(
        f1_score(y, predicted, average="weighted"), abs=1e-12
    )
    assert report["loss"] == pytest.approx(log_loss(y, probs, labels=range(K)), abs=1e-9)
    per_class_f1 = f1_score(y, predicted, average=None, labels=range(K))
    assert [c["f1"] for c in report["per_class"]] == pytest.approx(per_class_f1, abs=1e-12)


def test_macro_f1_counts_only_classes_seen_as_truth_or_prediction_like_sklearn() -> None:
    y = np.array([0, 0, 1, 1, 1])
    probs = np.eye(K)[[0, 1, 1, 1, 0]] * 0.7 + 0.3 / K  # class 2 and 3 never occur

    report = task_metrics.multiclass_report(task_metrics.multiclass_part(y, probs))

    predicted = probs.argmax(axis=1)
    assert report["macro_f1"] == pytest.approx(f1_score(y, predicted, average="macro"), abs=1e-12)
    assert report["per_class"][2]["auc"] is None  # no row of class 2: its AUC is undefined


def test_a_mean_of_site_accuracies_is_not_the_pooled_accuracy() -> None:
    sites = multiclass_sites(0)
    y, probs, _ = pooled(sites)

    mean_of_sites = np.mean(
        [task_metrics.multiclass_metrics(y_i, p_i)["accuracy"] for y_i, p_i, _ in sites]
    )

    assert abs(mean_of_sites - accuracy_score(y, probs.argmax(axis=1))) > 0.01


def test_one_vs_rest_auc_is_exact_when_each_bin_holds_one_score() -> None:
    rng = np.random.default_rng(4)
    bins = 50
    sites = []
    for n in SITES:
        y = rng.integers(0, K, n)
        # scores at bin centres of the logit grid: every bin holds one score value, so no tie
        # is invented
        index = rng.integers(0, bins, (n, K))
        index[np.arange(n), y] = np.minimum(index[np.arange(n), y] + 10, bins - 1)
        logit = (index + 0.5) / bins * 2 * evaluation.LOGIT_RANGE - evaluation.LOGIT_RANGE
        sites.append((y, 1.0 / (1.0 + np.exp(-logit))))
    y = np.concatenate([s[0] for s in sites])
    scores = np.concatenate([s[1] for s in sites])

    parts = [
        {"classes": K, "bins": bins, "histograms": task_metrics.class_histograms(y_i, s_i, bins)}
        for y_i, s_i in sites
    ]
    for c in range(K):
        positives = [sum(p["histograms"][c]["positives"][b] for p in parts) for b in range(bins)]
        negatives = [sum(p["histograms"][c]["negatives"][b] for p in parts) for b in range(bins)]
        auc, _ = task_metrics.histogram_auc(positives, negatives)

        assert auc == pytest.approx(roc_auc_score(y == c, scores[:, c]), abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_vs_rest_auc_is_within_its_stated_bound_and_matches_sklearn_macro(seed: int) -> None:
    sites = multiclass_sites(seed)
    y, probs, _ = pooled(sites)

    report = task_metrics.multiclass_report(
        task_metrics.merge_multiclass(
            task_metrics.multiclass_part(y_i, p_i) for y_i, p_i, _ in sites
        )
    )

    for c in range(K):
        exact = roc_auc_score(y == c, probs[:, c])
        entry = report["per_class"][c]
        assert abs(entry["auc"] - exact) <= entry["auc_error_bound"] + 1e-15
    macro = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert abs(report["auc_ovr"] - macro) <= report["auc_error_bound"] + 1e-15
    assert report["auc_error_bound"] < 0.01  # 1,000 bins: the bound is small here


def test_a_multiclass_part_with_a_histogram_that_miscounts_is_refused() -> None:
    y, probs, _ = multiclass_sites(0)[0]
    part = task_metrics.multiclass_part(y, probs)
    task_metrics.check_multiclass_part(part, classes=K)

    part["histograms"][1]["positives"][0] += 1

    with pytest.raises(task_metrics.TaskPartError, match=r"histograms\[1\] does not count"):
        task_metrics.check_multiclass_part(part, classes=K)
    with pytest.raises(task_metrics.TaskPartError, match="the plan has 5 classes"):
        task_metrics.check_multiclass_part(part, classes=5)


def regression_sites(seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate(SITES):
        y = rng.normal(150 + 20 * i, 70, n)  # a disease-progression scale, non-IID by site
        pred = y + rng.normal(5 * i - 5, 40, n)
        groups = rng.choice(["<40", "40-60", ">60"], n)
        sites.append((y, pred, groups))
    return sites


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pooled_regression_metrics_equal_sklearn_on_the_pooled_rows(seed: int) -> None:
    sites = regression_sites(seed)
    y, pred, _ = pooled(sites)

    report = task_metrics.regression_report(
        task_metrics.merge_regression(task_metrics.regression_part(t, p) for t, p, _ in sites)
    )

    assert report["n"] == y.size
    assert report["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, pred)), abs=1e-9)
    assert report["mae"] == pytest.approx(mean_absolute_error(y, pred), abs=1e-9)
    assert report["r2"] == pytest.approx(r2_score(y, pred), abs=1e-9)
    assert report["mean_error"] == pytest.approx(np.mean(pred - y), abs=1e-9)


def test_r2_of_a_constant_target_follows_sklearn() -> None:
    y = np.full(6, 3.0)

    exact = task_metrics.regression_metrics(y, y)
    off = task_metrics.regression_metrics(y, y + 1)

    assert exact["r2"] == r2_score(y, y) == 1.0
    assert off["r2"] == r2_score(y, y + 1) == 0.0


def test_a_regression_part_with_a_negative_sum_of_squares_is_refused() -> None:
    part = task_metrics.regression_part([1.0, 2.0], [1.5, 2.5])
    task_metrics.check_regression_part(part)

    with pytest.raises(task_metrics.TaskPartError, match="sum_sq_error must be >= 0"):
        task_metrics.check_regression_part({**part, "sum_sq_error": -1.0})


# --- fairness -------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_multiclass_group_fairness_equals_fairlearn_on_the_pooled_rows(seed: int) -> None:
    sites = multiclass_sites(seed)
    y, probs, groups = pooled(sites)
    predicted = probs.argmax(axis=1)
    names = ["none", "mild", "moderate", "severe"]

    merged = task_fairness.merge_multiclass_groups(
        task_fairness.multiclass_group_part(t, p.argmax(axis=1), g, classes=K) for t, p, g in sites
    )
    report = task_fairness.multiclass_group_report(merged, names)

    largest = 0.0
    for c, name in enumerate(names):
        frame = MetricFrame(
            metrics={
                "selection_rate": lambda t, p, c=c: np.mean(p == c),
                "recall": lambda t, p, c=c: recall_score(t == c, p == c, zero_division=0),
            },
            y_true=y,
            y_pred=predicted,
            sensitive_features=groups,
        )
        for group, row in frame.by_group.iterrows():
            assert report["by_group"][group]["selection_rate"][name] == pytest.approx(
                row["selection_rate"], abs=1e-12
            )
            assert report["by_group"][group]["recall"][name] == pytest.approx(
                row["recall"], abs=1e-12
            )
        difference = frame.difference(method="between_groups")
        for metric in ("selection_rate", "recall"):
            assert report["difference"][metric][name] == pytest.approx(
                difference[metric], abs=1e-12
            )
            largest = max(largest, difference[metric])
    assert report["largest_disparity"]["difference"] == pytest.approx(largest, abs=1e-12)


def test_a_group_without_rows_of_a_class_has_recall_zero_and_is_listed() -> None:
    part = task_fairness.multiclass_group_part([0, 1, 2], [0, 1, 1], ["a", "a", "b"], classes=3)

    report = task_fairness.multiclass_group_report(part)

    assert report["by_group"]["b"]["recall"]["0"] == 0.0
    assert {"group": "b", "class": "0", "metric": "recall"} in report["undefined"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_group_fairness_equals_fairlearn_on_the_pooled_rows(seed: int) -> None:
    sites = regression_sites(seed)
    y, pred, groups = pooled(sites)

    merged = task_fairness.merge_regression_groups(
        task_fairness.regression_group_part(t, p, g) for t, p, g in sites
    )
    report = task_fairness.regression_group_report(merged)

    frame = MetricFrame(
        metrics={
            "mean_error": lambda t, p: np.mean(p - t),
            "mean_absolute_error": mean_absolute_error,
            "mean_prediction": mean_prediction,
        },
        y_true=y,
        y_pred=pred,
        sensitive_features=groups,
    )
    for group, row in frame.by_group.iterrows():
        for metric in task_fairness.REGRESSION_METRICS:
            assert report["by_group"][group][metric] == pytest.approx(row[metric], abs=1e-9)
    difference = frame.difference(method="between_groups")
    for metric in task_fairness.REGRESSION_METRICS:
        assert report["difference"][metric] == pytest.approx(difference[metric], abs=1e-9)
    assert report["largest_disparity"]["difference"] == pytest.approx(difference.max(), abs=1e-9)
    assert report["largest_disparity"]["metric"] == difference.idxmax()
