"""An evaluation plan through the `quorum` command line against a live server: validated
locally, its results (pooled metrics and calibration curve) printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.governance_factories import governed_consortium
from tests.integration.test_evaluation_plans import (
    completed_run,
    evaluation_spec,
    run_evaluation_plan,
)
from tests.integration.test_quorum_cli import Cli, write

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def cli(capsys: Any, monkeypatch: pytest.MonkeyPatch, live_server: Any, tmp_path: Path) -> Cli:
    monkeypatch.setenv("QUORUM_CONFIG", str(tmp_path / "quorum" / "config.json"))
    return Cli(capsys, monkeypatch, live_server.url)


def test_an_evaluation_plan_is_validated_and_its_results_printed(cli: Cli, tmp_path: Path) -> None:
    g = governed_consortium(3)
    source, files = completed_run(g, tmp_path)
    spec = evaluation_spec(source)
    cli.as_user(g.scientists[0])

    code, out, _ = cli("plan", "validate", write(tmp_path / "eval.json", spec))
    assert code == 0, out
    bad = {**spec, "training": {"rounds": 1}}
    code, out, err = cli("plan", "validate", write(tmp_path / "bad.json", bad))
    assert code != 0 and "unknown key 'training' in an evaluation plan" in out + err

    run = run_evaluation_plan(g, spec, files)
    code, out, _ = cli("run", "results", str(run.pk))
    assert code == 0
    assert f"evaluation (model v2 of run {source.pk}, each site's held-out split" in out
    assert "calibration (expected calibration error" in out and "0.9-1" in out
    code, out, _ = cli("run", "results", str(run.pk), "--format", "json")
    final = json.loads(out)["final_evaluation"]
    assert final["metrics"] == run.evaluation["metrics"]
    assert final["calibration"]["rows"] == run.evaluation["calibration"]["rows"]
