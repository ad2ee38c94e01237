"""fedcore.evaluation: pooled metrics from per-site score histograms against the pooled rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, log_loss, roc_auc_score

from fedcore import evaluation
from fedcore.evaluation import (
    SCORE_BINS,
    EvaluationReportError,
    histogram_auc,
    histogram_from_wire,
    merge_histograms,
    pooled_metrics,
    score_bins,
    site_histogram,
)
from fedcore.metrics import binary_metrics, roc_auc


def _sites(
    seed: int, sizes: tuple[int, ...] = (40, 300, 90)
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-IID sites: each with its own base rate and score shift (cross-site pairs matter)."""
    rng = np.random.default_rng(seed)
    sites = []
    for i, n in enumerate(sizes):
        y = (rng.random(n) < 0.2 + 0.25 * i).astype(int)
        logit = 1.5 * (y - 0.5) + rng.normal(size=n) + 0.8 * i
        sites.append((y, 1.0 / (1.0 + np.exp(-logit))))
    return sites


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_pooled_auc_from_histograms_is_within_its_bound_of_sklearn_on_the_pooled_rows(
    seed: int,
) -> None:
    sites = _sites(seed)
    merged = merge_histograms(site_histogram(y, p) for y, p in sites)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])

    result = pooled_metrics(merged)

    exact = roc_auc_score(y_all, p_all)
    assert abs(result["auc"] - exact) <= result["auc_error_bound"] + 1e-15
    assert result["auc_error_bound"] < 2e-3  # 2,000 bins, 430 rows: a few pairs share a bin
    assert result["accuracy"] == accuracy_score(y_all, p_all >= 0.5)
    assert result["loss"] == pytest.approx(log_loss(y_all, p_all), rel=1e-12)
    assert (result["n"], result["positives"]) == (y_all.size, int(y_all.sum()))


def test_a_mean_of_site_aucs_is_not_the_pooled_auc_and_the_histogram_is() -> None:
    sites = _sites(7)
    y_all = np.concatenate([y for y, _ in sites])
    p_all = np.concatenate([p for _, p in sites])
    sizes = [y.size for y, _ in sites]
    weighted_mean = sum(roc_auc(y, p) * n for (y, p), n in zip(sites, sizes, strict=True)) / sum(
        sizes
    )

    pooled = pooled_metrics(merge_histograms(site_histogram(y, p) for y, p in sites))

    exact = roc_auc(y_all, p_all)
    assert abs(weighted_mean - exact) > 0.02  # the old "global AUC" is off by this much
    assert abs(pooled["auc"] - exact) <= pooled["auc_error_bound"]


def test_merging_site_histograms_equals_the_histogram_of_the_pooled_rows() -> None:
    sites = _sites(11)
    merged = merge_histograms(site_histogram(y, p) for y, p in sites)
    whole = site_histogram(
        np.concatenate([y for y, _ in sites]), np.concatenate([p for _, p in sites])
    )
    assert merged.positives == whole.positives
    assert merged.negatives == whole.negatives
    assert merged.loss_sum == pytest.approx(whole.loss_sum, rel=1e-12)


def test_the_bound_is_attained_when_every_pair_shares_one_bin() -> None:
    # All positives just above all negatives inside one bin: exact AUC 1, histogram AUC 1/2.
    y = np.array([0, 0, 1, 1])
    p = np.array([0.70001, 0.70002, 0.70008, 0.70009])

    auc, bound = histogram_auc(site_histogram(y, p))

    assert (auc, bound) == (0.5, 0.5)
    assert roc_auc(y, p) - auc == pytest.approx(bound)


