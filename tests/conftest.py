"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def _blob_dir(settings: pytest.FixtureRequest, tmp_path: Path) -> None:
    """Every test gets its own blob storage folder and server signing key."""
    settings.QUORUM_BLOB_DIR = tmp_path / "blobs"
    settings.QUORUM_SIGNING_KEY_FILE = tmp_path / "keys" / "server-ed25519.pem"


@pytest.fixture(autouse=True)
def _fast_password_hashing(settings: pytest.FixtureRequest) -> None:
    """PBKDF2 costs ~0.3 s a user; tests need passwords checked, not slow to crack."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture(autouse=True)
def _fresh_abuse_counters() -> None:
    """Sign-in lock-outs (Django's cache), agent token failures and the agent report audit budget
    (per process) start empty."""
    from django.core.cache import cache

    from federation.consumers import reset_auth_failure_tracking
    from federation.services.agent_reports import reset_report_budget

    cache.clear()
    reset_auth_failure_tracking()
    reset_report_budget()
