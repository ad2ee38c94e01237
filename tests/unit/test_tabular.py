"""Tests for fedcore.tabular: schema, validation, split, federated statistics and transform."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from fedcore.tabular import (
    MISSING_CATEGORY,
    ColumnSpec,
    DatasetSchema,
    DataValidationError,
    SchemaError,
    TargetSpec,
    feature_names,
    load_table,
    local_statistics,
    merge_statistics,
    schema_hash,
    split_holdout,
    transform,
    validate_frame,
)

SCHEMA_DICT = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "tsh", "type": "numeric", "transform": "log1p"},
        {"name": "smoker", "type": "boolean"},
        {"name": "sex", "type": "categorical"},
        {"name": "region", "type": "categorical", "missing": "drop"},
    ],
    "target": {"column": "outcome", "positive": ["yes"]},
    "sensitive": ["sex", "ethnicity"],
}


@pytest.fixture
def schema() -> DatasetSchema:
    return DatasetSchema.from_dict(SCHEMA_DICT)


def raw_frame(n: int, seed: int = 0) -> pd.DataFrame:
    """A site's table as load_table gives it: strings, None for missing, an extra id column."""
    rng = np.random.default_rng(seed)

    def with_missing(values: np.ndarray, share: float) -> list[str | None]:
        hole = rng.random(len(values)) < share
        return [None if h else str(v) for v, h in zip(values, hole, strict=True)]

    return pd.DataFrame(
        {
            "patient_id": [f"p{seed}-{i}" for i in range(n)],
            "age": with_missing(np.round(rng.normal(50, 15, n), 1), 0.1),
            "tsh": with_missing(np.round(rng.exponential(2.0, n), 3), 0.1),
            "smoker": with_missing(rng.choice(["t", "F", "yes", "No", "1", "0", "Y"], n), 0.1),
            "sex": with_missing(rng.choice(["F", "M"], n), 0.05),
            "region": with_missing(rng.choice(["north", "south", "east"], n), 0.05),
            "ethnicity": with_missing(rng.choice(["a", "b", "c"], n), 0.1),
            "outcome": rng.choice(["yes", "no"], n, p=[0.3, 0.7]),
        },
        dtype=object,
    )


# ------------------------------------------------------------------------------------------
# Schema


def test_schema_round_trips_through_json(schema):
    as_dict = schema.to_dict()

    again = DatasetSchema.from_dict(json.loads(json.dumps(as_dict)))

    assert again == schema
    assert again.to_dict() == as_dict
    assert as_dict["columns"][0] == {
        "name": "age",
        "type": "numeric",
        "transform": "none",
        "missing": "impute",
    }
    assert as_dict["target"] == {"column": "outcome", "positive": ["yes"]}
    assert schema_hash(again) == schema_hash(schema)


def test_schema_hash_changes_with_the_schema(schema):
    changed = dict(SCHEMA_DICT, sensitive=["sex"])

    assert schema_hash(DatasetSchema.from_dict(changed)) != schema_hash(schema)


def test_schema_objects_normalise_lists():
    target = TargetSpec(column="y", negative=["-", "0"])
    schema = DatasetSchema(columns=[ColumnSpec("a", "numeric")], target=target, sensitive=["a2"])

    assert target.negative == ("-", "0")
    assert schema.columns == (ColumnSpec("a", "numeric", "none", "impute"),)
    assert schema.sensitive == ("a2",)


