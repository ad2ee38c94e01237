"""`manage.py demo --scenario survival` as a user runs it (issue 16): real server and site agents,
four governed analysis runs, and its JSON line equal to lifelines on the pooled rows (Kaplan-Meier,
Greenwood intervals and the log-rank test to 1e-9, Cox coefficients and standard errors to 1e-6)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
COVARIATES = ["age", "sex", "ph.ecog"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    env = {**os.environ, "QUORUM_HOME": str(tmp_path_factory.mktemp("home"))}
    env.pop("DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "manage.py", "demo", "--scenario", "survival", "--no-serve", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(proc.stdout)
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "_stdout": proc.stdout}


@pytest.fixture(scope="module")
def pooled(demo: dict) -> pd.DataFrame:
    """The rows of every silo pooled, with the silo of each (the demo ships lung.csv)."""
    lung = pd.read_csv(ROOT / "federation" / "demo" / "data" / "lung.csv")
    silo_of = {code: silo for silo, codes in demo["sites"].items() for code in codes}
    rows = lung[lung["inst"].isin(list(silo_of))]
    return rows.assign(silo=rows["inst"].map(silo_of))


def test_the_json_line_has_the_issue_s_format(demo: dict) -> None:
    assert set(demo) - {"_stdout"} == {
        "scenario",
        "sites",
        "kaplan_meier",
        "logrank",
        "cox",
        "seconds",
    }
    assert demo["scenario"] == "survival" and demo["seconds"] > 0
    codes = sorted(code for codes in demo["sites"].values() for code in codes)
    assert codes == sorted({*range(1, 17), 21, 22, 26, 32, 33} - {8, 9, 14}) and len(codes) == 18
    assert set(demo["kaplan_meier"]) == {"1", "2"}
    for model in ("stratified", "unstratified"):
        assert set(demo["cox"][model]) == {"coef", "se"}
        assert list(demo["cox"][model]["coef"]) == COVARIATES


def test_kaplan_meier_and_log_rank_equal_lifelines(demo: dict, pooled: pd.DataFrame) -> None:
    for group, curve in demo["kaplan_meier"].items():
        rows = pooled[pooled["sex"] == int(group)]
        fitter = KaplanMeierFitter().fit(rows["time"], rows["status"])
        times = curve["time"]
        interval = fitter.confidence_interval_.loc[times]
        for ours, reference in (
            (curve["survival"], fitter.survival_function_.loc[times].iloc[:, 0]),
            (curve["ci_lower"], interval.iloc[:, 0]),
            (curve["ci_upper"], interval.iloc[:, 1]),
        ):
            np.testing.assert_allclose(ours, reference.to_numpy(), rtol=0, atol=1e-9)
    men, women = pooled[pooled["sex"] == 1], pooled[pooled["sex"] == 2]
    test = logrank_test(men["time"], women["time"], men["status"], women["status"])
    assert abs(demo["logrank"]["statistic"] - test.test_statistic) <= 1e-9
    assert abs(demo["logrank"]["p_value"] - test.p_value) <= 1e-9


def test_the_cohort_counts_show_their_suppression(demo: dict) -> None:
    # sex 1 holds the only patient with ECOG 3 and the only one without a score: withheld, with
    # complements, and the four runs are real governed runs of the server
    lines = demo["_stdout"].splitlines()
    row = next(line.split() for line in lines if line.split()[:1] == ["1"])
    assert row[4:6] == ["-", "-"] and "-" in row[1:4]
    assert any("below the minimum cell count of 5" in line for line in lines)
    assert sum("released after" in line for line in lines) == 4


@pytest.mark.parametrize("model", ["stratified", "unstratified"])
def test_cox_equals_lifelines_on_the_complete_cases(
    demo: dict, pooled: pd.DataFrame, model: str
) -> None:
    complete = pooled[["time", "status", "silo", *COVARIATES]].dropna()
    stratified = model == "stratified"
    reference = CoxPHFitter().fit(
        complete if stratified else complete.drop(columns="silo"),
        "time",
        "status",
        strata=["silo"] if stratified else None,
        fit_options={"precision": 1e-12, "r_precision": 1e-14},
    )
    for name in COVARIATES:
        assert abs(demo["cox"][model]["coef"][name] - reference.params_[name]) <= 1e-6
        assert abs(demo["cox"][model]["se"][name] - reference.standard_errors_[name]) <= 1e-6
