"""Bias mitigation from federated counts equals fairlearn 0.15 on the pooled rows.

Each site's rows are counted on their own; the server sums the counts; what it computes from
the sums (weights, multipliers, thresholds) is compared with fairlearn fitted on the pooled
rows."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    selection_rate,
    true_positive_rate,
)
from fairlearn.postprocessing import ThresholdOptimizer
from fairlearn.reductions import DemographicParity, EqualizedOdds, ErrorRate, ExponentiatedGradient
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression

from fedcore import fairness_mitigation as fm
from fedcore import training
from fedcore.fairness import group_counts, merge_counts
from fedcore.models import build_model

GROUPS = ["F", "M", "X"]


def pooled(seed: int, n: int = 600, groups: list[str] = GROUPS) -> tuple[np.ndarray, ...]:
    """Labels, groups and a score that depends on both (a biased model's)."""
    rng = np.random.default_rng(seed)
    shares = np.linspace(1.0, 2.0, len(groups))
    a = rng.choice(groups, size=n, p=shares / shares.sum())
    y = (rng.random(n) < np.where(a == groups[0], 0.3, 0.55)).astype(int)
    score = np.clip(0.35 * y + 0.15 * (a == groups[1]) + rng.normal(0.3, 0.2, n), 0, 1)
    return y, a, score


def sites(n: int, k: int = 3) -> list[np.ndarray]:
    return np.array_split(np.arange(n), k)


# --- reweighing --------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(3))
def test_reweighing_from_site_counts_makes_the_label_independent_of_the_group(seed: int) -> None:
    y, a, _ = pooled(seed)
    counts = fm.merge_label_counts(
        [fm.label_counts(y[s], a[s], groups=GROUPS) for s in sites(y.size)]
    )

    weights = fm.reweighing_weights(counts)
    labels, w = weights.apply(y, a)

    # Kamiran-Calders on the pooled rows, row by row.
    frame = pd.DataFrame({"a": a, "y": y})
    p_g = frame["a"].map(frame["a"].value_counts(normalize=True))
    p_y = frame["y"].map(frame["y"].value_counts(normalize=True))
    p_gy = frame.groupby(["a", "y"])["y"].transform("size") / len(frame)
    np.testing.assert_allclose(w, p_g * p_y / p_gy, rtol=1e-12)
    assert np.array_equal(labels, y)
    assert w.sum() == pytest.approx(y.size)
    # fairlearn: the weighted base rate is the same in every group (labels as predictions).
    assert demographic_parity_difference(y, y, sensitive_features=a) > 0.1
    assert demographic_parity_difference(
        y, y, sensitive_features=a, sample_weight=w
    ) == pytest.approx(0.0, abs=1e-12)


def test_reweighing_refuses_what_it_cannot_compute() -> None:
    y = np.array([0, 1, 0, 1])
    a = np.array(["F", "F", "M", "M"])

    declared_but_absent = fm.label_counts(y, a, groups=["F", "M", "Z"])
    with pytest.raises(fm.MitigationError, match="group 'Z' has no rows at any site"):
        fm.reweighing_weights(declared_but_absent)
    no_positive = fm.label_counts(np.array([0, 1, 0, 0]), a)
    with pytest.raises(fm.MitigationError, match="group 'M' has no positives"):
        fm.reweighing_weights(no_positive)
    # The public placeholders are released with zero counts everywhere: left out, not refused.
    with_placeholders = fm.label_counts(y, a, groups=["F", "M", "__missing__", "__other__"])
    assert set(fm.reweighing_weights(with_placeholders).cells) == {"F", "M"}
    # A placeholder holding one label only (a rare category a small site withheld) keeps the
    # plain loss; a real group with one label only is refused.
    one_label = {**with_placeholders, "__other__": {"negatives": 0, "positives": 3}}
    weights = fm.reweighing_weights(one_label)
    assert weights.cells["__other__"] == {1: (1, 1.0)}
    with pytest.raises(fm.MitigationError, match="group 'F' has no negatives"):
        fm.reweighing_weights({**one_label, "F": {"negatives": 0, "positives": 5}})


# --- FairFed -----------------------------------------------------------------------------------


def test_fairfed_metrics_are_fairlearns_and_the_update_is_the_papers() -> None:
    y, a, score = pooled(4, n=900, groups=["F", "M"])
    pred = (score >= 0.5).astype(int)
    parts = {f"site{i}": s for i, s in enumerate(sites(y.size))}
    counts = {silo: group_counts(y[s], pred[s], a[s]) for silo, s in parts.items()}
    sizes = {silo: s.size for silo, s in parts.items()}
    previous = {silo: n / y.size for silo, n in sizes.items()}

    step = fm.fairfed_step(counts, previous, beta=0.5)

    def signed_gap(rows: np.ndarray) -> float:
        frame = MetricFrame(
            metrics=selection_rate, y_true=y[rows], y_pred=pred[rows], sensitive_features=a[rows]
        ).by_group
        return float(frame["F"] - frame["M"])

    everything = np.arange(y.size)
    assert step.global_value == pytest.approx(signed_gap(everything), abs=1e-12)
    assert abs(step.global_value) == pytest.approx(
        demographic_parity_difference(y, pred, sensitive_features=a), abs=1e-12
    )
    deltas = {silo: abs(signed_gap(everything) - signed_gap(rows)) for silo, rows in parts.items()}
    mean = sum(deltas.values()) / len(deltas)
    raw = {silo: previous[silo] - 0.5 * (deltas[silo] - mean) for silo in parts}
    for silo in parts:
        assert step.local_values[silo] == pytest.approx(signed_gap(parts[silo]), abs=1e-12)
        assert step.deltas[silo] == pytest.approx(deltas[silo], abs=1e-12)
        assert step.weights[silo] == pytest.approx(raw[silo] / sum(raw.values()), abs=1e-12)
    assert sum(step.weights.values()) == pytest.approx(1.0)
    # beta 0 is FedAvg; the site farthest from the global fairness loses weight.
    assert fm.fairfed_step(counts, previous, beta=0.0).weights == pytest.approx(previous)
    farthest = max(deltas, key=deltas.__getitem__)
    assert step.weights[farthest] < previous[farthest]


def test_fairfed_equalized_odds_and_the_accuracy_fallback() -> None:
    y, a, score = pooled(5, n=900, groups=["F", "M"])
    pred = (score >= 0.5).astype(int)
    rows = sites(y.size)
    counts = {f"s{i}": group_counts(y[s], pred[s], a[s]) for i, s in enumerate(rows)}
    # A fourth site holds only group M: its local metric is undefined -> accuracy gap.
    only_m = np.flatnonzero(a == "M")[:50]
    counts["s3"] = group_counts(y[only_m], pred[only_m], a[only_m])
    previous = dict.fromkeys(counts, 0.25)

    step = fm.fairfed_step(counts, previous, beta=1.0, metric="equalized_odds")

    rows_all = np.concatenate([*rows, only_m])  # every site's rows, pooled
    tpr = MetricFrame(
        metrics=true_positive_rate,
        y_true=y[rows_all],
        y_pred=pred[rows_all],
        sensitive_features=a[rows_all],
    ).by_group
    # Two groups: the paper's equal opportunity difference, TPR(F) - TPR(M), on pooled rows.
    assert step.global_value == pytest.approx(float(tpr["F"] - tpr["M"]), abs=1e-12)
    merged = merge_counts(list(counts.values()))
    pooled_acc = sum(c["tp"] + c["tn"] for c in merged.values()) / sum(
        sum(c.values()) for c in merged.values()
    )
    assert step.fallback == ["s3"] and step.local_values["s3"] is None
    local_acc = np.mean(pred[only_m] == y[only_m])
    assert step.deltas["s3"] == pytest.approx(abs(local_acc - pooled_acc), abs=1e-12)


def test_fairfed_refuses_what_it_cannot_compute() -> None:
    counts = {"s0": {"F": {"tp": 1, "fp": 1, "tn": 1, "fn": 1}}}
    with pytest.raises(fm.MitigationError, match="no previous weight"):
        fm.fairfed_step(counts, {}, beta=1.0)
    with pytest.raises(fm.MitigationError, match="every aggregation weight to 0"):
        fm.fairfed_step(
            {
                "s0": {
                    "F": {"tp": 5, "fp": 0, "tn": 5, "fn": 0},
                    "M": {"tp": 0, "fp": 0, "tn": 5, "fn": 5},
                },
                "s1": {
                    "F": {"tp": 0, "fp": 0, "tn": 5, "fn": 5},
                    "M": {"tp": 5, "fp": 0, "tn": 5, "fn": 0},
                },
            },
            {"s0": 0.0, "s1": 0.0},
            beta=1.0,
        )


# --- federated reductions ----------------------------------------------------------------------


def moment(constraint: str) -> DemographicParity | EqualizedOdds:
    if constraint == "demographic_parity":
        return DemographicParity(difference_bound=0.01)
    return EqualizedOdds(difference_bound=0.01)


@pytest.mark.parametrize("constraint", fm.CONSTRAINTS)
def test_gamma_and_cost_sensitive_weights_equal_fairlearns(constraint: str) -> None:
    y, a, score = pooled(6)
    X = score.reshape(-1, 1)
    pred = (score >= 0.5).astype(int)
    parts = sites(y.size)
    label_counts = fm.merge_label_counts([fm.label_counts(y[s], a[s]) for s in parts])
    confusion = merge_counts([group_counts(y[s], pred[s], a[s]) for s in parts])
    ours_index = fm.reduction_index(label_counts, constraint)
    theirs = moment(constraint)
    theirs.load_data(X, pd.Series(y), sensitive_features=pd.Series(a))
    objective = ErrorRate()
    objective.load_data(X, pd.Series(y), sensitive_features=pd.Series(a))

    assert ours_index == list(theirs.index)
    gamma = fm.reduction_gamma(confusion, constraint)
    expected_gamma = theirs.gamma(lambda _: pred)
    assert [gamma[k] for k in ours_index] == pytest.approx(list(expected_gamma), abs=1e-12)

    rng = np.random.default_rng(1)
    theta = dict(zip(ours_index, rng.normal(0, 2, len(ours_index)), strict=True))
    lambdas = fm.multipliers(theta, 0.01)
    weights = fm.reduction_weights(lambdas, label_counts, constraint)
    labels, w = weights.apply(y, a)

    lambda_vec = pd.Series([lambdas[k] for k in ours_index], index=theirs.index)
    signed = objective.signed_weights() + theirs.signed_weights(lambda_vec)
    red_w = signed.abs()
    red_w = y.size * red_w / red_w.sum()
    assert np.array_equal(labels, (signed > 0).astype(int).to_numpy())
    np.testing.assert_allclose(w, red_w.to_numpy(), rtol=1e-9)
    assert sum(lambdas.values()) <= 100.0  # ||lambda||_1 <= B = 1 / bound


def run_federated_reductions(
    X: np.ndarray, y: np.ndarray, a: np.ndarray, constraint: str, rounds: int = 40
) -> tuple[np.ndarray, np.ndarray]:
    """The server's loop: multipliers from summed counts; training on the reweighted loss."""
    torch.manual_seed(0)
    model = build_model({"kind": "logistic_regression"}, X.shape[1])
    parts = sites(y.size)
    counts = fm.merge_label_counts([fm.label_counts(y[s], a[s]) for s in parts])
    theta: dict[tuple[str, str, str], float] = {}
    for rnd in range(1, rounds + 1):
        weights = fm.reduction_weights(fm.multipliers(theta, 0.01), counts, constraint)
        labels, w = weights.apply(y, a)
        training.train_local(
            model, X, labels, epochs=1, batch_size=64, lr=0.05, seed=rnd, sample_weight=w
        )
        pred = (training.predict_proba(model, X) >= 0.5).astype(int)
        confusion = merge_counts([group_counts(y[s], pred[s], a[s]) for s in parts])
        theta = fm.reduction_step(
            theta, fm.reduction_gamma(confusion, constraint), bound=0.01, eta=2.0
        )
    return pred, training.predict_proba(model, X)


def toy(seed: int, n: int = 4000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.choice(["F", "M"], size=n, p=[0.4, 0.6])
    z = rng.normal(size=(n, 4))
    logit = 1.2 * z[:, 0] + 0.8 * z[:, 1] - 0.5 * z[:, 2] + 1.0 * (a == "M") - 0.3
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(int)
    return np.column_stack([z, (a == "M")]).astype(np.float32), y, a


@pytest.mark.parametrize(
    ("constraint", "metric", "slack"),
    [
        ("demographic_parity", demographic_parity_difference, 0.01),
        ("equalized_odds", equalized_odds_difference, 0.02),
    ],
)
def test_the_federated_multiplier_loop_reaches_exponentiated_gradients_disparity(
    constraint: str, metric: object, slack: float
) -> None:
    X, y, a = toy(0)
    unmitigated = metric(y, LogisticRegression().fit(X, y).predict(X), sensitive_features=a)  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eg = ExponentiatedGradient(LogisticRegression(), moment(constraint), eps=0.01)
        eg.fit(X, y, sensitive_features=a)
    theirs = metric(y, eg.predict(X, random_state=0), sensitive_features=a)  # type: ignore[operator]

    pred, _ = run_federated_reductions(X, y, a, constraint)
    ours = metric(y, pred, sensitive_features=a)  # type: ignore[operator]

    assert unmitigated > 0.15
    assert ours <= theirs + slack, (ours, theirs, unmitigated)
    assert np.mean(pred == y) > np.mean(eg.predict(X, random_state=0) == y) - 0.015


# --- group thresholds --------------------------------------------------------------------------


class OnGrid(ClassifierMixin, BaseEstimator):
    """A fitted 'model' whose score is the first column (already on the grid)."""

    fitted_ = True

    def fit(self, X: np.ndarray, y: np.ndarray) -> OnGrid:
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(X)[:, 0]


GRID = np.round(np.linspace(0, 1, 21), 10)


@pytest.mark.parametrize("constraint", fm.CONSTRAINTS)
@pytest.mark.parametrize("objective", fm.OBJECTIVES)
@pytest.mark.parametrize("seed", range(3))
def test_thresholds_equal_threshold_optimizers_on_the_pooled_rows(
    constraint: str, objective: str, seed: int
) -> None:
    y, a, raw = pooled(seed)
    scores = GRID[np.rint(raw * 20).astype(int)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ThresholdOptimizer(
            estimator=OnGrid(),
            constraints=constraint,
            objective=objective,
            prefit=True,
            predict_method="predict",
        ).fit(scores.reshape(-1, 1), y, sensitive_features=a)
    expected = theirs._pmf_predict(scores.reshape(-1, 1), sensitive_features=a)[:, 1]
    histograms = [score_hist(scores[s], y[s], a[s]) for s in sites(y.size)]
    merged = {
        g: {
            c: [int(v) for v in np.sum([h[g][c] for h in histograms], axis=0)]
            for c in fm.LABEL_CELLS
        }
        for g in GROUPS
    }

    rules = fm.threshold_rules(merged, GRID, constraint=constraint, objective=objective)

    interpolation = theirs.interpolated_thresholder_.interpolation_dict
    for group, rule in rules.rules.items():
        theirs_g = interpolation[group]
        assert (rule.threshold0, rule.threshold1) == (
            theirs_g.operation0.threshold,
            theirs_g.operation1.threshold,
        )
        assert (rule.p0, rule.p1) == (theirs_g.p0, theirs_g.p1)
        assert rule.p_ignore == theirs_g.get("p_ignore", 0.0)
    assert np.array_equal(rules.positive_probability(scores, a), expected)
    # The disparities of the thresholded decisions, from the histograms alone, are fairlearn's
    # metrics of the expected decisions on the pooled rows.
    disparities = fm.thresholded_disparities(rules.to_json()["rules"], merged, GRID)
    selection = [expected[a == g].mean() for g in GROUPS]
    tpr = [expected[(a == g) & (y == 1)].mean() for g in GROUPS]
    fpr = [expected[(a == g) & (y == 0)].mean() for g in GROUPS]
    assert disparities["demographic_parity_difference"] == pytest.approx(
        max(selection) - min(selection), abs=1e-12
    )
    assert disparities["equalized_odds_difference"] == pytest.approx(
        max(max(tpr) - min(tpr), max(fpr) - min(fpr)), abs=1e-12
    )
    # ... and their accuracy is the expected accuracy of those decisions on the pooled rows.
    accuracy = fm.thresholded_accuracy(rules.to_json()["rules"], merged, GRID)
    assert accuracy == pytest.approx(np.where(y == 1, expected, 1 - expected).mean(), abs=1e-12)
    # Some group randomises between two thresholds (that is what makes the rates equal).
    assert any(0 < rule.p0 < 1 for rule in rules.rules.values())
    assert rules.to_json()["rules"].keys() == set(GROUPS)
    assert fm.ThresholdRules.from_json(rules.to_json()) == rules


def score_hist(scores: np.ndarray, y: np.ndarray, a: np.ndarray) -> dict[str, dict[str, list[int]]]:
    return fm.score_histogram(scores, y, a, GRID, groups=GROUPS)


def test_scores_off_the_grid_are_binned_to_the_nearest_point() -> None:
    hist = fm.score_histogram([0.02, 0.026, 0.97, 0.5], [0, 1, 1, 0], ["F"] * 4, GRID)
    assert hist["F"]["negatives"][0] == 1 and hist["F"]["negatives"][10] == 1
    assert hist["F"]["positives"][1] == 1 and hist["F"]["positives"][19] == 1


def test_thresholds_refuse_a_group_without_both_labels_or_without_rows() -> None:
    zeros = [0] * GRID.size
    ones = [1] * GRID.size
    with pytest.raises(fm.MitigationError, match="group 'M' has no positive label"):
        fm.threshold_rules(
            {
                "F": {"negatives": ones, "positives": ones},
                "M": {"negatives": ones, "positives": zeros},
            },
            GRID,
        )
    with pytest.raises(fm.MitigationError, match="group 'Z' has no rows at any site"):
        fm.threshold_rules(
            {
                "F": {"negatives": ones, "positives": ones},
                "Z": {"negatives": zeros, "positives": zeros},
            },
            GRID,
        )
    with pytest.raises(ValueError, match="21 non-negative integer counts"):
        fm.threshold_rules({"F": {"negatives": [1], "positives": [1]}}, GRID)


def test_example_weights_round_trip_and_refuse_a_missing_cell() -> None:
    weights = fm.ExampleWeights({"F": {0: (0, 1.5), 1: (1, 0.5)}, "M": {0: (1, 2.0)}})
    assert fm.ExampleWeights.from_json(weights.to_json()) == weights
    labels, w = weights.apply([0, 1, 0], ["F", "F", "M"])
    assert labels.tolist() == [0, 1, 1] and w.tolist() == [1.5, 0.5, 2.0]
    with pytest.raises(ValueError, match="no cell for group 'M', label 1"):
        weights.apply([1], ["M"])
    with pytest.raises(ValueError, match="expected \\[label 0/1, weight >= 0\\]"):
        fm.ExampleWeights.from_json({"F": {"0": [0, -1.0]}})
