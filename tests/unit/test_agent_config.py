"""site.toml parsing and the CLI's config/data checks (clientagent.config, clientagent.cli)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from clientagent import cli
from clientagent.config import ConfigError, PolicyConfig, load_config
from fedcore import signing
from fedcore.models import MODEL_KINDS
from tests.tls_certs import make_ca

PUBLIC_KEY = signing.public_key_text(signing.generate_private_key())
GOOD = f"""
[server]
url = "ws://127.0.0.1:8000/ws/agent/"
token = "s3cret-token"
public_key = "{PUBLIC_KEY}"

[data]
path = "data.csv"
"""


def write_site(tmp_path: Path, text: str, *, data: bool = True) -> Path:
    if data:
        (tmp_path / "data.csv").write_text("age,outcome\n50,sick\n61,healthy\n40,sick\n")
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_minimal_config_resolves_paths_against_the_toml_folder(tmp_path, monkeypatch):
    path = write_site(tmp_path, GOOD)
    monkeypatch.chdir("/")

    config = load_config(path)

    assert config.server.url == "ws://127.0.0.1:8000/ws/agent/"
    assert config.server.token == "s3cret-token"
    assert config.data.path == (tmp_path / "data.csv").resolve()
    assert config.agent.name is None
    assert config.agent.state_dir == (tmp_path / ".quorum-agent").resolve()
    assert config.display_name == "agent"
    assert config.server.is_loopback and not config.server.is_encrypted
    assert config.server.public_key == PUBLIC_KEY
    # No [policy]: every model kind, no budget, nothing required.
    assert config.policy == PolicyConfig()
    assert config.policy.allowed_models == MODEL_KINDS
    assert config.policy.max_epsilon_total is None and not config.policy.require_local_approval


def test_token_file_and_agent_section(tmp_path):
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "token.txt").write_text("  tok-123\n")
    path = write_site(
        tmp_path,
        f"""
[server]
url = "wss://quorum.example.org/ws/agent/"
token_file = "secrets/token.txt"
public_key = "{PUBLIC_KEY}"
[data]
path = "data.csv"
[agent]
name = "site-a"
state_dir = "state"
""",
    )

    config = load_config(path)

    assert config.server.token == "tok-123"
    assert config.server.is_encrypted and not config.server.is_loopback
    assert config.agent.name == "site-a"
    assert config.agent.state_dir == (tmp_path / "state").resolve()


def test_token_never_appears_in_repr(tmp_path):
    config = load_config(write_site(tmp_path, GOOD))

    assert "s3cret-token" not in repr(config)


def test_policy_section(tmp_path):
    path = write_site(
        tmp_path,
        GOOD
        + """
