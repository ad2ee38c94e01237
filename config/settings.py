"""Django settings for Quorum, driven by the environment.

Two profiles share one code path (docs/operations.md):
- embedded (default): SQLite, in-memory channel layer, orchestration tasks run in-process;
- production: PostgreSQL (DATABASE_URL), channels-redis and Celery on Redis (REDIS_URL).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

BASE_DIR = Path(__file__).resolve().parent.parent


def env_bool(name: str, default: bool) -> bool:
    """Read a boolean environment variable (1/true/yes/on)."""
    raw = os.environ.get(name)
    if raw is None:
        return default
    return raw.strip().lower() in {"1", "true", "yes", "on"}


def env_int(name: str, default: int) -> int:
    """Read an integer environment variable, refusing garbage with a clear message."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not an integer") from exc


def env_float(name: str, default: float) -> float:
    """Read a float environment variable, refusing garbage with a clear message."""
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a number") from exc


QUORUM_PROFILE = os.environ.get("QUORUM_PROFILE", "embedded")
if QUORUM_PROFILE not in {"embedded", "production"}:
    raise ImproperlyConfigured(
        f"QUORUM_PROFILE={QUORUM_PROFILE!r}: expected 'embedded' or 'production'"
    )
PRODUCTION = QUORUM_PROFILE == "production"

# Where the server keeps its state on disk: SQLite database, blobs, demo sites.
QUORUM_HOME = Path(os.environ.get("QUORUM_HOME", BASE_DIR / "var")).resolve()

DEBUG = env_bool("DEBUG", not PRODUCTION)
SECRET_KEY = os.environ.get("SECRET_KEY", "")
if not SECRET_KEY:
    if PRODUCTION:
        raise ImproperlyConfigured("SECRET_KEY must be set in the production profile")
    SECRET_KEY = "embedded-profile-insecure-key-do-not-use-in-production"
ALLOWED_HOSTS = [
    h.strip()
    for h in os.environ.get(
        "ALLOWED_HOSTS", "" if PRODUCTION else "localhost,127.0.0.1,[::1]"
    ).split(",")
    if h.strip()
]
if not PRODUCTION:
    ALLOWED_HOSTS += ["testserver"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "rest_framework.authtoken",
    "django_filters",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "channels",
    "federation",
    "dashboard",
]

MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
]

ROOT_URLCONF = "config.urls"
ASGI_APPLICATION = "config.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

_default_sqlite = QUORUM_HOME / "quorum.sqlite3"
if "DATABASE_URL" not in os.environ:
    QUORUM_HOME.mkdir(parents=True, exist_ok=True)
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{_default_sqlite}"), conn_max_age=0
    )
}
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (server, demo, tests) share the file: WAL and IMMEDIATE transactions
    # turn lock contention into waiting instead of "database is locked" errors.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    # The test database is a file, not memory: end-to-end tests start server processes that
    # must see it. One per test process, so parallel runs do not collide.
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get(
            "QUORUM_TEST_DB",
            str(Path(tempfile.gettempdir()) / f"quorum-test-{os.getpid()}.sqlite3"),
        )
    }

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATICFILES_DIRS = [BASE_DIR / "static"]
STATIC_ROOT = QUORUM_HOME / "staticfiles"

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Token first: an anonymous API client gets 401 with "WWW-Authenticate: Token" (docs/api.md).
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.TokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_PAGINATION_CLASS": "federation.api.pagination.PageNumberPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_FILTER_BACKENDS": ["django_filters.rest_framework.DjangoFilterBackend"],
    "EXCEPTION_HANDLER": "federation.api.exceptions.api_exception_handler",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "Quorum API",
    "DESCRIPTION": "Governed federated learning for healthcare and finance consortia.",
    "VERSION": "1.0.0",
    # Swagger UI and ReDoc from drf-spectacular-sidecar's static files: no CDN, works offline.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "COMPONENT_SPLIT_REQUEST": True,
    "SCHEMA_PATH_PREFIX": r"/api/v[0-9]+",
    "ENUM_NAME_OVERRIDES": {
        "PlanStatusEnum": "federation.models.TrainingPlan.Status",
        "RunStatusEnum": "federation.models.Run.Status",
        "RoundStatusEnum": "federation.models.Round.Status",
    },
}
# Request bodies over 1 MiB are refused (413) before the API parses them. Under ASGI Django has
# already read the body by then: cap bodies at the reverse proxy too (docs/operations.md).
DATA_UPLOAD_MAX_MEMORY_SIZE = 1 << 20

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
if PRODUCTION:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1

# Quorum's own settings.
QUORUM_BLOB_DIR = Path(os.environ.get("QUORUM_BLOB_DIR", QUORUM_HOME / "blobs")).resolve()
QUORUM_MAX_FRAME_BYTES = env_int("QUORUM_MAX_FRAME_BYTES", 1 << 20)
QUORUM_MAX_MESSAGE_BYTES = env_int("QUORUM_MAX_MESSAGE_BYTES", 256 << 20)
QUORUM_HEARTBEAT_SECONDS = env_float("QUORUM_HEARTBEAT_SECONDS", 5.0)
# A silo is offline when no heartbeat came for this long.
QUORUM_SILO_OFFLINE_AFTER = env_float("QUORUM_SILO_OFFLINE_AFTER", 20.0)
# How often the embedded profile's sweeper (or Celery beat, in production) checks deadlines.
QUORUM_SWEEP_SECONDS = env_float("QUORUM_SWEEP_SECONDS", 1.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "quorum": {"handlers": ["console"], "level": os.environ.get("QUORUM_LOG_LEVEL", "INFO")},
        "django": {"handlers": ["console"], "level": "WARNING"},
    },
}
# An aggregation that has not finished after this long is presumed lost (worker died) and rerun.
QUORUM_AGGREGATION_STALE_SECONDS = env_float("QUORUM_AGGREGATION_STALE_SECONDS", 120.0)
# Embedded profile: the ASGI server process runs orchestration steps and the sweeper. Tests of a
# consumer in isolation turn it off.
QUORUM_EMBEDDED_ORCHESTRATOR = env_bool("QUORUM_EMBEDDED_ORCHESTRATOR", True)
# The server's Ed25519 key for signing run authorizations (created on first use, mode 0600).
QUORUM_SIGNING_KEY_FILE = Path(
    os.environ.get("QUORUM_SIGNING_KEY_FILE", QUORUM_HOME / "keys" / "server-ed25519.pem")
).resolve()