def _schema_with(**changes) -> dict:
    return {**SCHEMA_DICT, **changes}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (_schema_with(columns=[]), "at least one feature column"),
        (
            _schema_with(columns=[{"name": "a", "type": "text"}]),
            "column 'a': type 'text' is not supported; allowed: numeric, categorical, boolean",
        ),
        (
            _schema_with(columns=[{"name": "a", "type": "categorical", "transform": "log1p"}]),
            "column 'a': transform 'log1p' applies to numeric columns only",
        ),
        (
            _schema_with(columns=[{"name": "a", "type": "numeric", "missing": "skip"}]),
            "column 'a': missing policy 'skip' is not supported; allowed: impute, drop, error",
        ),
        (
            _schema_with(columns=[{"name": "a", "type": "numeric", "unit": "mg"}]),
            "column 'a': unknown key(s) 'unit'",
        ),
        (
            _schema_with(columns=[{"name": "a", "type": "numeric"}] * 2),
            "column(s) ['a'] more than once",
        ),
        (
            _schema_with(target={"column": "y", "positive": ["1"], "negative": ["0"]}),
            "give exactly one of 'positive'",
        ),
        (_schema_with(target={"column": "y"}), "give exactly one of 'positive'"),
        (_schema_with(target={"column": "y", "positive": []}), "at least one value"),
        (_schema_with(target={"column": "y", "positive": " 1"}), "must be a list of strings"),
        (_schema_with(target={"column": "y", "positive": [" 1"]}), "surrounding white space"),
        (_schema_with(target={"column": "age", "positive": ["1"]}), "also declared as a feature"),
        (_schema_with(sensitive=["age"]), "sensitive column 'age' is numeric"),
        (_schema_with(sensitive=["outcome"]), "sensitive column 'outcome' is the target"),
        (_schema_with(sensitive=["sex", "sex"]), "lists a column twice"),
        (_schema_with(sensitive="sex"), "'sensitive' must be a list"),
        ({"columns": SCHEMA_DICT["columns"]}, "required key(s) 'target' missing"),
        ({**SCHEMA_DICT, "version": 2}, "schema: unknown key(s) 'version'"),
    ],
)
def test_invalid_schemas_are_refused(data, message):
    with pytest.raises(SchemaError) as excinfo:
        DatasetSchema.from_dict(data)

    assert message in str(excinfo.value)


# ------------------------------------------------------------------------------------------
# Validation


def test_validate_frame_types_columns(schema):
    df = pd.DataFrame(
        {
            "age": ["31", " 40.5 ", "", "?"],
            "tsh": ["0", "1.5", None, "2"],
            "smoker": ["T", "no", "", "Yes"],
            "sex": [" F", "M", None, "?"],
            "region": ["north", "south", "east", "north"],
            "ethnicity": ["a", None, "b", "c"],
            "outcome": ["yes", "no", " yes ", "maybe"],
            "extra": ["x"] * 4,
        }
    )

    valid = validate_frame(df, schema)

    assert list(valid.columns) == ["age", "tsh", "smoker", "sex", "region", "outcome", "ethnicity"]
    np.testing.assert_array_equal(valid["age"].to_numpy(), [31.0, 40.5, np.nan, np.nan])
    np.testing.assert_array_equal(valid["tsh"].to_numpy(), [0.0, 1.5, np.nan, 2.0])
    np.testing.assert_array_equal(valid["smoker"].to_numpy(), [1.0, 0.0, np.nan, 1.0])
    assert valid["sex"].tolist() == ["F", "M", MISSING_CATEGORY, MISSING_CATEGORY]
    assert valid["ethnicity"].tolist() == ["a", MISSING_CATEGORY, "b", "c"]
    assert valid["outcome"].tolist() == ["yes", "no", "yes", "maybe"]
    pd.testing.assert_frame_equal(validate_frame(valid, schema), valid)


def test_validate_frame_accepts_typed_columns(schema):
    df = pd.DataFrame(
        {
            "age": [31, 40, None],
            "tsh": [0.0, 1.5, 2.0],
            "smoker": [True, False, True],
            "sex": ["F", "M", "F"],
            "region": ["north", "south", "east"],
            "ethnicity": ["a", "b", "c"],
            "outcome": ["yes", "no", "yes"],
        }
    )

    valid = validate_frame(df, schema)

    np.testing.assert_array_equal(valid["age"].to_numpy(), [31.0, 40.0, np.nan])
    np.testing.assert_array_equal(valid["smoker"].to_numpy(), [1.0, 0.0, 1.0])


def _frame_with(column: str, row: int, value: object) -> pd.DataFrame:
    df = raw_frame(10, seed=3)
    for name in ("age", "tsh", "region", "outcome"):  # no stray missing values in the way
        df[name] = df[name].fillna("1")
    df.loc[row - 1, column] = value
    return df


@pytest.mark.parametrize(
    ("column", "row", "value", "message"),
    [
        ("age", 3, "abc", "column 'age': value 'abc' at row 3 is not numeric"),
        ("age", 7, "inf", "column 'age': value 'inf' at row 7 is not a finite number"),
        ("tsh", 4, "-0.5", "column 'tsh': value '-0.5' at row 4 is negative"),
        ("smoker", 2, "maybe", "column 'smoker': token 'maybe' at row 2 is not a boolean"),
        ("outcome", 5, "", "target column 'outcome': missing value at row 5"),
    ],
)
def test_validation_errors_name_column_and_row(schema, column, row, value, message):
    with pytest.raises(DataValidationError) as excinfo:
        validate_frame(_frame_with(column, row, value), schema)

    assert message in str(excinfo.value)