[policy]
consortium = "thyroid"
allowed_models = ["logistic_regression", "logistic_regression"]
max_epsilon_per_plan = 3
max_epsilon_total = 10.5
require_dp = true
require_secure_aggregation = true
require_local_approval = true
""",
    )

    policy = load_config(path).policy

    assert policy == PolicyConfig(
        consortium="thyroid",
        allowed_models=("logistic_regression",),
        max_epsilon_per_plan=3.0,
        max_epsilon_total=10.5,
        require_dp=True,
        require_secure_aggregation=True,
        require_local_approval=True,
    )


def _replace(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new)


def _policy(text: str) -> str:
    return GOOD + "\n[policy]\n" + text + "\n"


KEY_SOURCES = ["consortium admin", "manage.py server_key", "/api/v1/server-key/"]


BAD_CONFIGS = {
    "unknown section": (GOOD + "\n[polcy]\nmax_epsilon = 3\n", ["[polcy]", "[server], [data]"]),
    "unknown key": (_replace('token = "s3cret-token"', 'token = "t"\ntimeout = 3'), ["timeout"]),
    "missing server": ('[data]\npath = "data.csv"\n', ["[server]", "missing section"]),
    "missing url": (_replace('url = "ws://127.0.0.1:8000/ws/agent/"', ""), ["[server] url"]),
    "http url": (_replace("ws://127.0.0.1", "http://127.0.0.1"), ["url", "ws://", "wss://"]),
    "url not a string": (_replace('"ws://127.0.0.1:8000/ws/agent/"', "8000"), ["url", "integer"]),
    "url without host": (_replace("ws://127.0.0.1:8000/ws/agent/", "ws:///ws/"), ["host"]),
    "bad port": (_replace("8000", "99999"), ["url", "port"]),
    "both tokens": (_replace('token = "s3cret-token"', 'token = "a"\ntoken_file = "t"'), ["token"]),
    "no token": (_replace('token = "s3cret-token"', ""), ["token", "exactly one"]),
    "token with space": (_replace("s3cret-token", "s3cret token"), ["token", "spaces"]),
    "empty token": (_replace('"s3cret-token"', '""'), ["token", "empty"]),
    "missing token file": (
        _replace('token = "s3cret-token"', 'token_file = "nope.txt"'),
        ["token_file", "nope.txt", "does not exist"],
    ),
    "missing data key": (_replace('path = "data.csv"', ""), ["[data] path", "missing"]),
    "missing data file": (_replace("data.csv", "other.csv"), ["[data] path", "other.csv"]),
    "data suffix": (_replace("data.csv", "data.xlsx"), ["[data] path", ".csv or .parquet"]),
    "name not a string": (GOOD + "[agent]\nname = 3\n", ["[agent] name", "string"]),
    "top-level key": ("debug = true\n" + GOOD, ["debug", "section"]),
    "bad toml": (GOOD + "\n[server\n", ["not valid TOML"]),
    "missing public key": (
        _replace(f'public_key = "{PUBLIC_KEY}"', ""),
        ["[server] public_key", "missing", *KEY_SOURCES],
    ),
    "public key without prefix": (
        _replace(f'"{PUBLIC_KEY}"', f'"{PUBLIC_KEY.removeprefix("ed25519:")}"'),
        ["[server] public_key", "ed25519:<base64>", *KEY_SOURCES],
    ),
    "public key bad base64": (
        _replace(f'"{PUBLIC_KEY}"', '"ed25519:not*base64"'),
        ["[server] public_key", "not an Ed25519 public key"],
    ),
    "public key wrong length": (
        _replace(f'"{PUBLIC_KEY}"', '"ed25519:AAAA"'),
        ["[server] public_key", "not an Ed25519 public key"],
    ),
    "public key not a string": (
        _replace(f'"{PUBLIC_KEY}"', "42"),
        ["[server] public_key", "string"],
    ),
    "policy unknown key": (
        _policy("max_epsilon = 3"),
        [
            "[policy] max_epsilon",
            "unknown key",
            "consortium, allowed_models, max_epsilon_per_plan, max_epsilon_total, require_dp, "
            "require_secure_aggregation, require_local_approval",
        ],
    ),
    "policy unknown model kind": (
        _policy('allowed_models = ["random_forest"]'),
        ["[policy] allowed_models", "'random_forest'", "logistic_regression, mlp"],
    ),
    "policy models not a list": (
        _policy('allowed_models = "mlp"'),
        ["[policy] allowed_models", "array of strings"],
    ),
    "policy models empty": (_policy("allowed_models = []"), ["[policy] allowed_models", "empty"]),
    "policy epsilon zero": (
        _policy("max_epsilon_per_plan = 0"),
        ["[policy] max_epsilon_per_plan", "> 0"],
    ),
    "policy epsilon negative": (
        _policy("max_epsilon_total = -1.5"),
        ["[policy] max_epsilon_total", "> 0"],
    ),
    "policy epsilon infinite": (_policy("max_epsilon_total = inf"), ["max_epsilon_total", "> 0"]),
    "policy epsilon string": (
        _policy('max_epsilon_total = "3"'),
        ["[policy] max_epsilon_total", "number", "got a string"],
    ),
    "policy epsilon boolean": (_policy("max_epsilon_total = true"), ["a boolean"]),
    "policy flag string": (
        _policy('require_dp = "yes"'),
        ["[policy] require_dp", "true or false"],
    ),
    "policy consortium empty": (_policy('consortium = ""'), ["[policy] consortium", "empty"]),
    "policy not a table": ("policy = 3\n" + GOOD, ["policy must be a section"]),
    "plain ws to another machine": (
        _replace("ws://127.0.0.1:8000", "ws://quorum.example.org"),
        ["[server] url", "plain ws:// to another machine", "allow_insecure = true", "wss://"],
    ),
    "allow_insecure not a boolean": (
        _replace('token = "s3cret-token"', 'token = "t"\nallow_insecure = "yes"'),
        ["[server] allow_insecure", "true or false"],
    ),
    "ca_file missing": (
        _replace("ws://127.0.0.1", "wss://127.0.0.1").replace(
            'token = "s3cret-token"', 'token = "t"\nca_file = "nope.pem"'
        ),
        ["[server] ca_file", "nope.pem", "does not exist"],
    ),
    "ca_file not a certificate": (
        _replace("ws://127.0.0.1", "wss://127.0.0.1").replace(
            'token = "s3cret-token"', 'token = "t"\nca_file = "data.csv"'
        ),
        ["[server] ca_file", "not a PEM file of CA certificates"],
    ),
    "ca_file without wss": (
        _replace('token = "s3cret-token"', 'token = "t"\nca_file = "data.csv"'),
        ["[server] ca_file", "is not wss://"],
    ),
}


def test_plain_ws_to_another_machine_only_with_allow_insecure(tmp_path):
    text = _replace("ws://127.0.0.1:8000", "ws://10.0.0.5:8000").replace(
        'token = "s3cret-token"', 'token = "s3cret-token"\nallow_insecure = true'
    )
    config = load_config(write_site(tmp_path, text))
    assert config.server.allow_insecure and not config.server.is_loopback
    for loopback in ("ws://localhost:8000", "ws://[::1]:8000", "ws://127.0.0.2:8000"):
        config = load_config(write_site(tmp_path, _replace("ws://127.0.0.1:8000", loopback)))
        assert config.server.is_loopback and not config.server.allow_insecure


def test_ca_file_pins_the_consortium_ca(tmp_path):
    ca = make_ca(tmp_path / "pki", "consortium-ca")
    text = _replace("ws://127.0.0.1", "wss://quorum.example.org").replace(
        'token = "s3cret-token"', 'token = "t"\nca_file = "pki/consortium-ca.pem"'
    )
    config = load_config(write_site(tmp_path, text))
    assert config.server.ca_file == ca.cert_file.resolve()


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_errors_name_the_file_and_the_key(tmp_path, case):
    text, expected = BAD_CONFIGS[case]
    path = write_site(tmp_path, text)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    message = str(info.value)
    assert str(path) in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_empty_token_file(tmp_path):
    (tmp_path / "token.txt").write_text("\n")
    path = write_site(tmp_path, _replace('token = "s3cret-token"', 'token_file = "token.txt"'))

    with pytest.raises(ConfigError, match=r"\[server\] token_file: .*token.txt is empty"):
        load_config(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nowhere.toml")


def test_cli_config_error_exits_2_without_traceback(tmp_path, capsys):
    path = write_site(tmp_path, GOOD + "\n[polcy]\n")

    for command in ("run", "check"):
        assert cli.main([command, "--config", str(path)]) == 2
        err = capsys.readouterr().err
        assert "unknown section [polcy]" in err
        assert "Traceback" not in err


def test_cli_check_prints_rows_and_columns(tmp_path, capsys):
    path = write_site(tmp_path, GOOD)

    assert cli.main(["check", "--config", str(path)]) == 0

    out = capsys.readouterr().out
    assert "3 rows, 2 columns" in out
    assert "age, outcome" in out
    assert f"server key: {PUBLIC_KEY}" in out
    assert "policy: consortium any" in out
    assert "policy: models logistic_regression, mlp" in out
    assert "policy: epsilon per plan no limit, in total no limit" in out


def test_cli_check_unreadable_data_exits_2(tmp_path, capsys):
    path = write_site(tmp_path, _replace("data.csv", "data.parquet"))
    (tmp_path / "data.parquet").write_bytes(b"this is not parquet")

    assert cli.main(["check", "--config", str(path)]) == 2
    assert "data.parquet" in capsys.readouterr().err


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "usage: quorum-agent" in capsys.readouterr().err


def test_log_lines_show_the_site_name():
    formatter = cli._SiteFormatter("site-a")
    ours = logging.LogRecord("clientagent.connection", logging.INFO, "", 0, "round 3/20", (), None)
    theirs = logging.LogRecord("websockets.client", logging.INFO, "", 0, "x", (), None)

    assert " INFO quorum-agent[site-a]: round 3/20" in formatter.format(ours)
    assert "quorum-agent[websockets.client]: x" in formatter.format(theirs)
    assert ours.name == "clientagent.connection"  # the shared record is left alone
