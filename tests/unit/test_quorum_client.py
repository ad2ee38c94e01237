"""The quorum client's own parts: plan files, error bodies, the config file, and the model
download's checksum check against a small stand-in server for the endpoints it codes against."""

from __future__ import annotations

import hashlib
import http.server
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from quorum import config
from quorum.cli import main
from quorum.client import QuorumError, error_from_response
from quorum.planfile import read_plan_file
from tests.factories import plan_spec


def test_a_wrapped_plan_file_carries_name_and_silos_and_faults_get_spec_paths(
    tmp_path: Path,
) -> None:
    path = tmp_path / "plan.yaml"
    path.write_text(json.dumps({"name": "Readmission", "silos": [1, 2], "spec": plan_spec()}))
    plan = read_plan_file(str(path))
    assert (plan.name, plan.silos, plan.errors) == ("Readmission", [1, 2], {})
    path.write_text(json.dumps({"name": 3, "silos": "all", "spec": plan_spec(seed="x")}))
    errors = read_plan_file(str(path)).errors
    assert set(errors) == {"name", "silos", "spec.seed"}


def test_yaml_syntax_errors_give_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "plan.yml"
    path.write_text("model:\n  kind: [unclosed\n")
    with pytest.raises(QuorumError, match=r"not valid YAML at line \d+, column \d+"):
        read_plan_file(str(path))


def test_nested_field_errors_are_flattened_to_dotted_paths() -> None:
    body = json.dumps({"spec": {"training": {"lr": ["too big"]}}, "non_field_errors": ["no"]})
    error = error_from_response(400, body.encode())
    assert error.message == "no" and error.status == 400
    assert error.field_errors == {"spec.training.lr": ["too big"]}
    assert "spec.training.lr: too big" in str(error)
    assert error_from_response(502, b"<html>bad gateway</html>", "Bad Gateway").message == (
        "Bad Gateway"
    )


def test_the_config_file_is_private_and_the_environment_overrides_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUORUM_CONFIG", str(tmp_path / "q" / "config.json"))
    monkeypatch.delenv("QUORUM_URL", raising=False)
    monkeypatch.setenv("QUORUM_TOKEN", "from-env")
    path = config.save(url="http://a", token="stored")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert config.load() == {"url": "http://a", "token": "from-env"}


MODEL = b"safetensors bytes of the final model"


class StandIn(http.server.BaseHTTPRequestHandler):
    """The model endpoints as the CLI expects them; ``tamper`` serves other bytes."""

    tamper = False

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        routes: dict[str, Any] = {
            "/api/v1/runs/1/models/": {
                "count": 2,
                "next": None,
                "results": [{"id": 6, "number": 0}, {"id": 7, "number": 1}],
            },
            "/api/v1/models/7/": {"id": 7, "checksum": hashlib.sha256(MODEL).hexdigest()},
        }
        if self.path == "/api/v1/models/7/download/":
            body, kind = (MODEL + b"!" if self.tamper else MODEL), "application/octet-stream"
        elif self.path in routes:
            body, kind = json.dumps(routes[self.path]).encode(), "application/json"
        else:
            body, kind = b'{"detail": "Not found."}', "application/json"
            self.send_response(404)
        if self.path in routes or self.path.endswith("/download/"):
            self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[type[StandIn]]:
    handler = type("Handler", (StandIn,), {"tamper": False})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("QUORUM_CONFIG", str(tmp_path / "config.json"))
    monkeypatch.setenv("QUORUM_URL", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setenv("QUORUM_TOKEN", "t")
    yield handler
    server.shutdown()
    server.server_close()


def test_model_download_writes_the_runs_latest_version_after_checking_its_sha256(
    stand_in: type[StandIn], tmp_path: Path, capsys: Any
) -> None:
    out = tmp_path / "model.safetensors"
    assert main(["model", "download", "1", "--out", str(out)]) == 0
    assert out.read_bytes() == MODEL
    assert "model 7" in capsys.readouterr().out


def test_a_download_that_does_not_match_its_checksum_is_not_written(
    stand_in: type[StandIn], tmp_path: Path, capsys: Any
) -> None:
    stand_in.tamper = True
    out = tmp_path / "model.safetensors"
    assert main(["model", "download", "model:7", "--out", str(out)]) == 1
    assert "does not match its checksum" in capsys.readouterr().err
    assert not out.exists()


def test_an_endpoint_the_server_lacks_is_named(
    stand_in: type[StandIn], tmp_path: Path, capsys: Any
) -> None:
    assert main(["model", "download", "1", "--format", "onnx", "--out", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "the server does not offer the onnx download of model 7 (404)" in err
    assert "Traceback" not in err