def test_validation_counts_further_bad_values(schema):
    df = _frame_with("age", 2, "x")
    df.loc[5, "age"] = "y"

    with pytest.raises(DataValidationError, match="row 2 is not numeric \\(2 such values"):
        validate_frame(df, schema)


def test_absent_columns_are_listed(schema):
    df = raw_frame(5).drop(columns=["region", "ethnicity"])

    with pytest.raises(DataValidationError) as excinfo:
        validate_frame(df, schema)

    assert "column(s) 'region', 'ethnicity' required by the schema are missing" in str(
        excinfo.value
    )


def test_missing_policy_error_names_column_and_row():
    schema = DatasetSchema.from_dict(
        {
            "columns": [{"name": "age", "type": "numeric", "missing": "error"}],
            "target": {"column": "outcome", "positive": ["yes"]},
        }
    )
    df = pd.DataFrame({"age": ["1", "2", "?", ""], "outcome": ["yes", "no", "no", "yes"]})

    with pytest.raises(DataValidationError) as excinfo:
        validate_frame(df, schema)

    assert "column 'age': missing value at row 3 (2 missing in this column)" in str(excinfo.value)
    assert "'impute' or 'drop'" in str(excinfo.value)


def test_missing_policy_drop_removes_rows_everywhere(schema):
    df = raw_frame(200, seed=1)
    dropped = int(df["region"].isna().sum())
    assert dropped > 0

    valid = validate_frame(df, schema)
    train, test = split_holdout(df, schema, seed=0)
    stats = local_statistics(df, schema)
    data = transform(df, schema, merge_statistics([stats], schema))

    assert len(valid) == 200 - dropped
    assert len(train) + len(test) == len(valid)
    assert stats["n_rows"] == len(valid)
    assert data.X.shape[0] == len(valid)
    assert MISSING_CATEGORY not in stats["categories"]["region"]


def test_missing_policy_impute(schema):
    df = raw_frame(300, seed=2)
    fitted = merge_statistics([local_statistics(df, schema)], schema)
    valid = validate_frame(df, schema)
    names = feature_names(schema, fitted)

    data = transform(df, schema, fitted)

    age_missing = valid["age"].isna().to_numpy()
    smoker_missing = valid["smoker"].isna().to_numpy()
    sex_missing = (valid["sex"] == MISSING_CATEGORY).to_numpy()
    assert age_missing.any() and smoker_missing.any() and sex_missing.any()
    assert (data.X[age_missing, names.index("age")] == 0).all()
    assert (data.X[smoker_missing, names.index("smoker")] == 0).all()
    assert (data.X[sex_missing, names.index(f"sex={MISSING_CATEGORY}")] == 1).all()
    assert (data.groups["sex"][sex_missing] == MISSING_CATEGORY).all()


# ------------------------------------------------------------------------------------------
# Federated statistics


def test_federated_statistics_equal_pooled_statistics(schema):
    pooled = raw_frame(900, seed=4)
    site = np.random.default_rng(5).integers(0, 3, size=len(pooled))
    parts = [pooled[site == k] for k in range(3)] + [pooled.iloc[:0]]  # and an empty site

    merged = merge_statistics([local_statistics(part, schema) for part in parts], schema)

    valid = validate_frame(pooled, schema)
    age = valid["age"].dropna().to_numpy()
    tsh = np.log1p(valid["tsh"].dropna().to_numpy())
    assert merged["n_rows"] == len(valid)
    for name, values in (("age", age), ("tsh", tsh)):
        assert merged["numeric"][name]["count"] == len(values)
        assert merged["numeric"][name]["mean"] == pytest.approx(values.mean(), abs=1e-9)
        assert merged["numeric"][name]["std"] == pytest.approx(values.std(ddof=0), abs=1e-9)
    assert merged["categories"]["sex"] == sorted(set(valid["sex"]))
    assert merged["categories"]["region"] == ["east", "north", "south"]
    pooled_fit = merge_statistics([local_statistics(pooled, schema)], schema)
    assert {k: v for k, v in merged.items() if k != "numeric"} == {
        k: v for k, v in pooled_fit.items() if k != "numeric"
    }


def test_statistics_and_fitted_are_strict_json(schema):
    stats = local_statistics(raw_frame(50), schema)
    fitted = merge_statistics([stats], schema)

    assert json.loads(json.dumps(stats, allow_nan=False)) == stats
    assert json.loads(json.dumps(fitted, allow_nan=False)) == fitted
    assert fitted["schema_hash"] == schema_hash(schema)
    assert fitted["columns"] == ["age", "tsh", "smoker", "sex", "region"]


