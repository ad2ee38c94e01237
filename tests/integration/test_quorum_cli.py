"""The `quorum` command line against a live server: a governed consortium from login to a run.

main() runs in-process; the server is pytest-django's live_server (a real HTTP server thread),
so every command goes over HTTP with an API token exactly as a user's would.
"""

from __future__ import annotations

import hashlib
import io
import json
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from django.utils import timezone

from fedcore import signing
from federation import models
from federation.fairness_outcome import final_fairness_warning
from quorum.cli import main
from tests.api_factories import _token_of, approved_plan
from tests.dashboard_factories import build_world, finished_run
from tests.factories import SCHEMA, plan_spec, running_round, start_run
from tests.governance_factories import Governed, governed_consortium
from tests.integration.test_dashboard_fairness import fairness_run
from tests.integration.test_fairness_outcome import with_final_flagged

pytestmark = pytest.mark.django_db(transaction=True)


class Cli:
    """Runs `quorum ...` as one user (their token in $QUORUM_TOKEN) and keeps what it printed."""

    def __init__(self, capsys: Any, monkeypatch: pytest.MonkeyPatch, url: str) -> None:
        self.capsys = capsys
        self.monkeypatch = monkeypatch
        self.url = url

    def as_user(self, user: Any) -> Cli:
        self.monkeypatch.setenv("QUORUM_URL", self.url)
        self.monkeypatch.setenv("QUORUM_TOKEN", _token_of(user))
        return self

    def __call__(self, *argv: str, stdin: str = "") -> tuple[int, str, str]:
        self.capsys.readouterr()
        self.monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        code = main(list(argv))
        captured = self.capsys.readouterr()
        assert "Traceback" not in captured.err
        return code, captured.out, captured.err


@pytest.fixture
def gov() -> Governed:
    return governed_consortium(2, name="CLI consortium")


@pytest.fixture
def cli(capsys: Any, monkeypatch: pytest.MonkeyPatch, live_server: Any, tmp_path: Path) -> Cli:
    monkeypatch.setenv("QUORUM_CONFIG", str(tmp_path / "quorum" / "config.json"))
    monkeypatch.delenv("QUORUM_URL", raising=False)
    monkeypatch.delenv("QUORUM_TOKEN", raising=False)
    return Cli(capsys, monkeypatch, live_server.url)


def write(path: Path, data: Any) -> str:
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_login_stores_url_and_token_readable_by_the_owner_only(
    cli: Cli, gov: Governed, tmp_path: Path
) -> None:
    token = _token_of(gov.scientists[0])
    code, out, _ = cli("login", cli.url, "--token-stdin", stdin=token + "\n")
    assert code == 0
    assert gov.scientists[0].username in out
    config = tmp_path / "quorum" / "config.json"
    assert json.loads(config.read_text()) == {"url": cli.url, "token": token}
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    # Later commands use the stored login.
    code, out, _ = cli("silos")
    assert code == 0 and gov.silos[0].name in out


def test_a_bad_token_is_refused_with_the_servers_message_and_nothing_stored(
    cli: Cli, tmp_path: Path
) -> None:
    code, _, err = cli("login", cli.url, "--token-stdin", stdin="not-a-token\n")
    assert code == 1
    assert "(401)" in err and "quorum:" in err
    assert not (tmp_path / "quorum" / "config.json").exists()


def test_an_unreachable_server_is_one_clear_line(cli: Cli) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, err = cli("login", f"http://127.0.0.1:{port}", "--token-stdin", stdin="x\n")
    assert code == 1
    assert f"cannot reach the server at http://127.0.0.1:{port}" in err


def test_commands_without_a_login_say_how_to_log_in(cli: Cli) -> None:
    code, _, err = cli("plan", "status")
    assert code == 1 and "quorum login" in err


def test_silos_are_listed_with_their_schemas(cli: Cli, gov: Governed) -> None:
    code, out, _ = cli.as_user(gov.stewards[0])("silos")
    assert code == 0
    for silo in gov.silos:
        assert silo.name in out
    assert "x1: numeric" in out and "target: y" in out
    code, out, _ = cli("silos", "--format", "json")
    assert code == 0
    assert {s["name"]: s["schema"] for s in json.loads(out)}[gov.silos[0].name] == SCHEMA


def test_plan_validate_names_every_fault_by_its_path_in_yaml_and_json(
    cli: Cli, tmp_path: Path
) -> None:
    bad = plan_spec(training={**plan_spec()["training"], "lr": -1}, colour="blue")
    for path in (write(tmp_path / "bad.json", bad), write(tmp_path / "bad.yaml", json.dumps(bad))):
        code, _, err = cli("plan", "validate", path)
        assert code == 1
        assert "training.lr:" in err
        assert "colour: unknown key 'colour'; allowed keys:" in err
    code, out, _ = cli("plan", "validate", write(tmp_path / "good.json", plan_spec()))
    assert code == 0 and "a valid plan" in out
    code, _, err = cli("plan", "validate", write(tmp_path / "broken.json", "{"))
    assert code == 1 and "not valid JSON at line 1" in err
    code, _, err = cli("plan", "validate", str(tmp_path / "missing.yaml"))
    assert code == 1 and "no such file" in err


