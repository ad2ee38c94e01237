"""An evaluation plan through the `quorum` command line against a live server: validated
locally, its results (pooled metrics and calibration curve) printed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from federation.models import UploadedModel
from tests.factories import SCHEMA
from tests.governance_factories import governed_consortium
from tests.integration.test_evaluation_plans import (
    completed_run,
    evaluation_spec,
    run_evaluation_plan,
)
from tests.integration.test_final_evaluation import site_frame
from tests.integration.test_quorum_cli import Cli, write
from tests.uploaded_models import LR, fit_logistic_regression

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


def test_a_model_is_uploaded_listed_and_evaluated_through_the_cli(cli: Cli, tmp_path: Path) -> None:
    g = governed_consortium(3)
    frames = [site_frame(i) for i in range(3)]
    fitted, weights = fit_logistic_regression(frames, SCHEMA)
    (tmp_path / "model.safetensors").write_bytes(weights)
    (tmp_path / "model.pt").write_bytes(b"\x80\x04]\x94.")  # a pickle, as torch.save's old form
    files = {}
    for silo, frame in zip(g.silos, frames, strict=True):
        files[silo.pk] = tmp_path / f"{silo.name}.csv"
        frame.to_csv(files[silo.pk], index=False)
    args = [
        "model",
        "upload",
        "--name",
        "Partner model",
        "--model",
        write(tmp_path / "model.json", LR),
        "--schema",
        write(tmp_path / "schema.json", SCHEMA),
        "--preprocessing",
        write(tmp_path / "preprocessing.json", fitted),
    ]
    cli.as_user(g.scientists[0])

    code, out, err = cli(*args, "--weights", str(tmp_path / "model.pt"))
    assert code == 1 and "weights: is a pickle file" in err and "never unpickles" in err
    code, out, err = cli(*args, "--weights", str(tmp_path / "model.safetensors"))
    assert code == 0, err
    uploaded = UploadedModel.objects.get()
    assert f"uploaded model {uploaded.pk} 'Partner model'" in out and uploaded.checksum in out
    assert f'"model_version": {{"uploaded": {uploaded.pk}, "sha256": "{uploaded.checksum}"}}' in err
    code, out, _ = cli("model", "list")
    assert code == 0 and "Partner model" in out and g.scientists[0].username in out

    spec = {
        "kind": "evaluation",
        "schema": SCHEMA,
        "model": LR,
        "model_version": {"uploaded": uploaded.pk, "sha256": uploaded.checksum},
        "rows": "all",
    }
    run = run_evaluation_plan(g, spec, files)
    code, out, _ = cli("run", "results", str(run.pk))
    assert code == 0
    by = g.scientists[0].username
    assert f"evaluation (uploaded model {uploaded.pk} 'Partner model' by {by}, all rows" in out