def test_constant_and_empty_columns_get_std_one(schema):
    df = raw_frame(20)
    df["age"] = "7"
    df["tsh"] = None
    df["region"] = "north"

    fitted = merge_statistics([local_statistics(df, schema)], schema)

    assert fitted["numeric"]["age"] == {"mean": 7.0, "std": 1.0, "count": 20}
    assert fitted["numeric"]["tsh"] == {"mean": 0.0, "std": 1.0, "count": 0}


def _stats_with(schema, change) -> dict:
    stats = json.loads(json.dumps(local_statistics(raw_frame(30), schema)))
    change(stats)
    return stats


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["numeric"].pop("tsh"), "'numeric' must have exactly the schema's columns"),
        (lambda s: s["categories"].update(extra=["x"]), "'categories' must have exactly"),
        (lambda s: s["numeric"]["age"].update(count=-1), "numeric column 'age': count -1"),
        (lambda s: s["numeric"]["age"].update(count=10**6), "between 0 and n_rows"),
        (lambda s: s["numeric"]["age"].update(m2=-1.0), "m2 >= 0"),
        (lambda s: s.update(n_rows=True), "'n_rows' must be an integer >= 0"),
        (lambda s: s.update(schema_hash="0" * 64), "computed for a different schema"),
        (lambda s: s.pop("categories"), "missing: ['categories']"),
        (
            lambda s: s["categories"].update(sex="F"),
            "categories of column 'sex' must be an object of value -> count",
        ),
    ],
)
def test_merge_refuses_statistics_not_matching_the_schema(schema, change, message):
    good = local_statistics(raw_frame(30, seed=9), schema)

    with pytest.raises(SchemaError) as excinfo:
        merge_statistics([good, _stats_with(schema, change)], schema)

    assert "statistics #1" in str(excinfo.value)
    assert message in str(excinfo.value)


def test_merge_needs_statistics(schema):
    with pytest.raises(SchemaError, match="non-empty list"):
        merge_statistics([], schema)


# ------------------------------------------------------------------------------------------
# Transform


def test_transform_shapes_standardisation_and_one_hot(schema):
    train = raw_frame(400, seed=6)
    fitted = merge_statistics([local_statistics(train, schema)], schema)
    names = feature_names(schema, fitted)

    data = transform(train, schema, fitted)

    valid = validate_frame(train, schema)
    assert names[:3] == ["age", "tsh", "smoker"]
    assert names[3:] == [f"sex={c}" for c in fitted["categories"]["sex"]] + [
        "region=east",
        "region=north",
        "region=south",
    ]
    assert data.X.shape == (len(valid), len(names))
    assert data.X.dtype == np.float32 and data.y.dtype == np.float32
    np.testing.assert_array_equal(data.y, (valid["outcome"] == "yes").to_numpy(np.float32))
    observed = ~valid["age"].isna().to_numpy()
    age = data.X[observed, 0].astype(np.float64)
    assert abs(age.mean()) < 1e-5 and abs(age.std() - 1) < 1e-5
    assert set(np.unique(data.X[:, 2])) <= {0.0, 1.0}
    assert (data.X[:, 3:].reshape(len(valid), -1).sum(axis=1) == 2).all()  # one per block
    assert set(data.groups) == {"sex", "ethnicity"}
    assert data.groups["ethnicity"].tolist() == valid["ethnicity"].tolist()


def test_log1p_is_applied_before_standardising(schema):
    df = raw_frame(100, seed=7)
    fitted = merge_statistics([local_statistics(df, schema)], schema)
    valid = validate_frame(df, schema)

    data = transform(df, schema, fitted)

    raw = valid["tsh"].to_numpy()
    observed = ~np.isnan(raw)
    stats = fitted["numeric"]["tsh"]
    expected = (np.log1p(raw[observed]) - stats["mean"]) / stats["std"]
    np.testing.assert_allclose(data.X[observed, 1], expected, rtol=1e-6, atol=1e-6)


def test_unseen_category_encodes_as_all_zero(schema):
    fitted = merge_statistics([local_statistics(raw_frame(100), schema)], schema)
    new = raw_frame(5, seed=8)
    new["region"] = ["north", "west", "south", "west", "east"]
    names = feature_names(schema, fitted)
    region = [i for i, n in enumerate(names) if n.startswith("region=")]

    data = transform(new, schema, fitted)

    assert data.X[:, region].sum(axis=1).tolist() == [1.0, 0.0, 1.0, 0.0, 1.0]


