"""``quorum-agent init`` and ``quorum-agent check`` on a demo site's CSV: the proposal is
written for review, checked, and the agent trains on it (clientagent.onboarding, clientagent.cli)."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from clientagent import cli, onboarding
from clientagent.config import load_config
from clientagent.data import LocalData
from clientagent.trainer import handle_stats_request, handle_task
from fedcore import models, protocol, signing, tabular, tensors
from federation.demo import scenarios

REPO = Path(__file__).resolve().parents[2]
PUBLIC_KEY = signing.public_key_text(signing.generate_private_key())


@pytest.fixture
def site_csv(tmp_path: Path) -> Path:
    """The CSV the demo writes for the thyroid site 'stmw' (255 rows)."""
    path = tmp_path / "data" / "stmw.csv"
    path.parent.mkdir()
    scenarios.healthcare().sites["stmw"].to_csv(path, index=False)
    return path


def fill_in(site_toml: Path) -> None:
    """What the steward does after admission: paste the token and the server's key."""
    (site_toml.parent / "token.txt").write_text("the-silo-token\n")
    text = site_toml.read_text().replace("ed25519:PASTE-THE-SERVER-KEY-HERE", PUBLIC_KEY)
    site_toml.write_text(text.replace("wss://quorum.example.org", "ws://127.0.0.1:8000"))


def test_init_writes_a_schema_and_a_site_toml_to_review(site_csv: Path, tmp_path: Path, capsys):
    out = tmp_path / "site"

    code = cli.main(["init", "--data", str(site_csv), "--out", str(out), "--sensitive", "sex"])

    printed = capsys.readouterr()
    assert code == 0, printed.err
    schema = tabular.DatasetSchema.from_dict(json.loads((out / "schema.json").read_text()))
    assert schema.target.column == "target" and schema.target.negative == ("-",)
    assert schema.sensitive == ("sex",)
    types = {c.name: c.type for c in schema.columns}
    assert types["age"] == "numeric" and types["on_thyroxine"] == "boolean"
    assert types["sex"] == "categorical"
    assert "CONFIRM target: 'target' (guessed from its name 'target')" in printed.out
    assert "the target 'target' was GUESSED" in printed.out
    assert "suggested sensitive attributes (by name, not added): age pregnant" in printed.out
    assert "nothing was sent" in printed.out
    toml = (out / "site.toml").read_text()
    assert f'path = "{site_csv}"' in toml and 'schema = "schema.json"' in toml
    assert toml.count("REVIEW") >= 5 and "min_category_count = 10" in toml

    # The placeholders make the config fail on purpose until the steward fills them in.
    assert cli.main(["check", "--config", str(out / "site.toml")]) == 2
    printed = capsys.readouterr()
    assert "[server] token_file: the token file" in printed.err
    assert "the data matches the schema (255 rows usable" in printed.out  # [data] checked anyway

    fill_in(out / "site.toml")
    config = load_config(out / "site.toml")
    assert config.data.path == site_csv and config.data.schema == out / "schema.json"
    assert config.policy.require_local_approval and config.policy.min_category_count == 10
    assert cli.main(["check", "--config", str(out / "site.toml")]) == 0
    printed = capsys.readouterr().out
    # 'M' is held by 4 rows here, below the floor of 10: not named, its rows encode as other.
    assert re.search(
        r"\nWARNING +sex +feature, sensitive +categorical: 235 values \(any text\), 20 missing "
        r"\(imputed\); 4 rows hold a value not in 'categories': encoded as 'other'",
        printed,
    )
    assert "label 1 = any value but '-'" in printed


def test_the_agent_trains_one_round_on_the_proposed_schema(site_csv: Path, tmp_path: Path):
    assert (
        cli.main(["init", "--data", str(site_csv), "--out", str(tmp_path), "--target", "target"])
        == 0
    )
    plan = {
        "model": {"kind": "mlp", "hidden": [8]},
        "schema": json.loads((tmp_path / "schema.json").read_text()),
        "training": {
            "rounds": 1,
            "local_epochs": 1,
            "batch_size": 32,
            "optimizer": "adam",
            "lr": 0.01,
        },
        "evaluation": {"test_fraction": 0.2, "seed": 0},
        "seed": 3,
    }
    data = LocalData(site_csv)
    schema = tabular.DatasetSchema.from_dict(plan["schema"])

    # The statistics pass and the round, as the running agent does them.
    stats = handle_stats_request({"run": 1, "plan_hash": "h", "plan": plan}, data)["stats"]
    fitted = tabular.merge_statistics([stats], schema)
    n_features = len(tabular.feature_names(schema, fitted))
    state = models.build_model(plan["model"], n_features, seed=1).state_dict()
    fields = {
        "run": 1,
        "round": 1,
        "rounds": 1,
        "plan_hash": "h",
        "plan": plan,
        "preprocessing": fitted,
        "deadline": time.time() + 60,
    }
    task = protocol.BinaryMessage("task", fields, tensors.encode_state_dict(state))
    update = handle_task(task, data, silo="stmw")

    trained = tensors.decode_state_dict(update.payload)
    assert not torch.equal(trained["fc1.weight"], state["fc1.weight"])
    assert update.fields["num_examples"] == len(data.split(plan).train) == 204
    assert update.fields["metrics"]["local"]["n"] == 51


