"""The server's signing key file, created by whichever process needs it first (production runs
several ASGI processes and Celery workers): one key for all of them, complete, mode 0600."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_processes_starting_together_agree_on_one_key(tmp_path: Path) -> None:
    key_file = tmp_path / "keys" / "server-ed25519.pem"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings",
        "QUORUM_SIGNING_KEY_FILE": str(key_file),
    }
    code = (
        "import django; django.setup(); "
        "from federation.signing import server_public_key_text; print(server_public_key_text())"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
        )
        for _ in range(4)
    ]
    keys = {proc.communicate(timeout=60)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert len(keys) == 1 and next(iter(keys)).startswith("ed25519:")
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert sorted(p.name for p in key_file.parent.iterdir()) == [key_file.name]  # no temp files
