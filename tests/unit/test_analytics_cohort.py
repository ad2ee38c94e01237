"""Cohort statistics from site sums equal the same statistics of the pooled rows."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore.analytics import merge_sums
from fedcore.analytics.cohort import (
    QuantileSearch,
    apply_filters,
    check_columns,
    column_types,
    crosstab_result,
    moments_result,
    parse_filters,
    site_count_below,
    site_crosstab,
    site_histogram,
    site_moments,
)
from fedcore.tabular import DatasetSchema

TYPES = {"age": "numeric", "sex": "categorical", "ecog": "numeric", "smoker": "boolean"}


def make_sites(seed: int = 7) -> list[pd.DataFrame]:
    rng = np.random.default_rng(seed)
    sites = []
    for n in (40, 65, 23):
        age = rng.normal(62, 9, n)
        age[rng.random(n) < 0.05] = np.nan
        sites.append(
            pd.DataFrame(
                {
                    "age": age,
                    "sex": rng.choice(["male", "female"], n, p=[0.6, 0.4]),
                    "ecog": rng.choice([0.0, 1.0, 2.0, 3.0], n, p=[0.3, 0.45, 0.2, 0.05]),
                    "smoker": rng.choice([0.0, 1.0], n),
                }
            )
        )
    return sites


def test_filters_select_the_same_rows_as_pandas() -> None:
    df = make_sites()[1]
    filters = parse_filters(
        [
            {"column": "age", "op": "ge", "value": 60},
            {"column": "sex", "op": "in", "value": ["female"]},
            {"column": "ecog", "op": "ne", "value": 3},
        ],
        TYPES,
    )
    expected = (df.age >= 60) & (df.sex == "female") & (df.ecog != 3)
    assert apply_filters(df, filters).tolist() == expected.tolist()
    missing = parse_filters([{"column": "age", "op": "missing"}], TYPES)
    assert apply_filters(df, missing).tolist() == df.age.isna().tolist()


def test_a_filter_over_a_column_not_in_the_schema_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="column 'weight' is not in the dataset schema"):
        parse_filters([{"column": "weight", "op": "gt", "value": 80}], TYPES)
    with pytest.raises(ValueError, match="compares numbers but column 'sex' is categorical"):
        parse_filters([{"column": "sex", "op": "gt", "value": "m"}], TYPES)
    with pytest.raises(ValueError, match="op 'like' is unknown"):
        parse_filters([{"column": "sex", "op": "like", "value": "m"}], TYPES)
    with pytest.raises(ValueError, match="not numeric"):
        check_columns(TYPES, ["sex"], numeric=True, what="moments")


def test_column_types_come_from_the_dataset_schema() -> None:
    schema = DatasetSchema.from_dict(
        {
            "columns": [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "categorical"}],
            "target": {"column": "dead", "positive": ["1"]},
            "sensitive": ["site_region"],
        }
    )
    assert column_types(schema) == {
        "age": "numeric",
        "sex": "categorical",
        "dead": "categorical",
        "site_region": "categorical",
    }


def test_crosstab_equals_the_pooled_crosstab_and_is_released_with_suppression() -> None:
    sites = make_sites()
    levels = {"sex": ["female", "male"], "ecog": ["0", "1", "2", "3"]}
    merged = merge_sums([site_crosstab(df, "sex", levels, cols="ecog") for df in sites])
    pooled = pd.concat(sites)
    expected = pd.crosstab(pooled.sex, pooled.ecog).to_numpy()
    assert merged["counts"][:2, :4].tolist() == expected.tolist()
    assert merged["counts"][2].sum() == 0 and merged["counts"][:, 4].sum() == 0
    assert int(merged["sites"]) == 3
    released = crosstab_result(merged, levels, "sex", "ecog", min_cell_count=5)
    assert released["row_levels"] == ["female", "male"]
    assert released["col_levels"] == ["0", "1", "2", "3"]
    shown = [v for row in released["cells"] for v in row if v is not None]
    assert all(v == 0 or v >= 5 for v in shown)
    assert released["suppressed_primary"] >= 1  # ECOG 3 is rare


def test_values_outside_the_levels_count_as_other() -> None:
    df = pd.DataFrame({"sex": ["f", "m", "x", None]})
    merged = merge_sums([site_crosstab(df, "sex", {"sex": ["f", "m"]})])
    assert merged["counts"].tolist() == [1, 1, 2]


def test_moments_equal_numpy_on_the_pooled_complete_cases() -> None:
    sites = make_sites()
    columns = ["age", "ecog", "smoker"]
    shift = [60.0, 1.0, 0.5]
    merged = merge_sums([site_moments(df, columns, shift=shift) for df in sites])
    result = moments_result(merged, columns, shift=shift)
    pooled = pd.concat(sites)[columns].dropna().to_numpy()
    assert result["n"] == len(pooled)
    np.testing.assert_allclose(result["mean"], pooled.mean(axis=0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(result["variance"], pooled.var(axis=0, ddof=1), atol=1e-10)
    np.testing.assert_allclose(result["correlation"], np.corrcoef(pooled.T), atol=1e-12)


def test_histogram_equals_numpy_with_under_and_overflow() -> None:
    sites = make_sites()
    edges = [45, 55, 65, 75]
    merged = merge_sums([site_histogram(df, "age", edges) for df in sites])
    ages = pd.concat(sites).age.dropna().to_numpy()
    inside, _ = np.histogram(ages, bins=edges)
    assert merged["counts"][1:-1].tolist() == inside.tolist()
    assert merged["counts"][0] == np.sum(ages < 45)
    assert merged["counts"][-1] == np.sum(ages > 75)


@pytest.mark.parametrize("method", ["linear", "inverted_cdf", "lower", "higher"])
def test_quantiles_by_bisection_are_exactly_numpys(method: str) -> None:
    sites = make_sites()
    probs = [0.1, 0.25, 0.5, 0.75, 0.9, 1 / 3]
    search = QuantileSearch(probs, method=method)
    while not search.done:
        thresholds = search.thresholds()
        search.update(merge_sums([site_count_below(df, "age", thresholds) for df in sites]))
    result = search.result()
    ages = pd.concat(sites).age.dropna().to_numpy()
    assert result["values"] == np.quantile(ages, probs, method=method).tolist()
    assert result["rounds"] <= 17


def test_quantiles_of_ties_and_negative_values_are_exact() -> None:
    sites = [pd.DataFrame({"x": [-2.5, -2.5, 0.0, 1e-300]}), pd.DataFrame({"x": [-0.0, 7.0, 7.0]})]
    search = QuantileSearch([0.2, 0.5, 0.8])
    while not search.done:
        thresholds = search.thresholds()
        search.update(merge_sums([site_count_below(df, "x", thresholds) for df in sites]))
    pooled = np.concatenate([df.x.to_numpy() for df in sites])
    assert search.result()["values"] == np.quantile(pooled, [0.2, 0.5, 0.8]).tolist()


def test_an_extreme_quantile_is_refused_under_a_minimum_count() -> None:
    sites = make_sites()
    search = QuantileSearch([0.0], min_cell_count=5)
    thresholds = search.thresholds()
    with pytest.raises(ValueError, match="one patient's value"):
        search.update(merge_sums([site_count_below(df, "age", thresholds) for df in sites]))


def test_merge_refuses_summaries_that_do_not_match() -> None:
    with pytest.raises(ValueError, match="at least one site"):
        merge_sums([])
    with pytest.raises(ValueError, match="shape"):
        merge_sums([{"counts": np.zeros(3)}, {"counts": np.zeros(4)}])
    with pytest.raises(ValueError, match="missing \\['n'\\]"):
        merge_sums([{"counts": np.zeros(3), "n": 1}, {"counts": np.zeros(3)}])
    with pytest.raises(ValueError, match="non-finite"):
        merge_sums([{"x": np.array([np.nan])}])