def test_init_never_overwrites_without_force(site_csv: Path, tmp_path: Path, capsys):
    (tmp_path / "site.toml").write_text("# mine\n")

    assert cli.main(["init", "--data", str(site_csv), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'site.toml'} already exists; nothing was written" in err
    assert (tmp_path / "site.toml").read_text() == "# mine\n"
    assert not (tmp_path / "schema.json").exists()

    assert cli.main(["init", "--data", str(site_csv), "--out", str(tmp_path), "--force"]) == 0
    assert (tmp_path / "schema.json").exists()
    assert "proposed by `quorum-agent init`" in (tmp_path / "site.toml").read_text()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--target", "nope"], "column 'nope' is not in the data; the columns are age, sex,"),
        (["--sensitive", "age"], "sensitive column 'age' is numeric"),
    ],
)
def test_init_refuses_bad_options_and_writes_nothing(site_csv, tmp_path, capsys, argv, message):
    out = tmp_path / "out"

    assert cli.main(["init", "--data", str(site_csv), "--out", str(out), *argv]) == 2

    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_floor_below_one_is_a_usage_error(site_csv, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["init", "--data", str(site_csv), "--min-category-rows", "0"])

    assert exc.value.code == 2
    assert "--min-category-rows: must be >= 1, got 0" in capsys.readouterr().err


def test_a_malformed_csv_is_named_with_its_line(tmp_path: Path, capsys):
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a,b,y\n1,2,0\n3,4,5,1\n")
    repeated = tmp_path / "repeated.csv"
    repeated.write_text("a,b,a\n1,2,3\n")

    assert cli.main(["init", "--data", str(ragged), "--out", str(tmp_path / "o")]) == 2
    assert "Expected 3 fields in line 3, saw 4" in capsys.readouterr().err
    assert cli.main(["init", "--data", str(repeated), "--out", str(tmp_path / "o")]) == 2
    assert f"{repeated}: line 1: column name(s) 'a' appear more than once" in (
        capsys.readouterr().err
    )


def test_check_names_the_schema_fault_and_every_bad_column(tmp_path: Path, capsys):
    (tmp_path / "data.csv").write_text("age,smoker,y\n50,yes,1\nabc,maybe,0\n61,no,\n")
    (tmp_path / "site.toml").write_text(
        f'[server]\nurl = "ws://127.0.0.1:8000/ws/agent/"\ntoken = "t"\n'
        f'public_key = "{PUBLIC_KEY}"\n\n[data]\npath = "data.csv"\n'
    )
    config = str(tmp_path / "site.toml")
    broken = tmp_path / "broken.json"
    broken.write_text('{"columns": [\n  {"name": "age", "type": "numeric"}\n  "target": {}}\n')
    wrong = tmp_path / "wrong.json"
    wrong.write_text(
        json.dumps({"columns": [{"name": "age", "type": "decimal"}], "target": {"column": "y"}})
    )
    good = tmp_path / "schema.json"
    good.write_text(
        json.dumps(
            {
                "columns": [
                    {"name": "age", "type": "numeric"},
                    {"name": "smoker", "type": "boolean"},
                ],
                "target": {"column": "y", "positive": ["1"]},
            }
        )
    )

    assert cli.main(["check", "--config", config, "--schema", str(broken)]) == 2
    assert f"{broken}: line 3 column 3: not valid JSON (Expecting ',' delimiter)" in (
        capsys.readouterr().err
    )
    assert cli.main(["check", "--config", config, "--schema", str(wrong)]) == 2
    err = capsys.readouterr().err
    assert "type 'decimal' is not supported; allowed: numeric, categorical, boolean" in err
    assert cli.main(["check", "--config", config, "--schema", str(good)]) == 2
    out = capsys.readouterr().out
    assert re.search(
        r"\nERROR +age +feature +column 'age': value 'abc' at row 2 is not numeric", out
    )
    assert re.search(r"\nERROR +smoker +feature +column 'smoker': token 'maybe' at row 2", out)
    assert "1 rows have no label (first at row 3)" in out
    assert "3 column(s) with errors" in out and "CSV line = row + 1" in out
    # Without a schema, check is what it was: the config and that the data loads.
    assert cli.main(["check", "--config", config]) == 0
    assert "schema: none ([data] schema or --schema)" in capsys.readouterr().out


