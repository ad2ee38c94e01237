"""docs/quickstart.md runs as written: its ```sh blocks, in order, in one bash process.

A fresh QUORUM_HOME (database, keys, blobs, the people's folders) and port; the real server and
four real agent processes that the document itself starts. The document must end with a
trained model (a valid safetensors file) and print the run's fairness report. Every process the
script started is killed afterwards, even when it fails: bash runs in its own process group.
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from federation.server import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "quickstart.md"
TIMEOUT = 300


def sh_blocks(text: str) -> list[str]:
    """The document's ```sh blocks, in order."""
    return re.findall(r"^```sh\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)


def test_the_document_has_the_steps() -> None:
    blocks = sh_blocks(DOC.read_text(encoding="utf-8"))
    script = "\n".join(blocks)
    for step in ("create_consortium", "quorum-agent init", "quorum silo register", "run watch"):
        assert step in script
    assert "model download" in blocks[-2]


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(1.0)


def test_quickstart_runs_as_written(tmp_path: Path) -> None:
    script = "set -e -o pipefail\n" + "\n".join(sh_blocks(DOC.read_text(encoding="utf-8")))
    home = tmp_path / "quickstart"
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("QUORUM_", "DJANGO_", "DATABASE_URL"))
    }
    env.update(
        {
            # The venv's tools first, as for a reader who activated it.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONPATH": str(ROOT),
            "QUORUM_HOME": str(home),
            "QUORUM_PORT": str(free_port()),
            "HOME": str(tmp_path),
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
        }
    )
    log = tmp_path / "quickstart.log"
    started = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            _kill_group(proc)
    elapsed = time.monotonic() - started
    output = log.read_text(errors="replace")
    print(f"quickstart wall time: {elapsed:.1f} s")

    def logs() -> str:
        tails = [f"--- quickstart output:\n{output[-6000:]}"]
        for path in [home / "server.log", *sorted((home / "people").glob("*/agent.log"))]:
            if path.exists():
                tails.append(f"--- {path}:\n" + path.read_text(errors="replace")[-3000:])
        return "\n".join(tails)

    assert code == 0, f"the quickstart's commands failed (exit {code})\n{logs()}"

    model = home / "people" / "dana" / "heart.safetensors"
    assert model.exists(), logs()
    data = model.read_bytes()
    (header_size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + header_size])
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    assert tensors and all(v["dtype"] and v["shape"] for v in tensors.values())
    end = max(v["data_offsets"][1] for v in tensors.values())
    assert 8 + header_size + end == len(data)

    assert "\nfairness\n" in output, logs()
    assert "limit: " in output and "completed" in output