def test_a_plan_goes_from_proposal_through_a_signed_approval_to_a_started_run(
    cli: Cli, gov: Governed, tmp_path: Path
) -> None:
    plan_file = write(tmp_path / "plan.yaml", json.dumps(plan_spec(seed=11)))
    silo = str(gov.silos[0].pk)

    code, out, err = cli.as_user(gov.scientists[0])(
        "plan", "propose", plan_file, "--name", "Readmission", "--silos", silo
    )
    assert code == 0, err
    plan = models.TrainingPlan.objects.get(name="Readmission")
    assert plan.status == models.TrainingPlan.Status.SUBMITTED
    assert plan.current_version.spec_hash in out
    assert f"waiting for the stewards of the silos: {gov.silos[0].name}" in out

    code, out, _ = cli("plan", "status", str(plan.pk))
    assert code == 0 and "submitted" in out and plan.current_version.spec_hash in out
    code, out, _ = cli("plan", "status")
    assert code == 0 and "Readmission" in out

    # The scientist may not start it yet: the server's 409/400 message comes through.
    code, _, err = cli("run", "start", str(plan.pk))
    assert code == 1 and "quorum:" in err

    key_file = tmp_path / "steward.pem"
    key = signing.generate_private_key()
    key_file.write_bytes(signing.private_key_to_pem(key))
    code, out, err = cli.as_user(gov.stewards[0])(
        "approve",
        str(plan.pk),
        "--key",
        str(key_file),
        "--hash",
        plan.current_version.spec_hash[:12],
    )
    assert code == 0, err
    approval = models.Approval.objects.get(version=plan.current_version)
    assert approval.signature["key"] == signing.public_key_text(key)
    assert approval.organization == gov.orgs[0]
    plan.refresh_from_db()
    assert plan.status == models.TrainingPlan.Status.APPROVED

    code, out, err = cli.as_user(gov.scientists[0])("run", "start", str(plan.pk))
    assert code == 0, err
    run = models.Run.objects.get(plan=plan)
    assert f"run {run.pk} " in out


def test_an_approval_of_a_hash_other_than_the_current_one_is_refused_locally(
    cli: Cli, gov: Governed
) -> None:
    plan = approved_plan(gov)
    code, _, err = cli.as_user(gov.stewards[1])("approve", str(plan.pk), "--hash", "0" * 64)
    assert code == 1 and "the plan changed since you reviewed it" in err
    assert models.Approval.objects.filter(version=plan.current_version).count() == 1


def test_server_refusals_come_through_as_its_messages(
    cli: Cli, gov: Governed, tmp_path: Path
) -> None:
    plan_file = write(tmp_path / "plan.json", plan_spec())
    # 400 with field errors: a silo id that does not exist.
    code, _, err = cli.as_user(gov.scientists[0])(
        "plan", "propose", plan_file, "--name", "x", "--silos", "999999"
    )
    assert code == 1 and "(400)" in err and "silos:" in err
    # 403: an auditor may not propose.
    code, _, err = cli.as_user(gov.auditors[0])(
        "plan", "propose", plan_file, "--name", "x", "--silos", str(gov.silos[0].pk)
    )
    assert code == 1 and "(403)" in err
    # 404: no such plan.
    code, _, err = cli("plan", "status", "999999")
    assert code == 1 and "plan 999999: not found, or not in a consortium of yours (404)" in err
    assert not models.TrainingPlan.objects.exists()


def test_run_results_and_watch_of_a_finished_run(cli: Cli, gov: Governed) -> None:
    plan = approved_plan(gov)
    run = start_run(plan, status=models.Run.Status.COMPLETED, rounds=1, finished_at=timezone.now())
    round_ = models.Round.objects.create(
        run=run,
        number=1,
        status=models.Round.Status.COMPLETED,
        deadline=timezone.now(),
        finished_at=timezone.now(),
    )
    models.RoundMetric.objects.create(round=round_, scope="global", name="auc", value=0.8125)
    cli.as_user(gov.scientists[0])

    code, out, err = cli("run", "results", str(run.pk), "--format", "json")
    assert code == 0, err
    report = json.loads(out)
    assert report["metrics"] == {"round": 1, "values": {"global/auc": 0.8125}}
    # Reports the server does not offer (yet) are named, not a traceback.
    for key in ("fairness", "privacy"):
        if report[key] is None:
            assert f"the server does not offer the {key} report of run {run.pk} (404)" in err

    code, out, _ = cli("run", "results", str(run.pk))
    assert code == 0 and "global/auc" in out and "0.8125" in out

    code, out, _ = cli("run", "watch", str(run.pk), "--interval", "0")
    assert code == 0
    assert "1/1 rounds completed" in out and "global/auc=0.8125" in out

    code, _, err = cli("run", "results", "999999")
    assert code == 1 and "run 999999: not found" in err and "(404)" in err