def test_the_console_entry_runs_init_and_check_in_a_subprocess(site_csv: Path, tmp_path: Path):
    entry = Path(sys.executable).parent / "quorum-agent"
    # `make install-dev` (pip install -e) installs it; a missing script is a broken install.
    assert entry.exists(), f"the console script {entry} is not installed: run make install-dev"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = tmp_path / "site"

    init = subprocess.run(
        [str(entry), "init", "--data", str(site_csv), "--out", str(out), "--target", "target"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    assert init.returncode == 0, init.stderr
    assert f"wrote {out / 'schema.json'}" in init.stdout
    assert "target: 'target' (given with --target)" in init.stdout
    fill_in(out / "site.toml")
    check = subprocess.run(
        [str(entry), "check"],
        cwd=out,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert check.returncode == 0, check.stderr
    assert "the data matches the schema (255 rows usable" in check.stdout
    assert "Traceback" not in check.stderr + init.stderr


def test_a_schema_key_naming_no_file_is_a_config_error(tmp_path: Path, capsys):
    (tmp_path / "data.csv").write_text("age,y\n50,1\n60,0\n")
    (tmp_path / "site.toml").write_text(
        f'[server]\nurl = "ws://127.0.0.1:8000/ws/agent/"\ntoken = "t"\n'
        f'public_key = "{PUBLIC_KEY}"\n\n[data]\npath = "data.csv"\nschema = "nowhere.json"\n'
    )

    assert cli.main(["check", "--config", str(tmp_path / "site.toml")]) == 2

    assert (
        f"[data] schema: the schema file {tmp_path / 'nowhere.json'} does not exist; write it "
        "with `quorum-agent init`, fix the path or remove the key"
    ) in capsys.readouterr().err


def test_a_guessed_target_not_confirmed_writes_nothing(site_csv: Path, tmp_path: Path):
    questions: list[str] = []

    def refuse(question: str) -> bool:
        questions.append(question)
        return False

    with pytest.raises(onboarding.OnboardingError, match="target 'target' not confirmed"):
        onboarding.init(
            data=str(site_csv),
            target=None,
            sensitive=(),
            out_dir=str(tmp_path / "out"),
            min_category_rows=10,
            force=False,
            confirm=refuse,
            out=io.StringIO(),
        )

    assert questions == ["use 'target' as the target (the column to predict)? [y/N] "]
    assert not (tmp_path / "out").exists()


HEART = REPO / "examples" / "heart-disease" / "switzerland.csv"


def test_init_takes_the_labels_the_server_and_the_stewards_key_from_the_command_line(
    tmp_path: Path, capsys
) -> None:
    out = tmp_path / "site"
    key_file = tmp_path / "steward.pem"
    assert cli.main(["steward-key", "new", "--out", str(key_file), "--quiet"]) == 0
    steward_key = capsys.readouterr().out.strip()
    assert steward_key.startswith("ed25519:") and "\n" not in steward_key

    code = cli.main(
        [
            "init", "--data", str(HEART), "--target", "num", "--negative", "0",
            "--sensitive", "sex", "--server", "ws://127.0.0.1:8000/ws/agent/",
            "--server-key", PUBLIC_KEY, "--steward-key", steward_key, "--out", str(out),
        ]
    )  # fmt: skip

    printed = capsys.readouterr()
    assert code == 0, printed.err
    schema = tabular.DatasetSchema.from_dict(json.loads((out / "schema.json").read_text()))
    # Switzerland's most common value is 1: without --negative init would call it label 0.
    assert schema.target.negative == ("0",) and schema.target.positive is None
    assert "label 0 = '0' (given with --negative)" in printed.out
    (out / "token.txt").write_text("the-silo-token\n")
    config = load_config(out / "site.toml")
    assert config.server.url == "ws://127.0.0.1:8000/ws/agent/"
    assert config.server.public_key == PUBLIC_KEY
    assert list(config.governance.steward_keys) == [steward_key]
    assert config.policy.require_local_approval is False


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--negative", "9"], "--negative 9: column 'num' holds no such value; it holds: 0, 1, 2"),
        (["--positive", "1", "--negative", "0"], "not allowed with argument"),
    ],
)
def test_init_refuses_labels_the_target_does_not_hold_and_writes_nothing(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    out = tmp_path / "site"
    try:
        code = cli.main(["init", "--data", str(HEART), "--target", "num", "--out", str(out), *args])
    except SystemExit as exc:  # argparse: a wrong command line
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
