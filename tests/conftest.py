"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _blob_dir(settings: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Every test gets its own blob storage folder and server signing key."""
    settings.QUORUM_BLOB_DIR = tmp_path / "blobs"
    settings.QUORUM_SIGNING_KEY_FILE = tmp_path / "keys" / "server-ed25519.pem"
