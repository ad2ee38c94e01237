"""Schema inference and the per-column check (fedcore.schema_inference), and the missing-value
tokens they share with loading and validation (fedcore.tabular)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedcore import tabular
from fedcore.schema_inference import (
    InferenceError,
    check_frame,
    csv_header_problem,
    propose_schema,
)
from federation.demo import scenarios


def mixed_frame(n: int = 200, seed: int = 0) -> pd.DataFrame:
    """A raw table (strings, as load_table reads a CSV) with one column of each kind."""
    rng = np.random.default_rng(seed)
    age = rng.integers(18, 90, n).astype(str).astype(object)
    age[3] = ""  # missing
    income = np.round(rng.lognormal(10, 1.2, n), 2).astype(str)
    # 3 common values and 2 rare ones (4 and 2 rows): only the common ones may be named.
    region = np.array(["north"] * 80 + ["south"] * 70 + ["east"] * 44 + ["isle"] * 4 + ["x"] * 2)
    rng.shuffle(region)
    frame = pd.DataFrame(
        {
            "record_id": [str(100000 + i) for i in range(n)],
            "age": age,
            "Gender": rng.choice(["F", "M"], n),
            "smoker": rng.choice(["yes", "no", "Yes"], n),
            "income": income,
            "region": region,
            "site": ["st-mary"] * n,
            "notes": [f"free text {i}" for i in range(n)],
            "nothing": [""] * n,
            "outcome": rng.choice(["healthy", "sick"], n, p=[0.7, 0.3]),
        }
    )
    return frame.replace({"": np.nan})


def by_name(proposal):
    return {finding.name: finding for finding in proposal.columns}


def test_each_column_gets_a_type_or_a_reason_to_be_left_out() -> None:
    frame = mixed_frame()

    proposal = propose_schema(frame, target="outcome", sensitive=["Gender"])

    found = by_name(proposal)
    assert {name: f.role for name, f in found.items()} == {
        "record_id": "ignored",
        "age": "feature",
        "Gender": "feature",
        "smoker": "feature",
        "income": "feature",
        "region": "feature",
        "site": "ignored",
        "notes": "ignored",
        "nothing": "ignored",
        "outcome": "target",
    }
    assert "record identifier" in found["record_id"].note
    assert "one value only" in found["site"].note
    assert "every value is distinct" in found["notes"].note
    assert "every value is missing" in found["nothing"].note
    types = {c.name: c.type for c in proposal.schema.columns}
    assert types == {
        "age": "numeric",
        "Gender": "categorical",
        "smoker": "boolean",
        "income": "numeric",
        "region": "categorical",
    }
    assert found["age"].missing == 1
    # The lognormal income is right-skewed and non-negative: log1p proposed, with the reason.
    assert found["income"].transform == "log1p" and "skewness" in found["income"].note
    assert found["age"].transform == "none"
    assert proposal.schema.sensitive == ("Gender",)
    assert not proposal.target_guessed


def test_only_values_with_enough_rows_are_declared_and_the_rest_is_other() -> None:
    frame = mixed_frame()

    proposal = propose_schema(frame, target="outcome", min_category_rows=10)
    region = next(c for c in proposal.schema.columns if c.name == "region")
    assert region.categories == ("east", "north", "south")
    finding = by_name(proposal)["region"]
    assert finding.other_rows == 6 and "6 rows with rarer values encode as 'other'" in finding.note

    # With a floor of 3 the 4-row value is named too, never the 2-row one.
    lower = propose_schema(frame, target="outcome", min_category_rows=3)
    region = next(c for c in lower.schema.columns if c.name == "region")
    assert region.categories == ("east", "isle", "north", "south")

    # The rare rows validate and encode as all-zero ("other"), as for an unseen category.
    fitted = tabular.merge_statistics(
        [tabular.local_statistics(frame, proposal.schema)], proposal.schema
    )
    data = tabular.transform(frame, proposal.schema, fitted)
    names = tabular.feature_names(proposal.schema, fitted)
    region_cols = [i for i, name in enumerate(names) if name.startswith("region=")]
    valid = tabular.validate_frame(frame, proposal.schema)
    rare = valid["region"].isin(["isle", "x"]).to_numpy()
    assert rare.sum() == 6
    assert not data.X[rare][:, region_cols].any()
    assert (data.X[~rare][:, region_cols].sum(axis=1) == 1).all()


def test_a_text_column_without_any_common_value_is_left_out() -> None:
    frame = pd.DataFrame(
        {
            "code": [f"c{i % 30}" for i in range(60)],
            "x": [i % 7 for i in range(60)],
            "y": ["a", "b"] * 30,
        }
    ).astype(str)

    proposal = propose_schema(frame, target="y", min_category_rows=10)

    assert by_name(proposal)["code"].role == "ignored"
    assert "none held by 10 rows or more" in by_name(proposal)["code"].note


def test_a_value_that_may_not_be_a_category_name_is_never_declared() -> None:
    frame = pd.DataFrame(
        {
            "kind": ["a<b"] * 20 + ["plain"] * 20,
            "x": [i % 7 for i in range(40)],
            "y": ["0", "1"] * 20,
        }
    ).astype(str)

    proposal = propose_schema(frame, target="y")

    kind = next(c for c in proposal.schema.columns if c.name == "kind")
    assert kind.categories == ("plain",)
    assert "not allowed as a category name" in by_name(proposal)["kind"].note


def test_a_mostly_numeric_column_points_at_the_first_bad_value() -> None:
    values = [str(i) for i in range(40)]
    values[17] = "unknown"
    frame = pd.DataFrame({"dose": values, "x": ["a", "b"] * 20, "y": ["0", "1"] * 20})

    proposal = propose_schema(frame, target="y")

    note = by_name(proposal)["dose"].note
    assert "1 of 40 values are not (first at row 18: 'unknown')" in note


def test_the_target_guess_is_marked_and_labels_follow_the_values() -> None:
    frame = mixed_frame()

    guessed = propose_schema(frame)
    assert guessed.target_guessed
    assert guessed.schema.target.column == "outcome"
    assert "guessed from its name 'outcome'" in guessed.target_note
    # Two values that are not booleans: label 1 is the rarer one.
    assert guessed.schema.target.positive == ("sick",)

    booleans = frame.assign(outcome=np.where(frame["outcome"] == "sick", "yes", "no"))
    assert propose_schema(booleans, target="outcome").schema.target.positive == ("yes",)

    many = frame.assign(outcome=["-"] * 150 + ["A"] * 30 + ["B"] * 20)
    target = propose_schema(many, target="outcome").schema.target
    assert target.positive is None and target.negative == ("-",)


def test_without_a_named_target_the_last_column_with_few_values_is_guessed() -> None:
    frame = pd.DataFrame({"x": [str(i % 9) for i in range(30)], "z": ["p", "q", "r"] * 10})

    proposal = propose_schema(frame)

    assert proposal.target_guessed and proposal.schema.target.column == "z"
    assert "the last column with 2 to 20 values" in proposal.target_note


def test_unusable_options_are_refused_with_what_to_do() -> None:
    frame = mixed_frame()

    with pytest.raises(InferenceError, match="column 'nope' is not in the data; the columns are"):
        propose_schema(frame, target="nope")
    with pytest.raises(InferenceError, match="sensitive column 'age' is numeric.*age_band"):
        propose_schema(frame, target="outcome", sensitive=["age"])
    with pytest.raises(InferenceError, match="has only the value 'st-mary'"):
        propose_schema(frame, target="site")
    with pytest.raises(InferenceError, match="min_category_rows must be >= 1"):
        propose_schema(frame, target="outcome", min_category_rows=0)
    with pytest.raises(InferenceError, match="no column is usable as a feature"):
        propose_schema(frame[["record_id", "outcome"]], target="outcome")


def test_rows_without_a_label_are_warned_about_with_their_row() -> None:
    frame = mixed_frame()
    frame.loc[5, "outcome"] = np.nan

    proposal = propose_schema(frame, target="outcome")

    assert proposal.warnings == (
        "target 'outcome': 1 rows have no label (first at row 6, CSV line 7); training "
        "refuses them: fill the labels in or remove those rows",
    )


def test_sensitive_attributes_are_suggested_by_name_but_not_added() -> None:
    frame = mixed_frame().assign(age_band="40-49", mortgage="1", page="2")

    proposal = propose_schema(frame, target="outcome")

    assert proposal.schema.sensitive == ()
    assert proposal.suggested_sensitive == ("age", "Gender", "age_band")


def test_an_ignored_column_given_as_sensitive_is_a_group_column_only() -> None:
    frame = mixed_frame().assign(ward=["A"] * 200)

    proposal = propose_schema(frame, target="outcome", sensitive=["ward"])

    assert by_name(proposal)["ward"].role == "sensitive"
    assert "ward" not in {c.name for c in proposal.schema.columns}
    assert proposal.schema.sensitive == ("ward",)
    tabular.validate_frame(frame, proposal.schema)  # the group column is read


@pytest.mark.parametrize("site", sorted(scenarios.THYROID_SITES))
def test_every_demo_site_gets_a_schema_its_own_data_validates_against(site: str) -> None:
    frame = scenarios.healthcare().sites[site]

    proposal = propose_schema(frame, target="target", sensitive=["sex"])

    valid = tabular.validate_frame(frame, proposal.schema)
    assert len(valid) == len(frame)
    assert proposal.schema.target.negative == ("-",)
    assert not [f for f in check_frame(frame, proposal.schema) if f.level == "error"]
    assert tabular.DatasetSchema.from_dict(proposal.schema.to_dict()) == proposal.schema


# --------------------------------------------------------------------------------------------
# Missing values: one set of tokens for reading, validating and inferring


def test_every_missing_token_reads_as_missing_and_look_alikes_do_not(tmp_path: Path) -> None:
    tokens = [t for t in tabular.MISSING_TOKENS if t]
    kept = ["-", "0", "n.a.", "unknown", "none", "Nil"]
    cells = [*tokens, *(f"  {t} " for t in tokens), *kept]
    path = tmp_path / "t.csv"
    lines = "".join(f'"{cell}",{i % 2}\n' for i, cell in enumerate(cells))
    path.write_text("v,y\n" + lines + ",1\n")

    raw = tabular.load_table(path)
    missing = tabular.missing_mask(raw["v"])

    assert missing.tolist() == [True] * (2 * len(tokens)) + [False] * len(kept) + [True]
    schema = tabular.DatasetSchema.from_dict(
        {
            "columns": [{"name": "v", "type": "categorical"}],
            "target": {"column": "y", "positive": ["1"]},
        }
    )
    valid = tabular.validate_frame(raw, schema)
    assert (valid["v"] == tabular.MISSING_CATEGORY).sum() == 2 * len(tokens) + 1
    proposal = propose_schema(raw, target="y", min_category_rows=1)
    assert by_name(proposal)["v"].missing == 2 * len(tokens) + 1


def test_the_tokens_cover_what_pandas_reads_as_missing_by_default(tmp_path: Path) -> None:
    # Pinned so a pandas upgrade cannot change what is missing: every string pandas' default
    # reading turns into NaN is in MISSING_TOKENS.
    path = tmp_path / "t.csv"
    candidates = ["NA", "N/A", "null", "NULL", "None", "nan", "NaN", "#N/A", "<NA>", "-nan"]
    path.write_text("v\n" + "\n".join(f'"{c}"' for c in candidates) + "\n")
    default = pd.read_csv(path, dtype=str)
    assert default["v"].isna().all()
    assert set(candidates) <= set(tabular.MISSING_TOKENS)


# --------------------------------------------------------------------------------------------
# The per-column check


def test_check_reports_every_faulty_column_at_once_with_its_first_row() -> None:
    schema = tabular.DatasetSchema.from_dict(
        {
            "columns": [
                {"name": "age", "type": "numeric"},
                {"name": "sex", "type": "categorical", "categories": ["F"]},
                {"name": "smoker", "type": "boolean", "missing": "error"},
                {"name": "bmi", "type": "numeric"},
            ],
            "target": {"column": "y", "positive": ["1"]},
            "sensitive": ["sex"],
        }
    )
    frame = pd.DataFrame(
        {
            "age": ["50", "abc", "61"],
            "sex": ["F", "M", None],
            "smoker": ["yes", "no", None],
            "y": ["1", "0", None],
            "extra": ["a", "b", "c"],
        }
    )

    findings = {f.column: f for f in check_frame(frame, schema)}

    assert findings["age"].level == "error"
    assert "value 'abc' at row 2 is not numeric" in findings["age"].message
    assert findings["sex"].level == "warning" and findings["sex"].role == "feature, sensitive"
    assert "1 rows hold a value not in 'categories'" in findings["sex"].message
    assert findings["smoker"].level == "error"
    assert "first missing at row 3" in findings["smoker"].message
    assert findings["bmi"].level == "error" and "not in the data" in findings["bmi"].message
    assert findings["y"].level == "error" and "first at row 3" in findings["y"].message
    assert (findings["extra"].role, findings["extra"].level) == ("unused", "ok")


def test_a_clean_table_has_no_error_and_validates() -> None:
    frame = mixed_frame()
    proposal = propose_schema(frame, target="outcome")

    findings = check_frame(frame, proposal.schema)

    assert not [f for f in findings if f.level == "error"]
    assert {f.column for f in findings} == set(frame.columns)
    tabular.validate_frame(frame, proposal.schema)


def test_a_repeated_header_name_is_named_with_its_line(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("a,b,a\n1,2,3\n")
    assert csv_header_problem(path) == (
        "line 1: column name(s) 'a' appear more than once in the header; every column needs "
        "its own name"
    )
    path.write_text("a,b\n1,2\n")
    assert csv_header_problem(path) is None
    path.write_text("")
    assert "the file is empty" in (csv_header_problem(path) or "")


def test_the_documented_missing_tokens_are_the_ones_in_the_code() -> None:
    page = (Path(__file__).resolve().parents[2] / "docs" / "site-onboarding.md").read_text()
    section = page.split("## Missing values", 1)[1]
    block = section.split("```", 2)[1]
    # Tokens are separated by two spaces ("#N/A N/A" holds one).
    documented = {token for line in block.splitlines() for token in line.split("  ") if token}
    assert documented == {"(empty)", *(t for t in tabular.MISSING_TOKENS if t)}


def test_a_float_written_flag_is_a_boolean_that_training_reads(tmp_path: Path) -> None:
    # UCI's Cleveland file writes sex as 1.0/0.0, the other hospitals as 1/0: both are booleans.
    path = tmp_path / "cleveland.csv"
    path.write_text("age,sex,num\n" + "".join(f"{50 + i},{i % 2}.0,{i % 3}\n" for i in range(40)))
    frame = tabular.load_table(path)

    proposal = propose_schema(frame, target="num", sensitive=["sex"])

    column = next(c for c in proposal.schema.columns if c.name == "sex")
    assert column.type == "boolean" and tuple(proposal.schema.sensitive) == ("sex",)
    values, missing = tabular.parse_column(frame["sex"], column)
    assert values.tolist() == [float(i % 2) for i in range(40)] and not missing.any()
