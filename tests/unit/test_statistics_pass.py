"""The statistics pass cannot be poisoned nor probe rare values (issue 13 part 6): declared
vocabularies, a cap and a pooled minimum count per value, checked value names, noised numeric
statistics; and the plan-language rules of the new keys."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedcore import tabular
from fedcore.plan import PlanError, parse_plan
from fedcore.tabular import DatasetSchema, SchemaError

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
    ],
    "target": {"column": "y", "positive": ["1"]},
}
DECLARED = {
    "columns": [
        {"name": "age", "type": "numeric", "min": 0, "max": 120},
        {"name": "sex", "type": "categorical", "categories": ["F", "M"]},
    ],
    "target": {"column": "y", "positive": ["1"]},
}


def frame(values: dict[str, int], seed: int = 0) -> pd.DataFrame:
    """Rows whose `sex` column holds each value the given number of times."""
    sex = [value for value, count in values.items() for _ in range(count)]
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.normal(50, 10, len(sex)).round(1).astype(str),
            "sex": sex,
            "y": rng.integers(0, 2, len(sex)).astype(str),
        }
    )


def poisoned_report(schema: DatasetSchema) -> dict:
    """What the fake agent sent: its honest report plus 1,002 extra categories for `sex`."""
    report = tabular.local_statistics(frame({"F": 40, "M": 40}), schema)
    extra = {f"x{i}": 10 for i in range(1000)}
    extra["<script>alert(1)</script>"] = 10
    extra["ok\nFORGED log line"] = 10
    report["categories"]["sex"] = {**report["categories"]["sex"], **extra}
    return report


def test_the_fake_agents_1002_extra_categories_are_refused_and_the_model_keeps_its_size():
    schema = DatasetSchema.from_dict(SCHEMA)
    honest = [tabular.local_statistics(frame({"F": 30, "M": 30}, seed=s), schema) for s in (1, 2)]
    before = tabular.feature_names(schema, tabular.merge_statistics(honest, schema))

    with pytest.raises(SchemaError) as info:
        tabular.check_site_statistics(poisoned_report(schema), schema, where="silo 'fake'")

    assert "silo 'fake'" in str(info.value) and "'sex'" in str(info.value)
    assert "1004 categories, more than the cap of 64" in str(info.value)
    with pytest.raises(SchemaError):
        tabular.merge_statistics([*honest, poisoned_report(schema)], schema)
    assert before == ["age", "sex=F", "sex=M"]


@pytest.mark.parametrize(
    ("value", "rule"),
    [
        ("<script>alert(1)</script>", "forbidden character"),
        ("a\nb", "control or non-printable"),
        ("x" * 65, "longer than 64"),
        (" F", "surrounding white space"),
    ],
)
def test_a_value_name_breaking_the_character_rules_is_refused_naming_column_and_rule(value, rule):
    schema = DatasetSchema.from_dict(SCHEMA)
    report = tabular.local_statistics(frame({"F": 10, "M": 10}), schema)
    report["categories"]["sex"][value] = 10

    with pytest.raises(SchemaError) as info:
        tabular.check_site_statistics(report, schema, where="statistics of silo 'fake'")

    assert "silo 'fake'" in str(info.value) and "column 'sex'" in str(info.value)
    assert rule in str(info.value)


def test_the_site_never_sends_a_name_that_breaks_the_rules():
    schema = DatasetSchema.from_dict(SCHEMA)
    data = frame({"F": 10, "M": 10, "<b>bold</b>": 10, "y" * 80: 10})

    report = tabular.local_statistics(data, schema)

    assert report["categories"]["sex"] == {"F": 10, "M": 10}


def test_a_declared_vocabulary_is_the_model_input_whatever_the_sites_send():
    schema = DatasetSchema.from_dict(DECLARED)
    report = tabular.local_statistics(frame({"F": 20, "M": 1, "X": 30}), schema)

    assert report["categories"]["sex"] == {"F": 20, "M": 1}  # declared: no minimum; X not sent
    assert tabular.undeclared_categories(frame({"F": 20, "M": 1, "X": 30}), schema) == {"sex": 30}
    fitted = tabular.merge_statistics([report], schema)
    assert tabular.feature_names(schema, fitted) == ["age", "sex=F", "sex=M", "sex=__missing__"]
    out = tabular.transform(frame({"X": 2}), schema, fitted)
    assert out.X[:, 1:].sum() == 0.0  # an undeclared value encodes as "other": all zero


def test_counts_beyond_the_sites_rows_are_refused():
    schema = DatasetSchema.from_dict(SCHEMA)
    report = tabular.local_statistics(frame({"F": 10, "M": 10}), schema)
    report["categories"]["sex"] = {"F": 15, "M": 15}

    with pytest.raises(SchemaError, match="add up to more than n_rows"):
        tabular.check_site_statistics(report, schema)


def test_a_report_with_an_undeclared_value_is_refused_naming_column_and_value():
    schema = DatasetSchema.from_dict(DECLARED)
    report = tabular.local_statistics(frame({"F": 20, "M": 20}), schema)
    report["categories"]["sex"]["Q"] = 5

    with pytest.raises(SchemaError) as info:
        tabular.check_site_statistics(report, schema, where="silo 'b'")

    assert "column 'sex': category 'Q' is not declared" in str(info.value)


def test_a_rare_value_at_one_site_is_neither_sent_nor_revealed():
    schema = DatasetSchema.from_dict(SCHEMA)
    sites = [frame({"F": 30, "M": 30}), frame({"F": 30, "M": 30, "rare": 2}), frame({"F": 9})]

    reports = [tabular.local_statistics(data, schema) for data in sites]

    assert all("rare" not in report["categories"]["sex"] for report in reports)
    assert tabular.merge_statistics(reports, schema)["categories"]["sex"] == ["F", "M"]


def test_a_value_sent_by_a_lenient_site_stays_hidden_below_the_pooled_minimum():
    schema = DatasetSchema.from_dict(SCHEMA)
    lenient = tabular.local_statistics(frame({"F": 30, "rare": 3}), schema, min_category_count=1)

    assert lenient["categories"]["sex"]["rare"] == 3  # the site chose to name it
    assert tabular.merge_statistics([lenient], schema)["categories"]["sex"] == ["F"]


def test_a_value_at_several_sites_above_the_minimum_is_revealed():
    schema = DatasetSchema.from_dict(SCHEMA)
    reports = [
        tabular.local_statistics(frame({"F": 30, "M": 30, "other": 6}), schema) for _ in range(3)
    ]

    assert tabular.merge_statistics(reports, schema)["categories"]["sex"] == ["F", "M", "other"]


def test_a_value_spread_thinly_under_every_sites_minimum_is_lost_the_documented_trade_off():
    schema = DatasetSchema.from_dict(SCHEMA)
    reports = [tabular.local_statistics(frame({"F": 30, "thin": 4}), schema) for _ in range(3)]

    assert tabular.merge_statistics(reports, schema)["categories"]["sex"] == ["F"]  # 12 >= 5


def test_the_merged_vocabulary_is_capped_to_the_most_frequent_values():
    schema = DatasetSchema.from_dict({**SCHEMA, "max_categories": 2})
    a = tabular.local_statistics(frame({"F": 30, "M": 20}), schema)
    b = tabular.local_statistics(frame({"F": 30, "N": 25}), schema)

    assert tabular.merge_statistics([a, b], schema)["categories"]["sex"] == ["F", "N"]


def test_noised_statistics_stay_close_and_in_bounds_and_differ_each_time():
    schema = DatasetSchema.from_dict(DECLARED)
    rng = np.random.default_rng(0)
    data = pd.DataFrame(
        {"age": rng.uniform(20, 80, 5000).round(1).astype(str), "sex": "F", "y": "1"}
    )

    first = tabular.local_statistics(data, schema, epsilon=1.0)
    second = tabular.local_statistics(data, schema, epsilon=1.0)
    fitted = tabular.merge_statistics([first], schema, noised=True)

    assert set(first["numeric"]["age"]) == {"count", "sum", "sum_sq"}
    assert first["numeric"]["age"] != second["numeric"]["age"]
    assert abs(fitted["numeric"]["age"]["mean"] - 50.0) < 5.0
    assert 0.0 <= fitted["numeric"]["age"]["mean"] <= 120.0
    with pytest.raises(SchemaError, match="must have keys count, m2, mean"):
        tabular.check_site_statistics(first, schema, noised=False)
    with pytest.raises(SchemaError, match="must have keys count, sum, sum_sq"):
        tabular.check_site_statistics(tabular.local_statistics(data, schema), schema, noised=True)


def test_noised_statistics_need_the_bounds():
    with pytest.raises(SchemaError, match="'min' and 'max'"):
        tabular.local_statistics(frame({"F": 9}), DatasetSchema.from_dict(SCHEMA), epsilon=1.0)


@pytest.mark.parametrize(
    ("column", "message"),
    [
        ({"name": "a", "type": "numeric", "categories": ["x"]}, "categorical columns only"),
        ({"name": "a", "type": "categorical", "categories": ["<i>"]}, "forbidden character"),
        ({"name": "a", "type": "categorical", "categories": ["x", "x"]}, "a value twice"),
        ({"name": "a", "type": "categorical", "categories": []}, "at least one value"),
        ({"name": "a", "type": "categorical", "categories": "x"}, "a list of strings"),
        ({"name": "a", "type": "numeric", "min": 0}, "both 'min' and 'max'"),
        ({"name": "a", "type": "numeric", "min": 5, "max": 1}, "must be below"),
        ({"name": "a", "type": "categorical", "min": 0, "max": 1}, "numeric columns only"),
        ({"name": "a", "type": "numeric", "transform": "log1p", "min": -2, "max": 1}, "above -1"),
        ({"name": "a", "type": "categorical", "categorie": ["x"]}, "unknown key"),
    ],
)
def test_schema_keys_for_vocabularies_and_bounds_are_checked(column, message):
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_dict({"columns": [column], "target": {"column": "y", "positive": ["1"]}})


@pytest.mark.parametrize(
    ("extra", "message"),
    [({"max_categories": 0}, "max_categories"), ({"min_category_count": 0}, "min_category_count")],
)
def test_schema_cap_and_minimum_are_checked(extra, message):
    with pytest.raises(SchemaError, match=message):
        DatasetSchema.from_dict({**SCHEMA, **extra})


def test_old_schemas_keep_their_hash():
    old = DatasetSchema.from_dict(SCHEMA).to_dict()
    assert set(old) == {"columns", "target", "sensitive"}  # the new keys only when given
    assert all(set(column) == {"name", "type", "transform", "missing"} for column in old["columns"])
    declared = DatasetSchema.from_dict(DECLARED)
    assert DatasetSchema.from_dict(declared.to_dict()) == declared


def plan(**privacy):
    return {
        "model": {"kind": "logistic_regression"},
        "schema": DECLARED,
        "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
        "privacy": privacy,
    }


def test_statistics_epsilon_parses_with_or_without_training_dp():
    assert parse_plan(plan(statistics_epsilon=1.0)).privacy.statistics_epsilon == 1.0
    both = parse_plan(plan(mode="sample", noise_multiplier=1.0, statistics_epsilon=0.5))
    assert both.privacy.statistics_epsilon == 0.5 and both.privacy.dp


@pytest.mark.parametrize(
    ("spec", "where", "message"),
    [
        (plan(statistics_epsilon=0), "privacy.statistics_epsilon", "a positive number"),
        (plan(statistics_epsilon="1"), "privacy.statistics_epsilon", "a positive number"),
        (plan(statistics_eps=1.0), "privacy", "unknown key(s) 'statistics_eps'"),
        (
            {**plan(statistics_epsilon=1.0), "schema": SCHEMA},
            "privacy.statistics_epsilon",
            "declare 'min' and 'max' in the schema for 'age'",
        ),
    ],
)
def test_plan_rules_of_statistics_epsilon(spec, where, message):
    with pytest.raises(PlanError) as info:
        parse_plan(spec)

    assert message in info.value.errors[where]
