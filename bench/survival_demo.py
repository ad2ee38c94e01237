"""Time the survival demo end to end and check its bars against lifelines; prints a table.

Runs `manage.py demo --scenario survival --no-serve --json` (real server, ten real agent
processes, four governed analysis runs) in a fresh QUORUM_HOME, reports the wall time of the
whole command and the demo's own `seconds`, and the largest differences from lifelines on the
pooled rows: Kaplan-Meier survival and Greenwood interval (bar 1e-9), log-rank statistic and p
(1e-9), Cox coefficients and standard errors stratified by silo and unstratified (1e-6).

    .venv/bin/python bench/survival_demo.py [--repeat 1]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
from lifelines import CoxPHFitter, KaplanMeierFitter
from lifelines.statistics import logrank_test

ROOT = Path(__file__).resolve().parents[1]
COVARIATES = ["age", "sex", "ph.ecog"]


def run_demo() -> dict:
    """Run the demo once in a fresh home; its JSON line plus the measured wall time."""
    with tempfile.TemporaryDirectory(prefix="quorum-bench-") as home:
        env = {**os.environ, "QUORUM_HOME": home}
        env.pop("DATABASE_URL", None)
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "manage.py", "demo", "--scenario", "survival", "--no-serve", "--json"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"demo failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = wall
    return result


def differences(demo: dict) -> dict[str, float]:
    """The largest absolute differences from lifelines on the pooled rows."""
    lung = pd.read_csv(ROOT / "federation" / "demo" / "data" / "lung.csv")
    silo_of = {code: silo for silo, codes in demo["sites"].items() for code in codes}
    pooled = lung[lung["inst"].isin(list(silo_of))]
    pooled = pooled.assign(silo=pooled["inst"].map(silo_of))
    km = 0.0
    for group, curve in demo["kaplan_meier"].items():
        rows = pooled[pooled["sex"] == int(group)]
        fitter = KaplanMeierFitter().fit(rows["time"], rows["status"])
        interval = fitter.confidence_interval_.loc[curve["time"]]
        for ours, reference in (
            (curve["survival"], fitter.survival_function_.loc[curve["time"]].iloc[:, 0]),
            (curve["ci_lower"], interval.iloc[:, 0]),
            (curve["ci_upper"], interval.iloc[:, 1]),
        ):
            km = max(km, float(abs(pd.Series(ours, index=reference.index) - reference).max()))
    men, women = pooled[pooled["sex"] == 1], pooled[pooled["sex"] == 2]
    test = logrank_test(men["time"], women["time"], men["status"], women["status"])
    out = {
        "kaplan_meier": km,
        "logrank": max(
            abs(demo["logrank"]["statistic"] - test.test_statistic),
            abs(demo["logrank"]["p_value"] - test.p_value),
        ),
    }
    complete = pooled[["time", "status", "silo", *COVARIATES]].dropna()
    for model in ("stratified", "unstratified"):
        reference = CoxPHFitter().fit(
            complete if model == "stratified" else complete.drop(columns="silo"),
            "time",
            "status",
            strata=["silo"] if model == "stratified" else None,
            fit_options={"precision": 1e-12, "r_precision": 1e-14},
        )
        ours = demo["cox"][model]
        out[f"cox_{model}"] = max(
            max(abs(ours["coef"][n] - reference.params_[n]) for n in COVARIATES),
            max(abs(ours["se"][n] - reference.standard_errors_[n]) for n in COVARIATES),
        )
    return out


def main() -> None:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()
    bars = {"kaplan_meier": 1e-9, "logrank": 1e-9, "cox_stratified": 1e-6, "cox_unstratified": 1e-6}
    print(f"{'run':>3}  {'wall s':>7}  {'demo s':>7}  " + "  ".join(f"{k:>16}" for k in bars))
    for index in range(args.repeat):
        demo = run_demo()
        diffs = differences(demo)
        print(
            f"{index:>3}  {demo['wall_seconds']:>7.1f}  {demo['seconds']:>7.1f}  "
            + "  ".join(f"{diffs[k]:>16.2e}" for k in bars)
        )
        failed = [k for k, bar in bars.items() if not diffs[k] <= bar]
        if failed or demo["wall_seconds"] >= 120:
            print(f"bar missed: {failed or 'wall time >= 120 s'}")
    print("bars: wall < 120 s on 2 cores; " + ", ".join(f"{k} <= {v:g}" for k, v in bars.items()))


if __name__ == "__main__":
    main()
