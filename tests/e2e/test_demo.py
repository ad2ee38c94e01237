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


FINANCE_SITES = {"northgate", "riverside", "hearthstone", "meridian"}
LARGEST_TWO = {"northgate", "riverside"}  # 337 and 292 rows: what --sites 2 keeps


@pytest.fixture(scope="module")
def finance_twice(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    """The finance demo run twice in one home: first as it comes (four sites), then again with
    another seed, sample-level DP and its two largest sites. The two tests below share the two
    runs (a demo run costs 15 to 50 s): the second run must replace the first's leftovers, and
    its privacy block is the DP demo's."""
    home = tmp_path_factory.mktemp("finance")
    first = run_demo(home, "--scenario", "finance", "--rounds", "2")
    second = run_demo(
        home,
        "--scenario",
        "finance",
        "--rounds",
        "2",
        "--seed",
        "1",
        "--sites",
        "2",
        "--dp",
        "sample",
        "--target-epsilon",
        "2",
    )
    return home, first, second


def test_finance_demo_runs_twice_and_reports_every_model(
    finance_twice: tuple[Path, dict, dict],
) -> None:
    home, first, second = finance_twice

    for result, sites in ((first, FINANCE_SITES), (second, LARGEST_TWO)):
        assert result["scenario"] == "finance" and result["rounds"] == 2
        assert set(result["local_only"]) == sites
        for metrics in (result["federated"], result["centralized"], *result["local_only"].values()):
            assert 0.0 <= metrics["auc"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
        assert result["seconds"] > 0
    # The second run replaced the first demo consortium instead of failing on its leftovers,
    # and the first run's other two site folders are gone.
    assert second["run"] == first["run"] + 1
    demo = home / "demo" / "finance"
    assert sorted(p.name for p in (demo / "sites").iterdir()) == sorted(LARGEST_TWO)
    # Each site pins its own steward's key and trained on the steward's signed approval, not on
    # the server's word; the steward's private key is kept apart, readable by its owner only.
    for site in sorted(LARGEST_TWO):
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


def test_dp_demo_spends_at_most_the_target_and_the_ledger_agrees(
    finance_twice: tuple[Path, dict, dict],
) -> None:
    _, _, result = finance_twice

    privacy = result["privacy"]
    assert privacy["mode"] == "sample" and set(privacy["silos"]) == set(result["local_only"])
    assert set(privacy["silos"]) == LARGEST_TWO
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