def test_boolean_sensitive_groups_are_normalised():
    schema = DatasetSchema.from_dict(
        {
            "columns": [{"name": "smoker", "type": "boolean"}],
            "target": {"column": "y", "negative": ["0"]},
            "sensitive": ["smoker"],
        }
    )
    df = pd.DataFrame({"smoker": ["t", "No", "", "1"], "y": ["0", "1", "0", "1"]})
    fitted = merge_statistics([local_statistics(df, schema)], schema)

    data = transform(df, schema, fitted)

    assert data.groups["smoker"].tolist() == ["true", "false", MISSING_CATEGORY, "true"]
    assert data.y.tolist() == [0.0, 1.0, 0.0, 1.0]


def test_transform_refuses_preprocessing_of_another_schema(schema):
    fitted = merge_statistics([local_statistics(raw_frame(50), schema)], schema)
    other = DatasetSchema.from_dict(dict(SCHEMA_DICT, columns=SCHEMA_DICT["columns"][:4]))

    with pytest.raises(SchemaError, match="computed for another schema"):
        transform(raw_frame(10), other, fitted)
    with pytest.raises(SchemaError, match="numeric column 'age' needs a finite mean"):
        broken = json.loads(json.dumps(fitted))
        broken["numeric"]["age"]["std"] = 0
        transform(raw_frame(10), schema, broken)


# ------------------------------------------------------------------------------------------
# Holdout split


def test_split_is_deterministic_stratified_and_complete(schema):
    df = raw_frame(500, seed=10)
    valid = validate_frame(df, schema)
    positives = int((valid["outcome"] == "yes").sum())
    negatives = len(valid) - positives

    train, test = split_holdout(df, schema, test_fraction=0.2, seed=3)
    train_again, test_again = split_holdout(df, schema, test_fraction=0.2, seed=3)
    _, test_other = split_holdout(df, schema, test_fraction=0.2, seed=4)

    assert train.index.equals(train_again.index) and test.index.equals(test_again.index)
    assert not test.index.equals(test_other.index)
    assert sorted([*train.index, *test.index]) == sorted(valid.index)
    assert int((test["outcome"] == "yes").sum()) == math.floor(positives * 0.2 + 0.5)
    assert int((test["outcome"] == "no").sum()) == math.floor(negatives * 0.2 + 0.5)
    assert train.index.is_monotonic_increasing and test.index.is_monotonic_increasing
    pd.testing.assert_frame_equal(test, valid.loc[test.index])


def test_split_keeps_a_training_row_per_class(schema):
    df = raw_frame(7, seed=11)
    df["outcome"] = ["yes", "no", "no", "no", "no", "no", "no"]
    df["region"] = "north"

    train, test = split_holdout(df, schema, test_fraction=0.9, seed=0)

    assert (train["outcome"] == "yes").sum() == 1
    assert (train["outcome"] == "no").sum() == 1
    assert len(test) == 5


def test_split_with_zero_test_fraction_holds_nothing_out(schema):
    train, test = split_holdout(raw_frame(40), schema, test_fraction=0.0)

    assert len(test) == 0 and len(train) > 0


@pytest.mark.parametrize(
    ("kwargs"), [{"test_fraction": 1.0}, {"test_fraction": -0.1}, {"seed": -1}]
)
def test_split_refuses_bad_arguments(schema, kwargs):
    with pytest.raises(ValueError):
        split_holdout(raw_frame(10), schema, **kwargs)


# ------------------------------------------------------------------------------------------
# Loading


def test_load_table_reads_csv_as_strings_with_missing_tokens(tmp_path, schema):
    path = tmp_path / "site.csv"
    path.write_text("age,flag,code\n007,t,?\n,f,A\n12.5,,01\n")

    df = load_table(path)

    assert df["age"].tolist()[0] == "007"  # strings: leading zeros survive
    assert df["code"].tolist()[2] == "01"
    assert df.isna().to_numpy().tolist() == [
        [False, False, True],
        [True, False, False],
        [False, True, False],
    ]


def test_load_table_reads_parquet_and_refuses_other_files(tmp_path, schema):
    df = raw_frame(30)
    df["age"] = pd.to_numeric(df["age"])
    df.to_parquet(tmp_path / "site.parquet")

    loaded = load_table(tmp_path / "site.parquet")

    pd.testing.assert_frame_equal(
        validate_frame(loaded, schema), validate_frame(df, schema), check_dtype=False
    )
    with pytest.raises(ValueError, match="use a .csv or .parquet file"):
        load_table(tmp_path / "site.xlsx")
