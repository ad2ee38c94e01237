"""`manage.py demo` as a user runs it: a fresh home, real server and agents, JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def run_demo(home: Path, *args: str) -> dict:
    env = {**os.environ, "QUORUM_HOME": str(home)}
    env.pop("DATABASE_URL", None)
    proc = subprocess.run(
        [sys.executable, "manage.py", "demo", "--no-serve", "--json", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_finance_demo_runs_twice_and_reports_every_model(tmp_path: Path) -> None:
    first = run_demo(tmp_path, "--scenario", "finance", "--rounds", "2")
    second = run_demo(tmp_path, "--scenario", "finance", "--rounds", "2", "--seed", "1")

    for result in (first, second):
        assert result["scenario"] == "finance" and result["rounds"] == 2
        assert set(result["local_only"]) == {"northgate", "riverside", "hearthstone", "meridian"}
        for metrics in (result["federated"], result["centralized"], *result["local_only"].values()):
            assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
        assert result["seconds"] > 0
    # The second run replaced the first demo consortium instead of failing on its leftovers.
    assert second["run"] == first["run"] + 1
    assert sorted(p.name for p in (tmp_path / "demo" / "finance" / "sites").iterdir()) == [
        "hearthstone",
        "meridian",
        "northgate",
        "riverside",
    ]
    # Each site pins its own steward's key and trained on the steward's signed approval, not on
    # the server's word; the steward's private key is kept apart, readable by its owner only.
    demo = tmp_path / "demo" / "finance"
    for site in ("hearthstone", "meridian", "northgate", "riverside"):
        assert 'steward_keys = ["ed25519:' in (demo / "sites" / site / "site.toml").read_text()
        assert "trusting the server's word" not in (demo / "sites" / site / "agent.log").read_text()
        assert (demo / "stewards" / f"steward-{site}.pem").stat().st_mode & 0o077 == 0


def test_demo_refuses_bad_flags_clearly(tmp_path: Path) -> None:
    env = {**os.environ, "QUORUM_HOME": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "manage.py", "demo", "--rounds", "0", "--no-serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "--rounds must be at least 1" in proc.stderr


def test_dp_demo_spends_at_most_the_target_and_the_ledger_agrees(tmp_path: Path) -> None:
    result = run_demo(
        tmp_path,
        "--scenario",
        "finance",
        "--rounds",
        "2",
        "--dp",
        "sample",
        "--target-epsilon",
        "2",
    )

    privacy = result["privacy"]
    assert privacy["mode"] == "sample" and set(privacy["silos"]) == set(result["local_only"])
    for row in privacy["silos"].values():
        assert 0 < row["reported"] <= 2.0  # what each agent reported after the last round
        assert row["ledger"] == pytest.approx(row["accountant"], rel=1e-9)
        assert row["ledger"] == pytest.approx(row["reported"], rel=1e-6)
    # Budgets are 1.2 x the target: a second run of the same plan cannot be approved.
    assert privacy["second_run"].startswith("cannot be approved")


@pytest.mark.parametrize(
    ("scenario", "task", "figures", "sites"),
    [
        ("cardiology", "multiclass", ("accuracy", "macro_f1"), 4),
        ("progression", "regression", ("rmse", "mae", "r2"), 4),
    ],
)
def test_a_task_demo_reports_the_tasks_figures_for_every_model(
    tmp_path: Path, scenario: str, task: str, figures: tuple[str, ...], sites: int
) -> None:
    result = run_demo(tmp_path, "--scenario", scenario, "--rounds", "2")

    assert result["scenario"] == scenario and result["task"] == task
    assert len(result["local_only"]) == sites
    for metrics in (result["federated"], result["centralized"], *result["local_only"].values()):
        assert set(metrics) == set(figures)
    # the run's own final evaluation, pooled from the sites' sums, is the federated model's
    for name in figures:
        assert result["final_evaluation"][name] == pytest.approx(
            result["federated"][name], abs=1e-6
        )
