"""Where ``quorum login`` keeps the server URL and the API token: a 0600 JSON file.

``$QUORUM_CONFIG`` names the file; by default it is ``~/.config/quorum/config.json`` (under
``$XDG_CONFIG_HOME`` when set). ``$QUORUM_URL`` and ``$QUORUM_TOKEN`` override what it holds.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from quorum.client import QuorumError


def config_path() -> Path:
    explicit = os.environ.get("QUORUM_CONFIG")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "quorum" / "config.json"


def load() -> dict[str, str]:
    """The stored settings with the environment's overrides ({} when there are none)."""
    path = config_path()
    stored: dict[str, str] = {}
    if path.exists():
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise QuorumError(
                f"cannot read the configuration {path}: {exc}; run `quorum login` again"
            ) from None
        if isinstance(data, dict):
            stored = {k: v for k, v in data.items() if isinstance(v, str)}
    for key, env in (("url", "QUORUM_URL"), ("token", "QUORUM_TOKEN")):
        if os.environ.get(env):
            stored[key] = os.environ[env]
    return stored


def save(*, url: str, token: str) -> Path:
    """Write the settings readable by the owner only (0600), replacing the file atomically."""
    path = config_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            tmp.unlink()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"url": url, "token": token}, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
        os.chmod(path, 0o600)
    except OSError as exc:
        raise QuorumError(f"cannot write the configuration {path}: {exc}") from None
    return path
