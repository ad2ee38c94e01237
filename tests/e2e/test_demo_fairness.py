"""`manage.py demo --fairness-mitigation KIND` as a user runs it: real server and agents, the
plan's mitigation applied, and the --json line's ``fairness`` block for the final model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.test_demo import ROOT, run_demo

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize(
    ("scenario", "kind"), [("finance", "constraint"), ("healthcare", "postprocess")]
)
def test_the_demo_mitigates_and_reports_the_final_models_disparities(
    tmp_path: Path, scenario: str, kind: str
) -> None:
    args = ["--scenario", scenario, "--rounds", "2", "--fairness-mitigation", kind]
    if scenario == "healthcare":
        args += ["--sites", "3", "--max-rows", "400"]
    result = run_demo(tmp_path, *args)

    fairness = result["fairness"]
    assert fairness["attribute"] == "sex" and fairness["limit"] == 0.1
    assert fairness["mitigation"] == kind
    for metric in ("demographic_parity_difference", "equalized_odds_difference"):
        assert 0.0 <= fairness[metric] <= 1.0
    if kind == "postprocess":  # the thresholded decisions meet demographic parity exactly
        assert fairness["decisions"] == "the final model's group thresholds (postprocess)"
        assert fairness["demographic_parity_difference"] == pytest.approx(0.0, abs=1e-9)
        # rows "held_out" (the default): the thresholds were chosen on the rows they are
        # measured on, and the line says so
        assert fairness["in_sample"] is True and "in sample" in fairness["in_sample_note"]
        assert set(fairness["unthresholded"]) == {
            "demographic_parity_difference",
            "equalized_odds_difference",
        }
    else:
        assert fairness["decisions"] == "the final model at 0.5"
        log = (tmp_path / "demo" / scenario / "sites" / "northgate" / "agent.log").read_text()
        assert "Traceback" not in log


def test_an_unknown_mitigation_is_refused_by_the_flag(tmp_path: Path) -> None:
    env = {**os.environ, "QUORUM_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "manage.py", "demo", "--no-serve", "--fairness-mitigation", "magic"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--fairness-mitigation: invalid choice: 'magic'" in proc.stderr
    assert "reweighing" in proc.stderr and "constraint" in proc.stderr