def test_scores_rounded_to_the_grid_give_the_exact_auc_with_ties_as_halves() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=500)
    # probabilities at the middle of random bins of the logit grid: ties only inside bins
    middle = (rng.integers(0, SCORE_BINS, size=500) + 0.5) / SCORE_BINS * 40.0 - 20.0
    p = 1.0 / (1.0 + np.exp(-middle))

    auc, _ = histogram_auc(site_histogram(y, p))

    assert auc == pytest.approx(roc_auc(y, p), abs=1e-12)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_a_confident_model_near_0_and_1_is_still_resolved() -> None:
    # Half the rows below 0.001: one bin of an equal grid over [0, 1], hundreds here.
    rng = np.random.default_rng(9)
    y = rng.integers(0, 2, size=2000)
    p = 1.0 / (1.0 + np.exp(-(rng.normal(size=2000) * 2.0 + 9.0 * (y - 0.9))))
    assert np.mean(p < 0.001) > 0.3

    result = pooled_metrics(site_histogram(y, p))

    assert result["auc_error_bound"] < 5e-4
    assert abs(result["auc"] - roc_auc_score(y, p)) <= result["auc_error_bound"]


def test_the_threshold_is_exact_at_one_half_and_its_float_neighbours() -> None:
    below = np.nextafter(0.5, 0.0)
    p = np.array([0.0, below, 0.5, np.nextafter(0.5, 1.0), 1.0])

    index = score_bins(p)

    assert list(index) == [0, SCORE_BINS // 2 - 1, SCORE_BINS // 2, SCORE_BINS // 2, SCORE_BINS - 1]
    y = np.array([0, 1, 1, 0, 1])
    assert pooled_metrics(site_histogram(y, p))["accuracy"] == binary_metrics(y, p)["accuracy"]


def test_one_class_leaves_the_auc_undefined_but_accuracy_exact() -> None:
    result = pooled_metrics(site_histogram(np.ones(5), np.full(5, 0.9)))
    assert result["auc"] is None and result["auc_error_bound"] is None
    assert result["accuracy"] == 1.0


def test_a_histogram_round_trips_through_its_wire_form() -> None:
    h = site_histogram(*_sites(3)[1])
    assert histogram_from_wire(h.to_wire()) == h


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda w: w.update(bins=100), "pools histograms of 2000 bins on logit[-20,20]"),
        (lambda w: w.update(grid="uniform"), "is binned on 'uniform' with 2000 bins"),
        (lambda w: w.update(extra=1), "unknown key(s) ['extra']"),
        (lambda w: w.pop("loss_sum"), "missing ['loss_sum']"),
        (lambda w: w["positives"].pop(), "positives must be a list of 2000 counts, got 1999"),
        (lambda w: w["negatives"].__setitem__(3, -1), "negatives[3] must be a whole number"),
        (lambda w: w["negatives"].__setitem__(3, 1.5), "negatives[3] must be a whole number"),
        (lambda w: w["positives"].__setitem__(0, True), "positives[0] must be a whole number"),
        (lambda w: w.update(loss_sum=-1.0), "loss_sum must be a finite number"),
        (lambda w: w.update(loss_sum=1e9), "loss_sum must be a finite number"),
        (
            lambda w: w.update(positives=[0] * SCORE_BINS, negatives=[0] * SCORE_BINS),
            "counts no held-out row",
        ),
    ],
)
def test_a_bad_histogram_is_refused_naming_the_field(change, message: str) -> None:
    wire = site_histogram(np.array([0, 1, 1]), np.array([0.2, 0.6, 0.9])).to_wire()
    change(wire)
    with pytest.raises(EvaluationReportError) as caught:
        histogram_from_wire(wire, where="evaluation of silo 'a'")
    assert message in str(caught.value)
    assert str(caught.value).startswith("evaluation of silo 'a'")


def test_histograms_on_different_grids_do_not_merge() -> None:
    y, p = np.array([0, 1]), np.array([0.1, 0.9])
    with pytest.raises(ValueError, match="histogram 1 has 10 bins, the first has 2000"):
        merge_histograms([site_histogram(y, p), site_histogram(y, p, bins=10)])


def test_probabilities_outside_the_unit_interval_are_refused() -> None:
    with pytest.raises(ValueError, match=r"found 1\.5 at index 1"):
        score_bins([0.2, 1.5])
    with pytest.raises(ValueError, match="must lie in"):
        evaluation.score_bins([float("nan")])
