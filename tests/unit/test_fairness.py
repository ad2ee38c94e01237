"""Tests for fedcore.fairness: federated fairness equals pooled fairness (fairlearn)."""

from __future__ import annotations

import math
import random

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import (
    MetricFrame,
    demographic_parity_difference,
    equalized_odds_difference,
    false_positive_rate,
    selection_rate,
    true_positive_rate,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import accuracy_score, recall_score

from fedcore.fairness import (
    fairness_report,
    group_counts,
    merge_counts,
    noisy_counts,
    performance_spread,
    predictions_at,
    representation,
    threshold_flags,
)

GROUPS = ("a", "b", "c")
METRICS = {
    "selection_rate": selection_rate,
    "tpr": true_positive_rate,
    "fpr": false_positive_rate,
    "accuracy": accuracy_score,
}


def make_sites(seed: int, n_sites: int = 5) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Sites with three groups of different base rates; group "c" never has a positive label."""
    rng = np.random.default_rng(seed)
    base_rate = {"a": 0.5, "b": 0.25, "c": 0.0}
    sites = []
    for index in range(n_sites):
        n = int(rng.integers(15, 60))
        # Site 1 has no "b" record: a group absent at a site must count 0 there.
        present = ["a", "c"] if index == 1 else list(GROUPS)
        groups = rng.choice(present, size=n)
        y = (rng.random(n) < np.vectorize(base_rate.get)(groups)).astype(int)
        probs = np.clip(0.35 * y + rng.random(n) * 0.8, 0.0, 1.0)
        sites.append((y, predictions_at(probs), groups))
    return sites


def pooled(sites):
    return tuple(np.concatenate(parts) for parts in zip(*sites, strict=True))


def assert_matches_fairlearn(report, y, y_pred, groups):
    # A Series, because fairlearn squeezes a one-record array to zero dimensions and refuses it.
    sensitive = pd.Series(groups, name="group")
    frame = MetricFrame(metrics=METRICS, y_true=y, y_pred=y_pred, sensitive_features=sensitive)

    assert sorted(report["by_group"]) == sorted(str(g) for g in frame.by_group.index)
    for group, rates in report["by_group"].items():
        for metric in METRICS:
            assert rates[metric] == pytest.approx(frame.by_group.loc[group, metric], abs=1e-12)
        assert rates["count"] == int(np.sum(groups == group))
    for metric in METRICS:
        assert report["overall"][metric] == pytest.approx(frame.overall[metric], abs=1e-12)
    assert report["overall"]["count"] == len(y)
    expected_dpd = demographic_parity_difference(y, y_pred, sensitive_features=sensitive)
    expected_eod = equalized_odds_difference(y, y_pred, sensitive_features=sensitive)
    assert report["demographic_parity_difference"] == pytest.approx(expected_dpd, abs=1e-12)
    assert report["equalized_odds_difference"] == pytest.approx(expected_eod, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_federated_fairness_equals_pooled_fairlearn(seed):
    sites = make_sites(seed)
    y, y_pred, groups = pooled(sites)

    report = fairness_report(merge_counts([group_counts(*site) for site in sites]))

    assert not y[groups == "c"].any()  # the group without positive labels is really there
    assert report["by_group"]["c"]["tpr"] == 0.0
    assert_matches_fairlearn(report, y, y_pred, groups)


record = st.tuples(st.sampled_from(GROUPS), st.booleans(), st.booleans()).map(
    # Group "c" never has a positive label, so its TPR is always the undefined case.
    lambda r: (r[0], r[1] and r[0] != "c", r[2])
)


@settings(
    max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(sites=st.lists(st.lists(record, max_size=25), min_size=5, max_size=5))
def test_federated_fairness_equals_pooled_fairlearn_for_any_split(sites):
    rows = [row for site in sites for row in site]
    if not rows:
        with pytest.raises(ValueError, match="no record"):
            fairness_report(merge_counts([{} for _ in sites]))
        return
    per_site = [
        group_counts([r[1] for r in site], [r[2] for r in site], [r[0] for r in site])
        for site in sites
    ]

    report = fairness_report(merge_counts(per_site))

    groups = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows], dtype=int)
    y_pred = np.array([r[2] for r in rows], dtype=int)
    assert_matches_fairlearn(report, y, y_pred, groups)


def test_undefined_tpr_is_zero_like_fairlearn_recall_with_zero_division():
    y = np.array([1, 0, 1, 0, 0, 0])
    y_pred = np.array([1, 1, 0, 0, 1, 0])
    groups = np.array(["a", "a", "a", "a", "c", "c"])

    report = fairness_report(group_counts(y, y_pred, groups))
    with pytest.warns(UndefinedMetricWarning):
        recall = MetricFrame(
            metrics=recall_score, y_true=y, y_pred=y_pred, sensitive_features=groups
        ).by_group

    assert report["by_group"]["c"]["tpr"] == recall["c"] == 0.0
    assert report["undefined_rates"] == [
        {"group": "c", "metric": "tpr", "reason": "no positive labels"}
    ]
    # TPR: a 1/2, c 0 (undefined); FPR: a 1/2, c 1/2 -> the worse difference is 0.5.
    assert report["equalized_odds_difference"] == 0.5


def test_group_without_negatives_has_fpr_zero_and_is_listed():
    counts = {"a": {"tp": 2, "fp": 1, "tn": 1, "fn": 0}, "b": {"tp": 1, "fp": 0, "tn": 0, "fn": 1}}

    report = fairness_report(counts)

    assert report["by_group"]["b"] == {
        "selection_rate": 0.5,
        "tpr": 0.5,
        "fpr": 0.0,
        "accuracy": 0.5,
        "count": 2,
    }
    assert report["undefined_rates"] == [
        {"group": "b", "metric": "fpr", "reason": "no negative labels"}
    ]
    assert report["demographic_parity_difference"] == 0.25
    assert report["equalized_odds_difference"] == 0.5


def test_merge_is_exact_sum_equal_to_counts_of_pooled_rows():
    sites = make_sites(11)
    per_site = [group_counts(*site) for site in sites]

    merged = merge_counts(per_site)

    assert "b" not in per_site[1]
    assert merged == group_counts(*pooled(sites))
    assert sum(sum(cells.values()) for cells in merged.values()) == sum(len(s[0]) for s in sites)
    assert all(type(v) is int for cells in merged.values() for v in cells.values())


def test_group_counts_hand_computed_with_missing_labels():
    counts = group_counts(
        [1, 1, 0, 0, 1, 0, True],
        np.array([True, False, True, False, True, False, False]),
        ["F", "F", "F", "M", None, float("nan"), "M"],
    )

    assert counts == {
        "F": {"tp": 1, "fp": 1, "tn": 0, "fn": 1},
        "M": {"tp": 0, "fp": 0, "tn": 1, "fn": 1},
        "__missing__": {"tp": 1, "fp": 0, "tn": 1, "fn": 0},
    }
    assert list(counts) == sorted(counts)
    assert list(group_counts([1, 0], [1, 0], [True, np.False_])) == ["false", "true"]


def test_group_counts_lists_every_declared_group():
    counts = group_counts([1, 0], [1, 1], ["F", "F"], groups=["M", "F", "__missing__"])

    assert counts == {
        "F": {"tp": 1, "fp": 1, "tn": 0, "fn": 0},
        "M": {"tp": 0, "fp": 0, "tn": 0, "fn": 0},
        "__missing__": {"tp": 0, "fp": 0, "tn": 0, "fn": 0},
    }
    with pytest.raises(ValueError, match="'X' not in groups"):
        group_counts([1], [1], ["X"], groups=["F", "M"])


@pytest.mark.parametrize(
    ("y_true", "y_pred", "sensitive", "message"),
    [
        ([1, 0], [1], ["a", "a"], "lengths 2, 1 and 2"),
        ([1, 2], [1, 0], ["a", "a"], "y_true must hold binary labels 0/1; found 2"),
        ([1, 0], [0.5, 0], ["a", "a"], "y_pred must hold binary labels 0/1; found 0.5"),
        ([1, 0], ["1", "0"], ["a", "a"], "y_pred must hold binary labels"),
        ([[1, 0]], [[1, 0]], [["a", "a"]], "one-dimensional"),
    ],
)
def test_group_counts_refuses_bad_input(y_true, y_pred, sensitive, message):
    with pytest.raises(ValueError, match=message):
        group_counts(y_true, y_pred, sensitive)


def test_predictions_at_threshold_is_inclusive():
    assert predictions_at([0.2, 0.5, 0.7, 1.0, 0.0]).tolist() == [0, 1, 1, 1, 0]
    assert predictions_at([0.2, 0.5, 0.7], threshold=0.7).tolist() == [0, 0, 1]
    with pytest.raises(ValueError, match=r"found 1\.5 at index 1"):
        predictions_at([0.2, 1.5])
    with pytest.raises(ValueError, match="threshold"):
        predictions_at([0.2], threshold=2)


GOOD = {"a": {"tp": 1, "fp": 2, "tn": 3, "fn": 4}}


@pytest.mark.parametrize(
    ("bad_cells", "message"),
    [
        ({"tp": -1, "fp": 0, "tn": 0, "fn": 0}, "tp = -1 is negative"),
        ({"tp": 1.0, "fp": 0, "tn": 0, "fn": 0}, "tp = 1.0 is not an integer count"),
        ({"tp": True, "fp": 0, "tn": 0, "fn": 0}, "tp = True is not an integer count"),
        ({"tp": "3", "fp": 0, "tn": 0, "fn": 0}, "tp = '3' is not an integer count"),
        ({"tp": 1, "fp": 0, "tn": 0, "fn": 0, "n": 1}, "unknown key.*'n'"),
        ({"tp": 1, "fp": 0, "tn": 0}, "missing key.*fn"),
        ([1, 0, 0, 0], "expected a mapping"),
    ],
)
def test_merge_refuses_bad_counts_naming_site_and_group(bad_cells, message):
    with pytest.raises(ValueError, match=rf"site 1, group 'b': {message}"):
        merge_counts([GOOD, {"a": GOOD["a"], "b": bad_cells}])


def test_merge_refuses_non_mapping_and_non_string_group():
    with pytest.raises(ValueError, match="site 0: counts must be a mapping"):
        merge_counts([[("a", 1)]])
    with pytest.raises(ValueError, match="site 1: group 7 is not a string"):
        merge_counts([GOOD, {7: GOOD["a"]}])


def test_merge_accepts_numpy_integers_and_returns_plain_ints():
    merged = merge_counts([{"a": {k: np.int64(v) for k, v in GOOD["a"].items()}}, GOOD])

    assert merged == {"a": {"tp": 2, "fp": 4, "tn": 6, "fn": 8}}
    assert all(type(v) is int for v in merged["a"].values())
    assert merge_counts([]) == {}


def test_report_leaves_out_groups_never_seen_and_refuses_no_records():
    counts = {**GOOD, "z": {"tp": 0, "fp": 0, "tn": 0, "fn": 0}}

    report = fairness_report(counts)

    assert list(report["by_group"]) == ["a"]
    assert report["demographic_parity_difference"] == 0.0
    with pytest.raises(ValueError, match="no record"):
        fairness_report({"z": {"tp": 0, "fp": 0, "tn": 0, "fn": 0}})


def report_with(dpd, eod, undefined=()):
    return {
        "demographic_parity_difference": dpd,
        "equalized_odds_difference": eod,
        "undefined_rates": list(undefined),
    }


def test_threshold_flags_report_value_and_limit():
    thresholds = {
        "sensitive_attribute": "sex",
        "max_demographic_parity_difference": 0.1,
        "max_equalized_odds_difference": 0.2,
    }

    flags = threshold_flags(report_with(0.15, 0.05), thresholds)

    assert flags == [
        {
            "metric": "demographic_parity_difference",
            "value": 0.15,
            "limit": 0.1,
            "threshold": "max_demographic_parity_difference",
        }
    ]
    assert threshold_flags(report_with(0.1, 0.2), thresholds) == []
    assert threshold_flags(report_with(0.9, 0.9), {"sensitive_attribute": "sex"}) == []


def test_threshold_flags_on_a_real_report_and_limit_equal_to_value():
    report = fairness_report(
        {"a": {"tp": 3, "fp": 0, "tn": 7, "fn": 0}, "b": {"tp": 6, "fp": 0, "tn": 4, "fn": 0}}
    )

    # Selection rates 0.3 and 0.6: 0.6 - 0.3 is one ulp away from 0.3 in floating point.
    assert threshold_flags(report, {"max_demographic_parity_difference": 0.3}) == []
    assert [
        f["metric"] for f in threshold_flags(report, {"max_demographic_parity_difference": 0.29})
    ] == ["demographic_parity_difference"]


def test_equalized_odds_flag_carries_undefined_rates():
    undefined = [{"group": "c", "metric": "tpr", "reason": "no positive labels"}]

    (flag,) = threshold_flags(
        report_with(0.0, 0.7, undefined), {"max_equalized_odds_difference": 0.2}
    )

    assert flag["metric"] == "equalized_odds_difference"
    assert (flag["value"], flag["limit"]) == (0.7, 0.2)
    assert flag["undefined_rates"] == undefined


@pytest.mark.parametrize("limit", [-0.1, "0.1", float("nan"), True])
def test_threshold_flags_refuse_bad_limits(limit):
    with pytest.raises(ValueError, match="max_demographic_parity_difference"):
        threshold_flags(report_with(0.1, 0.1), {"max_demographic_parity_difference": limit})


def test_performance_spread_worst_and_best_silo():
    metrics = {
        "north": {"accuracy": 0.9, "auc": 0.8, "loss": 0.3, "n": 100},
        "south": {"accuracy": 0.6, "auc": None, "loss": 0.7, "n": 50},
        "east": {"accuracy": 0.75, "auc": float("nan"), "n": 20},
        "west": {"accuracy": 0.6, "auc": 0.4},
    }

    spread = performance_spread(metrics)

    accuracy = spread["accuracy"]
    assert accuracy["worst"] == {"silo": "south", "value": 0.6}
    assert accuracy["best"] == {"silo": "north", "value": 0.9}
    assert accuracy["difference"] == pytest.approx(0.3)
    assert accuracy["ratio"] == pytest.approx(2 / 3)
    assert accuracy["silos"] == 4
    assert spread["auc"] == {
        "worst": {"silo": "west", "value": 0.4},
        "best": {"silo": "north", "value": 0.8},
        "difference": pytest.approx(0.4),
        "ratio": 0.5,
        "silos": 2,
    }


def test_performance_spread_undefined_everywhere_and_bad_values():
    spread = performance_spread({"a": {"accuracy": 0.0, "auc": None}, "b": {"accuracy": 0.0}})

    assert spread["auc"] is None
    assert spread["accuracy"]["ratio"] is None
    assert spread["accuracy"]["difference"] == 0.0
    assert performance_spread({}) == {"accuracy": None, "auc": None}
    with pytest.raises(ValueError, match="silo 'b': auc = 1.5"):
        performance_spread({"a": {"auc": 0.5}, "b": {"auc": 1.5}})
    with pytest.raises(ValueError, match="silo 'a': accuracy = 'high'"):
        performance_spread({"a": {"accuracy": "high"}})


def test_representation_shares_per_silo_and_overall():
    counts_by_silo = {
        "h1": {
            "F": {"tp": 1, "fp": 1, "tn": 1, "fn": 1},
            "M": {"tp": 0, "fp": 0, "tn": 4, "fn": 0},
        },
        "h2": {"F": {"tp": 0, "fp": 0, "tn": 2, "fn": 0}},
        "h3": {},
    }

    result = representation(counts_by_silo)

    assert result["groups"] == ["F", "M"]
    assert result["by_silo"]["h1"] == {"count": 8, "shares": {"F": 0.5, "M": 0.5}}
    assert result["by_silo"]["h2"] == {"count": 2, "shares": {"F": 1.0, "M": 0.0}}
    assert result["by_silo"]["h3"] == {"count": 0, "shares": {"F": None, "M": None}}
    assert result["overall"] == {"count": 10, "shares": {"F": 0.6, "M": 0.4}}
    with pytest.raises(ValueError, match="silo 'h2', group 'F': tn = -2 is negative"):
        representation({"h2": {"F": {"tp": 0, "fp": 0, "tn": -2, "fn": 0}}})


LARGE = {g: {"tp": 1000, "fp": 2000, "tn": 3000, "fn": 4000} for g in GROUPS}


def noise_samples(release, counts=LARGE):
    return [release["counts"][g][cell] - counts[g][cell] for g in counts for cell in counts[g]]


def test_discrete_laplace_counts_are_unbiased_with_the_right_distribution():
    source = random.Random(20240601)
    epsilon = 1.0

    releases = [noisy_counts(LARGE, epsilon=epsilon, source=source) for _ in range(3000)]

    noise = np.array([x for release in releases for x in noise_samples(release)])
    q = math.exp(-epsilon)
    assert releases[0]["epsilon"] == epsilon and releases[0]["delta"] == 0.0
    assert noise.dtype.kind == "i"
    assert abs(noise.mean()) < 0.04  # sd of the mean is about 0.007
    assert noise.var() == pytest.approx(2 * q / (1 - q) ** 2, rel=0.05)
    # The privacy property itself: P(z) = (1 - q) / (1 + q) * q^|z|, so P(z) / P(z + 1) = e^eps.
    for z in range(-2, 3):
        expected = (1 - q) / (1 + q) * q ** abs(z)
        assert np.mean(noise == z) == pytest.approx(expected, abs=0.01)  # sd at most 0.003


def test_discrete_gaussian_counts_are_unbiased_and_charge_the_epsilon_asked():
    source = random.Random(7)
    epsilon, delta = 2.0, 1e-5

    releases = [
        noisy_counts(LARGE, epsilon=epsilon, delta=delta, mechanism="gaussian", source=source)
        for _ in range(300)
    ]

    noise = np.array([x for release in releases for x in noise_samples(release)])
    release = releases[0]
    rho, sigma = release["rho"], release["sigma"]
    assert (release["epsilon"], release["delta"]) == (epsilon, delta)
    assert rho + 2 * math.sqrt(rho * math.log(1 / delta)) == pytest.approx(epsilon, rel=1e-6)
    assert rho + 2 * math.sqrt(rho * math.log(1 / delta)) <= epsilon
    assert sigma == pytest.approx(math.sqrt(1 / (2 * rho)))
    assert abs(noise.mean()) < 4 * sigma / math.sqrt(noise.size)
    assert noise.var() == pytest.approx(sigma**2, rel=0.1)


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noisy_counts_are_non_negative_integers(mechanism):
    zeros = {g: {"tp": 0, "fp": 1, "tn": 0, "fn": 2} for g in GROUPS}
    delta = 1e-5 if mechanism == "gaussian" else None

    releases = [
        noisy_counts(zeros, epsilon=0.5, mechanism=mechanism, delta=delta, source=random.Random(s))
        for s in range(30)
    ]

    values = [v for r in releases for cells in r["counts"].values() for v in cells.values()]
    assert all(type(v) is int and v >= 0 for v in values)
    assert 0 in values and max(values) > 2  # clamping happened, and noise went both ways


def test_noisy_counts_release_every_public_group():
    release = noisy_counts(GOOD, epsilon=1.0, groups=["b", "a"], source=random.Random(0))

    assert list(release["counts"]) == ["a", "b"]
    assert set(release["counts"]["b"]) == {"tp", "fp", "tn", "fn"}
    with pytest.raises(ValueError, match="'a' not in groups"):
        noisy_counts(GOOD, epsilon=1.0, groups=["b"])


def test_default_source_is_system_randomness_and_leaves_global_generators_alone():
    np.random.seed(3)
    random.seed(3)
    numpy_state, random_state = np.random.get_state(), random.getstate()

    first = noisy_counts(LARGE, epsilon=0.1)
    second = noisy_counts(LARGE, epsilon=0.1)

    assert first["counts"] != second["counts"]
    after = np.random.get_state()
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    assert random.getstate() == random_state


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0}, "epsilon must be a finite number > 0"),
        ({"epsilon": float("inf")}, "epsilon must be a finite number > 0"),
        ({"epsilon": 1.0, "mechanism": "exponential"}, "mechanism 'exponential'"),
        ({"epsilon": 1.0, "mechanism": "gaussian"}, "needs delta in"),
        ({"epsilon": 1.0, "mechanism": "gaussian", "delta": 1.0}, "needs delta in"),
        ({"epsilon": 1.0, "delta": 1e-5}, "delta applies to the gaussian mechanism only"),
    ],
)
def test_noisy_counts_refuse_bad_parameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        noisy_counts(GOOD, **kwargs)
