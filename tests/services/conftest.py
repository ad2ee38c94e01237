"""The services suite: the production profile with real PostgreSQL, Redis and Celery.

It runs in its own pytest process whose settings are the production profile from the start
(``make test-services``: QUORUM_PROFILE=production, DATABASE_URL=postgres://...). pytest-django
then creates this session's PostgreSQL test database (quorum_test_<pid>, see config/settings.py)
and drops it at the end. The session claims an empty Redis database number for the channel layer
and the Celery broker, and flushes it at the end.

The tests skip, saying why, only when that is impossible: settings of another profile (a plain
`pytest` run; `make test` runs this suite separately) or PostgreSQL/Redis unreachable (.ci/run
starts both).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

from federation.server import free_port
from tests.services.harness import Stack, claim_redis_db, database_address
from tests.services.tcp_proxy import TcpProxy

SERVICES_DIR = Path(__file__).resolve().parent

_reason: list[str | None] = []


def _unavailable() -> str | None:
    """Why the services suite cannot run here, or None."""
    if _reason:
        return _reason[0]
    _reason.append(_find_reason())
    return _reason[0]


def _find_reason() -> str | None:
    db = settings.DATABASES["default"]
    if settings.QUORUM_PROFILE != "production" or db["ENGINE"] != "django.db.backends.postgresql":
        return (
            "the services suite needs a pytest process with production settings: run "
            "`make test-services` (QUORUM_PROFILE=production DATABASE_URL=postgres://...)"
        )
    import psycopg
    import redis

    host, port = db.get("HOST") or "127.0.0.1", db.get("PORT") or "5432"
    try:
        psycopg.connect(
            host=host,
            port=port,
            user=db.get("USER") or None,
            password=db.get("PASSWORD") or None,
            dbname="postgres",
            connect_timeout=3,
        ).close()
    except psycopg.Error as exc:
        return f"PostgreSQL at {host}:{port} is unreachable ({exc}); .ci/run starts it"
    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=3).ping()
    except redis.RedisError as exc:
        return f"Redis at {settings.REDIS_URL} is unreachable ({exc}); .ci/run starts it"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark this directory's tests `services`; skip them only when the services are missing."""
    ours = [item for item in items if SERVICES_DIR in Path(str(item.path)).resolve().parents]
    if not ours:
        return
    selected = config.getoption("-m") or ""
    reason = None if "not services" in selected else _unavailable()
    for item in ours:
        item.add_marker(pytest.mark.services)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def services_tmp() -> Iterator[Path]:
    """One folder for the session: logs, blobs, the signing key, beat's schedule."""
    path = Path(tempfile.mkdtemp(prefix=f"quorum-services-{os.getpid()}-"))
    yield path
    if os.environ.get("QUORUM_KEEP_SERVICES_TMP") != "1":
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_db() -> Iterator[str]:
    """A Redis database number of our own; this process's channel layer and broker use it too."""
    from django.test.utils import override_settings

    from config.celery import app

    url, client = claim_redis_db(settings.REDIS_URL)
    layer = settings.CHANNEL_LAYERS["default"]
    hosts = [{**host, "address": url} for host in layer["CONFIG"]["hosts"]]
    layers = {"default": {**layer, "CONFIG": {**layer["CONFIG"], "hosts": hosts}}}
    override = override_settings(CHANNEL_LAYERS=layers, CELERY_BROKER_URL=url, REDIS_URL=url)
    override.enable()
    previous_broker = app.conf.broker_url
    app.conf.broker_url = url
    try:
        yield url
    finally:
        app.conf.broker_url = previous_broker
        override.disable()
        client.flushdb()
        client.close()


@pytest.fixture(scope="session")
def stack(
    django_db_setup: Any, django_db_blocker: Any, services_tmp: Path, redis_db: str
) -> Iterator[Stack]:
    """Two ASGI servers, a Celery worker and beat on the session's database and Redis.

    Depends on django_db_setup, so the processes stop before pytest-django drops the database.
    """
    proxy = TcpProxy(database_address())
    with django_db_blocker.unblock():
        stack = Stack(
            tmp=services_tmp,
            redis_url=redis_db,
            blob_dir=services_tmp / "blobs",
            key_file=services_tmp / "keys" / "server-ed25519.pem",
            ports=[free_port(), free_port()],
            db_proxy=proxy,
        )
        stack.build()
        try:
            stack.start()
        except BaseException:
            stack.stop()
            proxy.close()
            raise
    try:
        yield stack
    finally:
        stack.stop()
        proxy.close()


@pytest.fixture(autouse=True)
def _blob_dir(settings: Any, services_tmp: Path) -> None:
    """Overrides tests/conftest.py: one blob folder and signing key, shared with the stack."""
    settings.QUORUM_BLOB_DIR = services_tmp / "blobs"
    settings.QUORUM_SIGNING_KEY_FILE = services_tmp / "keys" / "server-ed25519.pem"
