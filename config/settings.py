"""Django settings for Quorum, driven by the environment.

Two profiles share one code path (docs/operations.md):
- embedded (default): SQLite, in-memory channel layer, orchestration tasks run in-process;
- production: PostgreSQL (DATABASE_URL), channels-redis and Celery on Redis (REDIS_URL).
"""

from __future__ import annotations

import ipaddress
import os
import tempfile
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from config.files import private_folder, private_sqlite

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


def env_list(name: str, default: str = "") -> list[str]:
    """Read a comma-separated list environment variable."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


# Reverse proxies whose X-Forwarded-For names the client (addresses or networks, e.g.
# "10.0.0.5,10.1.0.0/16"). Empty (the default): the header is ignored and every limiter counts the
# peer's own address. From a listed proxy the client is the right-most address of the header that
# is not itself a listed proxy, so a client cannot pick the address it is counted under
# (config/security.py, forwarded_client).
QUORUM_TRUSTED_PROXIES = env_list("QUORUM_TRUSTED_PROXIES", "")
for _proxy in QUORUM_TRUSTED_PROXIES:
    try:
        ipaddress.ip_network(_proxy, strict=False)
    except ValueError:
        raise ImproperlyConfigured(
            f"QUORUM_TRUSTED_PROXIES: {_proxy!r} is not an IP address or network "
            "(e.g. 10.0.0.5 or 10.1.0.0/16)"
        ) from None

# HTTPS hardening (`manage.py check --deploy` is clean with the production defaults). TLS ends at
# the reverse proxy, which must set X-Forwarded-Proto (and overwrite any value a client sent).
SECURE_SSL_REDIRECT = env_bool("SECURE_SSL_REDIRECT", PRODUCTION)
SECURE_REDIRECT_EXEMPT = [r"^healthz$", r"^metrics$"]  # probes and scrapers may speak plain HTTP
SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS", 31536000 if PRODUCTION else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", PRODUCTION)
# Preloading is a commitment for the whole registrable domain: opt in with SECURE_HSTS_PRELOAD=1.
SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD", False)
SESSION_COOKIE_SECURE = env_bool("SESSION_COOKIE_SECURE", PRODUCTION)
CSRF_COOKIE_SECURE = env_bool("CSRF_COOKIE_SECURE", PRODUCTION)
_proxy_ssl_header = env_list(
    "SECURE_PROXY_SSL_HEADER", "HTTP_X_FORWARDED_PROTO,https" if PRODUCTION else ""
)
if _proxy_ssl_header:
    if len(_proxy_ssl_header) != 2:
        raise ImproperlyConfigured(
            "SECURE_PROXY_SSL_HEADER must be 'HEADER,value' (e.g. HTTP_X_FORWARDED_PROTO,https) "
            "or empty"
        )
    SECURE_PROXY_SSL_HEADER = (_proxy_ssl_header[0], _proxy_ssl_header[1])
# Origins (scheme://host[:port]) allowed to POST forms besides the site's own.
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")
SILENCED_SYSTEM_CHECKS = [] if SECURE_HSTS_PRELOAD else ["security.W021"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
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
if PRODUCTION and not os.environ.get("DATABASE_URL"):
    raise ImproperlyConfigured(
        "DATABASE_URL must be set in the production profile, e.g. postgres://quorum@db:5432/quorum"
    )
if "DATABASE_URL" not in os.environ:
    private_folder(QUORUM_HOME)
DATABASES = {
    "default": dj_database_url.parse(
        os.environ.get("DATABASE_URL", f"sqlite:///{_default_sqlite}"),
        conn_max_age=env_int("CONN_MAX_AGE", 0),
        conn_health_checks=True,
    )
}
if PRODUCTION and DATABASES["default"]["ENGINE"] != "django.db.backends.postgresql":
    # Several ASGI processes and Celery workers run orchestration steps concurrently: the state
    # machine relies on PostgreSQL's row locks (select_for_update).
    raise ImproperlyConfigured(
        f"the production profile needs PostgreSQL; DATABASE_URL names "
        f"{DATABASES['default']['ENGINE']}"
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # A database that does not answer fails a connection attempt in seconds, not at the TCP
    # timeout: requests then answer 503 (config/errors.py) and health probes stay prompt.
    DATABASES["default"].setdefault("OPTIONS", {}).setdefault(
        "connect_timeout", env_int("QUORUM_DB_CONNECT_TIMEOUT", 5)
    )
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql" and env_bool(
    "QUORUM_DB_POOL", PRODUCTION
):
    # A psycopg pool per process (Django's "pool" option). Without one, every database call of
    # an agent connection opened a new PostgreSQL connection (CONN_MAX_AGE=0) and 1,000 agents
    # connecting at once did not get through in 120 s (bench/load.py); persistent connections
    # instead are per thread, which under ASGI means per request: a pool is Django's advice.
    if DATABASES["default"]["CONN_MAX_AGE"]:
        raise ImproperlyConfigured("CONN_MAX_AGE must be 0 with QUORUM_DB_POOL (the pool reuses)")
    DATABASES["default"].setdefault("OPTIONS", {})["pool"] = {
        "min_size": env_int("QUORUM_DB_POOL_MIN", 1),
        "max_size": env_int("QUORUM_DB_POOL_MAX", 20),
        # How long a request waits for a pooled connection before it answers 503: with the
        # database down the pool has none to give (it was 30 s, longer than load balancers wait).
        "timeout": env_float("QUORUM_DB_POOL_TIMEOUT", 5.0),
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.postgresql":
    # pytest-django creates (and drops) this database for a test session: one per test process.
    DATABASES["default"]["TEST"] = {
        "NAME": os.environ.get("QUORUM_TEST_DB") or f"quorum_test_{os.getpid()}"
    }
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3" and str(
    DATABASES["default"]["NAME"]
) not in ("", ":memory:"):
    # The database holds token hashes, approvals and the audit log: 0600 in a 0700 folder.
    private_sqlite(Path(DATABASES["default"]["NAME"]))
if DATABASES["default"]["ENGINE"] == "django.db.backends.sqlite3":
    # Several processes (server, demo, tests) share the file: WAL and IMMEDIATE transactions
    # turn lock contention into waiting instead of "database is locked" errors.
    DATABASES["default"]["OPTIONS"] = {
        "timeout": 30,
        "transaction_mode": "IMMEDIATE",
        "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
    }
    if "CONN_MAX_AGE" not in os.environ:
        # Embedded profile: the few threads that touch the database (the consumers' database
        # thread, the orchestration thread) keep their SQLite connection instead of opening
        # one (and running the PRAGMAs) per step: 16 connections a round before
        # (bench/round_split.py). A file connection holds no lock between transactions.
        DATABASES["default"]["CONN_MAX_AGE"] = 600
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
# Production: `manage.py collectstatic` copies every static file here and the reverse proxy serves
# it under /static/ (docs/operations.md). With DEBUG (embedded) Django serves them itself.
STATIC_ROOT = Path(os.environ.get("STATIC_ROOT", QUORUM_HOME / "staticfiles")).resolve()

LOGIN_URL = "/login/"
LOGIN_REDIRECT_URL = "/"

REST_FRAMEWORK = {
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    # Token first: an anonymous API client gets 401 with "WWW-Authenticate: Token" (docs/api.md).
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "federation.api.authentication.ApiTokenAuthentication",
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
            "CONFIG": {
                "hosts": [
                    {
                        "address": os.environ.get("CHANNEL_LAYER_URL", REDIS_URL),
                        # A consumer waits for messages with a 5 s BZPOPMIN; redis-py >= 8 reads
                        # with a 5 s socket timeout by default, which tears every idle consumer
                        # down (django/channels_redis#422). Longer, but still finite.
                        "socket_timeout": env_float("QUORUM_REDIS_SOCKET_TIMEOUT", 30.0),
                        "socket_connect_timeout": 5.0,
                        "socket_keepalive": True,
                        # redis-py >= 8 caps a pool at 100 connections and *refuses* the 101st
                        # concurrent command (MaxConnectionsError): with 1,000 agents saying
                        # hello or heartbeating at once, consumers crashed (bench/load.py).
                        "max_connections": env_int("QUORUM_REDIS_MAX_CONNECTIONS", 5000),
                    }
                ],
                # Agent connections last for days; consumers re-join their group on every
                # heartbeat, so this only bounds how long a crashed process's channel lingers.
                "group_expiry": env_int("QUORUM_GROUP_EXPIRY_SECONDS", 86400),
                # Messages waiting for one ASGI process: channels_redis keys every consumer of a
                # process to ONE Redis key and silently drops what exceeds this (default 100),
                # so a round opened for 200 silos lost some of their tasks (bench/load.py).
                "capacity": env_int("QUORUM_CHANNEL_LAYER_CAPACITY", 10000),
            },
        }
    }
else:
    CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}

# Celery (production profile): orchestration steps and the deadline sweep (config/celery.py).
CELERY_BROKER_URL = os.environ.get("CELERY_BROKER_URL", REDIS_URL)
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
# A step is acknowledged after it ran: a worker that dies mid-step leaves the message to be
# delivered again, and every step is idempotent (it re-reads the database).
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Redis redelivers an unacknowledged message after this long. It must exceed the longest
# countdown (a round's deadline); the sweep covers a lost step well before.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": env_int("QUORUM_CELERY_VISIBILITY_TIMEOUT", 3600)
}
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

# Quorum's own settings.
QUORUM_BLOB_DIR = Path(os.environ.get("QUORUM_BLOB_DIR", QUORUM_HOME / "blobs")).resolve()
QUORUM_MAX_FRAME_BYTES = env_int("QUORUM_MAX_FRAME_BYTES", 1 << 20)
QUORUM_MAX_MESSAGE_BYTES = env_int("QUORUM_MAX_MESSAGE_BYTES", 256 << 20)
# The largest weights file of an uploaded model (federation.services.uploaded_models).
QUORUM_MAX_UPLOADED_MODEL_BYTES = env_int("QUORUM_MAX_UPLOADED_MODEL_BYTES", 64 << 20)
QUORUM_HEARTBEAT_SECONDS = env_float("QUORUM_HEARTBEAT_SECONDS", 5.0)
# A silo is offline when no heartbeat came for this long.
QUORUM_SILO_OFFLINE_AFTER = env_float("QUORUM_SILO_OFFLINE_AFTER", 20.0)
# How often the embedded profile's sweeper (or Celery beat, in production) checks deadlines.
QUORUM_SWEEP_SECONDS = env_float("QUORUM_SWEEP_SECONDS", 2.0 if PRODUCTION else 1.0)

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        # Control characters in a message (a newline in an agent's error reason) are escaped:
        # a value from the network cannot forge a log line (fedcore/logsafe.py).
        "plain": {
            "()": "fedcore.logsafe.EscapingFormatter",
            "format": "%(asctime)s %(levelname)s %(name)s: %(message)s",
        }
    },
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "loggers": {
        "quorum": {"handlers": ["console"], "level": os.environ.get("QUORUM_LOG_LEVEL", "INFO")},
        "django": {"handlers": ["console"], "level": "WARNING"},
        # Celery workers and beat log through this configuration too (config/celery.py).
        "celery": {"handlers": ["console"], "level": os.environ.get("CELERY_LOG_LEVEL", "INFO")},
    },
}
# An aggregation that has not finished after this long is presumed lost (worker died) and rerun.
# On SIGTERM the server closes every connection and exits within about this many seconds, even
# when a connection's clean-up is stuck on the database (federation.server.serve).
QUORUM_SHUTDOWN_GRACE_SECONDS = env_float("QUORUM_SHUTDOWN_GRACE_SECONDS", 3.0)
# After the blob store failed to write a site's update, the task is sent again after this many
# seconds, doubling each time (at most 30 s), while the round's deadline allows.
QUORUM_BLOB_RETRY_SECONDS = env_float("QUORUM_BLOB_RETRY_SECONDS", 2.0)
QUORUM_AGGREGATION_STALE_SECONDS = env_float("QUORUM_AGGREGATION_STALE_SECONDS", 120.0)
# Embedded profile: the ASGI server process runs orchestration steps and the sweeper. Tests of a
# consumer in isolation turn it off.
QUORUM_EMBEDDED_ORCHESTRATOR = env_bool("QUORUM_EMBEDDED_ORCHESTRATOR", True)
# The server's Ed25519 key for signing run authorizations (created on first use, mode 0600).
QUORUM_SIGNING_KEY_FILE = Path(
    os.environ.get("QUORUM_SIGNING_KEY_FILE", QUORUM_HOME / "keys" / "server-ed25519.pem")
).resolve()
# API tokens (manage.py api_token, POST /api/v1/me/tokens/) expire after this many days; stored as
# SHA-256 only. last_used_at is written at most once per QUORUM_API_TOKEN_TOUCH_SECONDS.
QUORUM_API_TOKEN_DAYS = env_int("QUORUM_API_TOKEN_DAYS", 90)
QUORUM_API_TOKEN_MAX_DAYS = env_int("QUORUM_API_TOKEN_MAX_DAYS", 365)
QUORUM_API_TOKEN_TOUCH_SECONDS = env_int("QUORUM_API_TOKEN_TOUCH_SECONDS", 300)
# GET /metrics (Prometheus text format) answers only with this bearer token; unset: off (404).
QUORUM_METRICS_TOKEN = os.environ.get("QUORUM_METRICS_TOKEN", "")

# Hostile input (docs/security.md, "Hostile input"; docs/operations.md lists them all).
# A connection with a valid token that sends no hello within this long is closed (4408).
QUORUM_HELLO_TIMEOUT_SECONDS = env_float("QUORUM_HELLO_TIMEOUT_SECONDS", 30.0)
# A chunked binary message whose next frame does not arrive within this long is dropped and its
# partial buffer freed (error "timeout"; the connection stays open).
QUORUM_UPLOAD_STALL_SECONDS = env_float("QUORUM_UPLOAD_STALL_SECONDS", 120.0)
# After this many refused agent tokens from one address within the window, that address's
# connections are closed (1013, try again later) without a database look-up until the window
# ends. Counted per server process. Refusals are audited as one aggregated event per interval.
QUORUM_AGENT_AUTH_FAILURE_LIMIT = env_int("QUORUM_AGENT_AUTH_FAILURE_LIMIT", 10)
QUORUM_AGENT_AUTH_FAILURE_WINDOW_SECONDS = env_float(
    "QUORUM_AGENT_AUTH_FAILURE_WINDOW_SECONDS", 300.0
)
# At most this many token look-ups from one address in flight at once (more: "try again later").
QUORUM_AGENT_AUTH_MAX_PENDING = env_int("QUORUM_AGENT_AUTH_MAX_PENDING", 100)
QUORUM_AGENT_AUTH_AUDIT_INTERVAL_SECONDS = env_float(
    "QUORUM_AGENT_AUTH_AUDIT_INTERVAL_SECONDS", 60.0
)
# Audit rows for a connected agent's error frames and refused frames, per silo and server process:
# a token bucket of this many rows at once, refilled at this rate; past it one aggregated
# "agent.reports_suppressed" event per window says how many were left out.
QUORUM_AGENT_REPORT_AUDIT_BURST = env_int("QUORUM_AGENT_REPORT_AUDIT_BURST", 20)
QUORUM_AGENT_REPORT_AUDIT_PER_MINUTE = env_float("QUORUM_AGENT_REPORT_AUDIT_PER_MINUTE", 10.0)
QUORUM_AGENT_REPORT_AUDIT_WINDOW_SECONDS = env_float(
    "QUORUM_AGENT_REPORT_AUDIT_WINDOW_SECONDS", 60.0
)
# Password sign-in (dashboard and admin): after this many failures for one username from one
# address within the window, that pair is locked out for QUORUM_LOGIN_LOCKOUT_SECONDS (HTTP 429).
# Counted in Django's cache: Redis in production, so every process sees the same counts.
QUORUM_LOGIN_FAILURE_LIMIT = env_int("QUORUM_LOGIN_FAILURE_LIMIT", 5)
QUORUM_LOGIN_FAILURE_WINDOW_SECONDS = env_int("QUORUM_LOGIN_FAILURE_WINDOW_SECONDS", 900)
QUORUM_LOGIN_LOCKOUT_SECONDS = env_int("QUORUM_LOGIN_LOCKOUT_SECONDS", 900)
AUTHENTICATION_BACKENDS = ["config.security.RateLimitedModelBackend"]
if PRODUCTION:
    CACHES = {
        "default": {
            "BACKEND": "django.core.cache.backends.redis.RedisCache",
            "LOCATION": os.environ.get("QUORUM_CACHE_URL", REDIS_URL),
        }
    }
else:
    CACHES = {"default": {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}}
# Security headers on every response (config/security.py): a strict Content-Security-Policy
# (scripts only from this server, no inline script), Permissions-Policy, and Django's own
# nosniff, Referrer-Policy, Cross-Origin-Opener-Policy and X-Frame-Options.
MIDDLEWARE.insert(1, "config.security.SecurityHeadersMiddleware")
X_FRAME_OPTIONS = "DENY"
SECURE_CONTENT_TYPE_NOSNIFF = True
SECURE_REFERRER_POLICY = "same-origin"
SECURE_CROSS_ORIGIN_OPENER_POLICY = "same-origin"
# plotly.js sets style attributes and injects a <style> element: styles need 'unsafe-inline'
# (scripts never do). It draws its mode bar icons and exports as data: and blob: images.
QUORUM_CONTENT_SECURITY_POLICY = os.environ.get(
    "QUORUM_CONTENT_SECURITY_POLICY",
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
)
QUORUM_PERMISSIONS_POLICY = "camera=(), microphone=(), geolocation=(), payment=(), usb=()"

# E-mail (invitations to join a consortium; docs/operations.md, "E-mail"). The default backend
# prints each message on the server's console, so an embedded server works without a mail
# server; the inviter also sees the invitation link on the page or in the API answer.
EMAIL_BACKEND = os.environ.get("EMAIL_BACKEND", "django.core.mail.backends.console.EmailBackend")
EMAIL_HOST = os.environ.get("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = os.environ.get("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = os.environ.get("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10)
DEFAULT_FROM_EMAIL = os.environ.get("DEFAULT_FROM_EMAIL", "quorum@localhost")
# Invitation links expire after this many days (an inviter may choose up to the maximum).
QUORUM_INVITATION_DAYS = env_int("QUORUM_INVITATION_DAYS", 7)
QUORUM_INVITATION_MAX_DAYS = env_int("QUORUM_INVITATION_MAX_DAYS", 30)
# The server's address as people reach it (https://quorum.example.org), for links in e-mails and
# in `manage.py create_consortium`'s output. Empty: the address of the request (the command then
# uses http://127.0.0.1:8000, `manage.py serve`'s default).
QUORUM_PUBLIC_URL = os.environ.get("QUORUM_PUBLIC_URL", "").rstrip("/")
