"""The production profile's settings come from the environment and pass `check --deploy`.

Each case runs Django in a subprocess: settings are read once per process.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from django.conf import settings

ROOT = Path(__file__).resolve().parents[2]
STRONG_KEY = secrets.token_urlsafe(50)  # long and random: what --deploy wants

PRODUCTION = {
    "QUORUM_PROFILE": "production",
    "SECRET_KEY": STRONG_KEY,
    "DATABASE_URL": "postgres://quorum@127.0.0.1:5432/quorum",  # never connected to by `check`
    "REDIS_URL": "redis://127.0.0.1:6379/5",
    "ALLOWED_HOSTS": "quorum.example.org",
}


def django_env(**overrides: str | None) -> dict[str, str]:
    """This environment without Quorum's settings variables, plus the given ones (None: unset)."""
    names = {
        "QUORUM_PROFILE",
        "SECRET_KEY",
        "DATABASE_URL",
        "REDIS_URL",
        "ALLOWED_HOSTS",
        "DEBUG",
        "CELERY_BROKER_URL",
        "CSRF_TRUSTED_ORIGINS",
        "SECURE_PROXY_SSL_HEADER",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_PRELOAD",
        "STATIC_ROOT",
    }
    env = {k: v for k, v in os.environ.items() if k not in names}
    env["DJANGO_SETTINGS_MODULE"] = "config.settings"
    env.update({k: v for k, v in overrides.items() if v is not None})
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def read_settings(env: dict[str, str], *names: str) -> dict[str, object]:
    """Values of settings in a fresh process with this environment (repr for non-JSON)."""
    code = (
        "import json, django; django.setup(); from django.conf import settings; "
        f"print(json.dumps({{n: getattr(settings, n, None) for n in {list(names)!r}}}, default=repr))"
    )
    done = run(["-c", code], env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_check_deploy_is_clean_with_production_settings() -> None:
    done = run(
        ["manage.py", "check", "--deploy", "--fail-level", "WARNING"], django_env(**PRODUCTION)
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "System check identified no issues" in done.stdout + done.stderr


def test_production_defaults_are_hardened_and_env_driven() -> None:
    values = read_settings(
        django_env(**PRODUCTION, CSRF_TRUSTED_ORIGINS="https://quorum.example.org"),
        "DEBUG",
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_INCLUDE_SUBDOMAINS",
        "SESSION_COOKIE_SECURE",
        "CSRF_COOKIE_SECURE",
        "SECURE_PROXY_SSL_HEADER",
        "CSRF_TRUSTED_ORIGINS",
        "CHANNEL_LAYERS",
        "CELERY_BROKER_URL",
        "QUORUM_SWEEP_SECONDS",
    )
    assert values["DEBUG"] is False
    assert values["SECURE_SSL_REDIRECT"] is True
    assert values["SECURE_HSTS_SECONDS"] == 31536000
    assert values["SECURE_HSTS_INCLUDE_SUBDOMAINS"] is True
    assert values["SESSION_COOKIE_SECURE"] is True and values["CSRF_COOKIE_SECURE"] is True
    assert values["SECURE_PROXY_SSL_HEADER"] == ["HTTP_X_FORWARDED_PROTO", "https"]
    assert values["CSRF_TRUSTED_ORIGINS"] == ["https://quorum.example.org"]
    layer = values["CHANNEL_LAYERS"]["default"]
    assert layer["BACKEND"] == "channels_redis.core.RedisChannelLayer"
    host = layer["CONFIG"]["hosts"][0]
    assert host["address"] == "redis://127.0.0.1:6379/5"
    assert host["socket_timeout"] > 5  # longer than channels_redis's 5 s blocking pop
    assert values["CELERY_BROKER_URL"] == "redis://127.0.0.1:6379/5"
    assert values["QUORUM_SWEEP_SECONDS"] == 2.0


def test_each_hardening_setting_can_be_changed_from_the_environment() -> None:
    values = read_settings(
        django_env(
            **PRODUCTION,
            SECURE_SSL_REDIRECT="0",
            SECURE_HSTS_SECONDS="3600",
            SECURE_HSTS_PRELOAD="1",
            SECURE_PROXY_SSL_HEADER="",
        ),
        "SECURE_SSL_REDIRECT",
        "SECURE_HSTS_SECONDS",
        "SECURE_HSTS_PRELOAD",
        "SECURE_PROXY_SSL_HEADER",
        "SILENCED_SYSTEM_CHECKS",
    )
    assert values["SECURE_SSL_REDIRECT"] is False
    assert values["SECURE_HSTS_SECONDS"] == 3600
    assert values["SECURE_HSTS_PRELOAD"] is True
    assert values["SECURE_PROXY_SSL_HEADER"] is None
    assert values["SILENCED_SYSTEM_CHECKS"] == []


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"SECRET_KEY": None}, "SECRET_KEY must be set"),
        ({"DATABASE_URL": None}, "DATABASE_URL must be set"),
        ({"DATABASE_URL": "sqlite:////tmp/quorum.sqlite3"}, "needs PostgreSQL"),
        ({"SECURE_PROXY_SSL_HEADER": "HTTP_X_FORWARDED_PROTO"}, "SECURE_PROXY_SSL_HEADER"),
        ({"QUORUM_TRUSTED_PROXIES": "10.0.0.1,nginx"}, "'nginx' is not an IP address"),
    ],
    ids=["no-secret-key", "no-database-url", "sqlite", "bad-proxy-header", "bad-proxy-list"],
)
def test_production_refuses_to_start_without_what_it_needs(
    overrides: dict[str, str | None], message: str
) -> None:
    done = run(["manage.py", "check"], django_env(**{**PRODUCTION, **overrides}))
    assert done.returncode != 0
    assert "ImproperlyConfigured" in done.stderr and message in done.stderr, done.stderr


def test_the_embedded_profile_is_unchanged() -> None:
    """This test process runs the embedded profile: no HTTPS-only settings, in-memory layer."""
    assert settings.QUORUM_PROFILE == "embedded"
    assert settings.SECURE_SSL_REDIRECT is False
    assert settings.SECURE_HSTS_SECONDS == 0
    assert settings.SESSION_COOKIE_SECURE is False and settings.CSRF_COOKIE_SECURE is False
    assert getattr(settings, "SECURE_PROXY_SSL_HEADER", None) is None
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"] == "channels.layers.InMemoryChannelLayer"
    assert settings.QUORUM_SWEEP_SECONDS == 1.0


def test_collectstatic_gathers_what_the_proxy_serves(tmp_path: Path) -> None:
    """Production serves /static/ from STATIC_ROOT through the reverse proxy (DEBUG is off)."""
    root = tmp_path / "static"
    done = run(
        ["manage.py", "collectstatic", "--noinput", "-v", "0"],
        django_env(**PRODUCTION, STATIC_ROOT=str(root)),
    )
    assert done.returncode == 0, done.stderr
    assert (root / "admin" / "css" / "base.css").is_file()
    assert (root / "drf_spectacular_sidecar" / "swagger-ui-dist" / "swagger-ui.css").is_file()
    ours = [p.relative_to(ROOT / "static") for p in (ROOT / "static").rglob("*") if p.is_file()]
    assert ours and all((root / p).is_file() for p in ours), "the dashboard's own assets"