def test_model_download_verifies_or_says_what_the_server_lacks(
    cli: Cli, gov: Governed, tmp_path: Path
) -> None:
    plan = approved_plan(gov)
    run = start_run(plan, status=models.Run.Status.COMPLETED)
    target = tmp_path / "model.safetensors"
    code, _, err = cli.as_user(gov.scientists[0])(
        "model", "download", str(run.pk), "--out", str(target)
    )
    assert code == 1 and f"run {run.pk} has no model version yet" in err
    assert not target.exists()

    round_ = running_round([gov.silos[0]])
    version = models.ModelVersion.objects.get(run=round_.run)
    code, out, err = cli("model", "download", str(round_.run.pk), "--out", str(target))
    if code == 0:  # the server offers model downloads: the file is the checksummed one
        assert hashlib.sha256(target.read_bytes()).hexdigest() == version.checksum
        assert "verified" in out
    else:
        assert "the server does not offer" in err and "(404)" in err
        assert not target.exists()


def test_a_finished_runs_results_and_models(cli: Cli, gov: Governed, tmp_path: Path) -> None:
    run = finished_run(gov, rounds=2)
    final = models.ModelVersion.objects.filter(run=run).order_by("-number").first()
    cli.as_user(gov.scientists[0])

    code, out, err = cli("run", "results", str(run.pk))
    assert code == 0, err
    assert "metrics (round 2)" in out and "global/auc" in out and "0.7" in out

    target = tmp_path / "final.safetensors"
    code, out, err = cli("model", "download", str(run.pk), "--out", str(target))
    if code == 0:  # a server with the models API: the final version, checksum verified
        assert hashlib.sha256(target.read_bytes()).hexdigest() == final.checksum
        assert f"SHA-256 {final.checksum} verified" in out
    else:
        assert "the server does not offer model downloads" in err and not target.exists()

    code, out, err = cli(
        "model", "download", str(run.pk), "--format", "onnx", "--out", str(tmp_path / "m.onnx")
    )
    # Either the ONNX file (named by the checksum of the model it came from), or the server's
    # reason it cannot export this one, or that it offers no downloads: never a traceback.
    assert (code == 0 and final.checksum in out) or (code == 1 and err.startswith("quorum: "))


def test_a_run_whose_final_model_exceeds_a_fairness_limit_is_not_a_plain_completed(
    cli: Cli,
) -> None:
    world = build_world()
    run = with_final_flagged(fairness_run(world))
    cli.as_user(world.user("scientist"))
    message = final_fairness_warning(run.evaluation)["message"]
    assert message.startswith(
        "the final model v2 exceeds the plan's fairness limit for 'sex': demographic parity "
        "difference 0.40"
    )

    code, out, err = cli("run", "watch", str(run.pk), "--interval", "0")
    assert code == 0 and f"quorum: warning: run {run.pk} completed, but {message}" in err
    code, out, _ = cli("run", "results", str(run.pk))
    assert code == 0 and f"warning: {message}" in out
    code, out, _ = cli("run", "results", str(run.pk), "--format", "json")
    assert json.loads(out)["run"]["fairness_warning"]["message"] == message


def test_an_analysis_run_s_result_as_a_table_csv_and_json(cli: Cli, tmp_path: Path) -> None:
    from clientagent.data import LocalData
    from fedcore.analytics import DisclosurePolicy
    from tests.integration.test_analysis_runs import answer_step, governed_run, site_csv

    g, run = governed_run({"kind": "linear_regression", "outcome": "time", "covariates": ["age"]})
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]
    for _ in range(2):  # X'X and X'y, then the residuals at the estimate
        assert answer_step(g, run, data, [DisclosurePolicy()] * 3) == []
    assert run.status == models.Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    user = cli.as_user(g.scientists[0])

    code, out, _ = user("run", "analysis", str(run.pk))
    assert code == 0 and "linear_regression from 3 site(s)" in out
    assert "const" in out and "age" in out and "r_squared" in out
    code, out, _ = user("run", "analysis", str(run.pk), "--format", "csv")
    lines = out.splitlines()
    assert lines[0] == "term,coef,se,statistic,p_value,ci_lower,ci_upper"
    assert lines[2].startswith("age,") and float(lines[2].split(",")[1]) == result["coef"]["age"]
    code, out, _ = user("run", "analysis", str(run.pk), "--format", "json")
    assert json.loads(out)["result"]["se"] == result["se"]
