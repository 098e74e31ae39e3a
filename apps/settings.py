"""Graft settings: one module, read from the environment (12-factor).

With nothing set, Graft runs on embedded defaults: SQLite and Celery's
filesystem broker under `GRAFT_DATA_DIR` (./var). Production sets at least
SECRET_KEY, DATABASE_URL, CELERY_BROKER_URL and ALLOWED_HOSTS.
"""

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import django_stubs_ext
import environ
from django.core.exceptions import ImproperlyConfigured

# Django's generic classes (ModelAdmin, forms, UploadedFile, ...) take type arguments at run time
# too, as the type checker asks of them (`admin.ModelAdmin[Job]`): the django-stubs way.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
env = environ.Env()  # untyped: each setting read from it states its type, which `settings.X` then has

DEBUG: bool = env.bool("DEBUG", default=False)
SECRET_KEY: str = env.str("SECRET_KEY", default="")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured("SECRET_KEY must be set when DEBUG is off (or set DEBUG=true for development).")
    SECRET_KEY = "insecure-development-key"

# --- Secrets and operator-only doors ---------------------------------------------------
# With DEBUG off, a copied example never runs as a real server: SECRET_KEY needs 32 characters
# or more, and no secret may still hold a placeholder (deploy/'s examples say `change-me`), nor a
# URL a password equal to its user name (`graft:graft`). `make run` generates its key.
_PLACEHOLDERS = ("change-me", "changeme", "change_me", "secret", "password", "placeholder", "insecure")
_URLS_WITH_PASSWORDS = ("DATABASE_URL", "CELERY_BROKER_URL", "CACHE_URL")


def _placeholder_in(value: str) -> str | None:
    return next((word for word in _PLACEHOLDERS if word in value.lower()), None)


def _refuse_placeholder_secrets() -> None:
    """ImproperlyConfigured naming the variable (never its value) for each kind of placeholder."""
    how = "use a long random value, e.g. `openssl rand -hex 32`, or set DEBUG=true for development"
    if len(SECRET_KEY) < 32:
        raise ImproperlyConfigured(f"SECRET_KEY is shorter than 32 characters; {how}.")
    if word := _placeholder_in(SECRET_KEY):
        raise ImproperlyConfigured(f"SECRET_KEY holds the placeholder {word!r}; {how}.")
    for name in _URLS_WITH_PASSWORDS:
        url = urlsplit(env.str(name, default=""))
        password = url.password or ""
        if word := _placeholder_in(password):
            raise ImproperlyConfigured(f"The password in {name} holds the placeholder {word!r}; {how}.")
        if password and password == url.username:
            raise ImproperlyConfigured(f"The password in {name} is its user name; {how}.")
    for name in ("AWS_SECRET_ACCESS_KEY", "GRAFT_HEALTH_TOKEN"):
        if word := _placeholder_in(env.str(name, default="")):
            raise ImproperlyConfigured(f"{name} holds the placeholder {word!r}; {how}.")


if not DEBUG:
    _refuse_placeholder_secrets()
# Django's admin at /admin/: mounted only when this is on, by default with DEBUG and not otherwise.
GRAFT_ADMIN: bool = env.bool("GRAFT_ADMIN", default=DEBUG)
# /health/ready/ answers anyone with its status alone; the checks' names, timings and errors go
# to staff users and to requests that carry this token (header X-Health-Token). Empty: staff only.
GRAFT_HEALTH_TOKEN: str = env.str("GRAFT_HEALTH_TOKEN", default="")

ALLOWED_HOSTS: list[str] = env.list("ALLOWED_HOSTS", default=["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS: list[str] = env.list("CSRF_TRUSTED_ORIGINS", default=[])  # e.g. https://graft.example.org

# HTTPS, terminated by a proxy in front (nginx, an ingress, a load balancer) that sets
# X-Forwarded-Proto: GRAFT_HTTPS=true turns on what that needs; each can be overridden.
GRAFT_HTTPS: bool = env.bool("GRAFT_HTTPS", default=False)
if env.bool("GRAFT_BEHIND_TLS_PROXY", default=GRAFT_HTTPS):
    # request.is_secure() (and so tus Location headers and redirects) follows the proxy's scheme.
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
SECURE_SSL_REDIRECT: bool = env.bool("SECURE_SSL_REDIRECT", default=GRAFT_HTTPS)
SECURE_REDIRECT_EXEMPT = [r"^health/"]  # probes speak plain HTTP inside the cluster
SESSION_COOKIE_SECURE: bool = env.bool("SESSION_COOKIE_SECURE", default=GRAFT_HTTPS)
CSRF_COOKIE_SECURE: bool = env.bool("CSRF_COOKIE_SECURE", default=GRAFT_HTTPS)
SECURE_HSTS_SECONDS: int = env.int("SECURE_HSTS_SECONDS", default=365 * 24 * 3600 if GRAFT_HTTPS else 0)
SECURE_HSTS_INCLUDE_SUBDOMAINS: bool = env.bool("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=GRAFT_HTTPS)
SECURE_HSTS_PRELOAD: bool = env.bool("SECURE_HSTS_PRELOAD", default=GRAFT_HTTPS)

DATA_DIR = Path(env.str("GRAFT_DATA_DIR", default=str(BASE_DIR / "var")))
MEDIA_ROOT = Path(env.str("MEDIA_ROOT", default=str(DATA_DIR / "media")))
MEDIA_URL = "/media/"
# Host-local scratch space, never shared: unpacked bundles, job working folders, fetched archives.
# Everything that outlives a request or a job lives in storage (below) or in the database.
GRAFT_WORK_DIR = Path(env.str("GRAFT_WORK_DIR", default=str(DATA_DIR / "work")))
# Bytes of dataset archives a worker host keeps under GRAFT_WORK_DIR/archives for the next job on the
# same data (apps.common.archive_cache), least recently used evicted first; 0: none kept.
GRAFT_ARCHIVE_CACHE_BYTES: int = env.int("GRAFT_ARCHIVE_CACHE_BYTES", default=8 * 1024**3)
if GRAFT_ARCHIVE_CACHE_BYTES < 0:
    raise ImproperlyConfigured("GRAFT_ARCHIVE_CACHE_BYTES must be 0 (no cache) or a number of bytes.")
# Where training and ingestion run: auto (CUDA when visible), cpu, cuda, cuda:1, ...
# Ingestion's similarity measurement always runs on the CPU (it must not take a trainer's GPU).
GRAFT_DEVICE: str = env.str("GRAFT_DEVICE", default="auto")

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "drf_spectacular_sidecar",  # Swagger UI's assets, served by the app (no CDN)
    "axes",  # sign-in lockout after repeated failures (django-axes)
    "apps.accounts",
    "apps.datasets",
    "apps.training",
    "apps.serving",
    "apps.web",
    "apps.ops",  # operators' commands: backup, restore
]

MIDDLEWARE = [
    # First: a body over its path's limit is refused before anything reads it (apps.common.limits).
    "apps.common.limits.BodyLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "axes.middleware.AxesMiddleware",  # last: answers a locked-out sign-in (apps.accounts.lockout)
]

ROOT_URLCONF = "apps.urls"
WSGI_APPLICATION = "apps.wsgi.application"
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "frontend" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]


def _database() -> dict[str, Any]:
    default = f"sqlite:///{DATA_DIR / 'graft.sqlite3'}"
    db: dict[str, Any] = env.db_url("DATABASE_URL", default=default)
    if db["ENGINE"] == "django.db.backends.sqlite3":
        # Web and worker are separate processes: WAL + immediate transactions avoid lock errors.
        db.setdefault("OPTIONS", {}).update(
            {"timeout": 30, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}
        )
        db["TEST"] = {"NAME": str(DATA_DIR / "test-graft.sqlite3")}
    # Connections outlive a request (one per thread): opening one cost a prediction 1 ms on SQLite
    # (bench_serve), and a TCP connect and sign-in on PostgreSQL, where a reused one is checked first.
    db["CONN_MAX_AGE"] = env.int("CONN_MAX_AGE", default=60)
    db["CONN_HEALTH_CHECKS"] = True
    return db


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
]
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/"
LOGOUT_REDIRECT_URL = "/"

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_TZ = True
USE_I18N = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env.str("STATIC_ROOT", default=str(DATA_DIR / "static")))
STATICFILES_DIRS = [BASE_DIR / "frontend" / "static"]
# Datasets, thumbnails, upload parts, checkpoints and bundles: local files under MEDIA_ROOT by
# default; S3-compatible object storage (django-storages + boto3) when AWS_STORAGE_BUCKET_NAME is
# set, which is what lets web hosts and GPU workers share nothing but it, PostgreSQL and the broker.
AWS_STORAGE_BUCKET_NAME: str = env.str("AWS_STORAGE_BUCKET_NAME", default="")
if AWS_STORAGE_BUCKET_NAME:
    _default_storage = {
        "BACKEND": "storages.backends.s3.S3Storage",
        "OPTIONS": {
            "bucket_name": AWS_STORAGE_BUCKET_NAME,
            "endpoint_url": env.str("AWS_S3_ENDPOINT_URL", default=None),  # None: AWS itself
            "region_name": env.str("AWS_S3_REGION_NAME", default=None),
            "access_key": env.str("AWS_ACCESS_KEY_ID", default=None),  # None: boto3's own chain (roles)
            "secret_key": env.str("AWS_SECRET_ACCESS_KEY", default=None),
            "addressing_style": env.str("AWS_S3_ADDRESSING_STYLE", default="path"),
            "signature_version": "s3v4",
            "file_overwrite": True,  # names are unique by design; a retried write replaces its own
            "default_acl": None,
            "querystring_auth": True,
            # A file opened through the storage API (S3File) spills to disk past this size instead
            # of being held whole in memory (django-storages' default, 0, never spills).
            "max_memory_size": env.int("AWS_S3_MAX_MEMORY_SIZE", default=8 * 1024 * 1024),
        },
    }
else:
    _default_storage = {
        "BACKEND": "django.core.files.storage.FileSystemStorage",
        "OPTIONS": {"allow_overwrite": True},  # as on S3: a retried write replaces its own
    }
STORAGES = {
    "default": _default_storage,
    "staticfiles": {"BACKEND": "whitenoise.storage.CompressedStaticFilesStorage"},
}
WHITENOISE_USE_FINDERS = True  # static files work even before collectstatic

# Uploads stream to a temporary file past this size, never held whole in memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 2 * 1024**2
FILE_UPLOAD_TEMP_DIR: str | None = env.str("FILE_UPLOAD_TEMP_DIR", default=None)
DATA_UPLOAD_MAX_NUMBER_FILES = 64

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "apps.accounts.authentication.ApiTokenAuthentication",
        "rest_framework.authentication.SessionAuthentication",
    ],
    "DEFAULT_PERMISSION_CLASSES": ["rest_framework.permissions.IsAuthenticated"],
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "EXCEPTION_HANDLER": "apps.common.errors.exception_handler",
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_THROTTLE_CLASSES": ["apps.common.throttles.AnonThrottle", "apps.common.throttles.UserThrottle"],
    # A client's address: REMOTE_ADDR, or with N trusted proxies in front (nginx: 1), the address the
    # Nth from the end of X-Forwarded-For names; the rest of that header is the client's to forge.
    "NUM_PROXIES": env.int("GRAFT_TRUSTED_PROXIES", default=0),
}
# Per client address (anon, sign_in, sign_up) or per user; 429 with Retry-After past them.
# sign_in counts passwords tried on the login page and the token endpoint together; sign_up counts
# posts of the sign-up form. Counts live in CACHES["default"] (below), shared by every web process.
GRAFT_THROTTLE_RATES = {
    "anon": env.str("GRAFT_THROTTLE_ANON", default="60/min"),
    "user": env.str("GRAFT_THROTTLE_USER", default="1200/min"),
    "sign_in": env.str("GRAFT_THROTTLE_SIGN_IN", default="20/min"),
    "sign_up": env.str("GRAFT_THROTTLE_SIGN_UP", default="5/hour"),
}

# Sign-in lockout (django-axes), for the cool-off time, on both the login page and the token
# endpoint: GRAFT_LOGIN_FAILURE_LIMIT failures for one username from one address lock that
# username there; GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT failures from one address, whatever the
# usernames, lock the address (apps.accounts.lockout). Attempts are kept in the database, so
# every web host sees them.
AUTHENTICATION_BACKENDS = ["axes.backends.AxesStandaloneBackend", "django.contrib.auth.backends.ModelBackend"]
AXES_ENABLED: bool = env.bool("GRAFT_LOGIN_LOCKOUT", default=True)
AXES_FAILURE_LIMIT: int = env.int("GRAFT_LOGIN_FAILURE_LIMIT", default=10)
GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT: int = env.int("GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT", default=30)
AXES_COOLOFF_TIME: float = env.float("GRAFT_LOGIN_LOCKOUT_HOURS", default=0.25)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"], "ip_address"]
AXES_HANDLER = "apps.accounts.lockout.LockoutHandler"  # a limit for each of the two parameters
AXES_RESET_ON_SUCCESS = True  # forgets that username's failures from that address only
AXES_LOCKOUT_CALLABLE = "apps.accounts.lockout.locked_out"
AXES_CLIENT_IP_CALLABLE = "apps.accounts.lockout.client_ip"  # the same address the throttles use
AXES_VERBOSE = False

if not 0 < AXES_FAILURE_LIMIT <= GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT:
    raise ImproperlyConfigured(
        "GRAFT_LOGIN_FAILURE_LIMIT must be positive and GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT at least as large."
    )

# Who may create an account (apps.accounts.signup): `open` (anyone who reaches the sign-up
# page), `invite` (with a single-use link from `manage.py invite` or the admin, valid
# GRAFT_INVITATION_DAYS) or `closed` (administrators create accounts). Default: `open` with
# DEBUG, `invite` otherwise, so a server reachable by strangers never hands out accounts (each
# brings its own storage quota and job slots). Under `invite`, the first account of a database
# with no users needs no invitation: a fresh `make run` can be used at once.
GRAFT_SIGNUP: str = env.str("GRAFT_SIGNUP", default="open" if DEBUG else "invite")
if GRAFT_SIGNUP not in ("open", "invite", "closed"):
    raise ImproperlyConfigured(f"GRAFT_SIGNUP must be open, invite or closed, not {GRAFT_SIGNUP!r}.")
GRAFT_INVITATION_DAYS: float = env.float("GRAFT_INVITATION_DAYS", default=7)
# Where people reach Graft, for links made outside a request (`manage.py invite`).
GRAFT_PUBLIC_URL: str = env.str("GRAFT_PUBLIC_URL", default=(CSRF_TRUSTED_ORIGINS or ["http://127.0.0.1:8000"])[0])

# API tokens: each lives this many days, and a user holds at most this many (the least
# recently used go first when a new one would pass the cap).
GRAFT_TOKEN_DAYS: int = env.int("GRAFT_TOKEN_DAYS", default=90)
GRAFT_MAX_TOKENS_PER_USER: int = env.int("GRAFT_MAX_TOKENS_PER_USER", default=20)

# Throttle counts live here; with several web processes, point it at Redis (redis://host:6379/1).
CACHES = {"default": env.cache_url("CACHE_URL", default="locmemcache://")}
SPECTACULAR_SETTINGS = {
    "TITLE": "Graft API",
    "DESCRIPTION": "Upload labelled images, train a classifier, download and serve it.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # The schema maps every operation: for signed-in users and programs with a token, not anyone.
    "SERVE_PERMISSIONS": ["rest_framework.permissions.IsAuthenticated"],
    # The docs page (/api/v1/docs/) loads Swagger UI from the app's own static files.
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {
        "DatasetStatusEnum": "apps.datasets.models.Dataset.Status",
        "JobStatusEnum": "apps.training.models.Job.Status",
        "FindingsStatusEnum": "apps.datasets.models.DatasetVersion.FindingsStatus",
    },
    "POSTPROCESSING_HOOKS": [
        "drf_spectacular.hooks.postprocess_schema_enums",
        "apps.common.schema.add_error_responses",
    ],
}

# --- Celery ---------------------------------------------------------------------------
CELERY_BROKER_URL: str = env.str("CELERY_BROKER_URL", default="filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    _broker_dir = DATA_DIR / "broker"
    for _sub in ("queue", "processed", "control"):
        (_broker_dir / _sub).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_broker_dir / "queue"),
        "data_folder_out": str(_broker_dir / "queue"),
        "processed_folder": str(_broker_dir / "processed"),
        "control_folder": str(_broker_dir / "control"),
        "store_processed": False,
    }
else:
    # Long trainings must not be redelivered while still running (acks_late + Redis).
    CELERY_BROKER_TRANSPORT_OPTIONS = {"visibility_timeout": env.int("CELERY_VISIBILITY_TIMEOUT", default=12 * 3600)}
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = "celery"
CELERY_TASK_ROUTES = {
    "training.*": {"queue": "gpu"},
    "serving.predict_batch": {"queue": "gpu"},
    "serving.make_int8": {"queue": "gpu"},  # on the hosts that train: the dataset's archive is cached there
}
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# --- Graft ----------------------------------------------------------------------------
GRAFT_MAX_UPLOAD_BYTES: int = env.int("GRAFT_MAX_UPLOAD_BYTES", default=4 * 1024**3)
GRAFT_MAX_UNCOMPRESSED_BYTES: int = env.int("GRAFT_MAX_UNCOMPRESSED_BYTES", default=20 * 1024**3)
GRAFT_MAX_ARCHIVE_ENTRIES: int = env.int("GRAFT_MAX_ARCHIVE_ENTRIES", default=200_000)
GRAFT_MAX_IMAGE_PIXELS: int = env.int("GRAFT_MAX_IMAGE_PIXELS", default=64_000_000)
GRAFT_MIN_IMAGES_PER_CLASS: int = env.int("GRAFT_MIN_IMAGES_PER_CLASS", default=5)
GRAFT_MAX_PREDICT_IMAGES: int = env.int("GRAFT_MAX_PREDICT_IMAGES", default=32)
GRAFT_MAX_PREDICT_BYTES: int = env.int("GRAFT_MAX_PREDICT_BYTES", default=32 * 1024**2)
# Megapixels one prediction request may decode in all (a cap on its CPU time and memory).
GRAFT_MAX_PREDICT_PIXELS: int = env.int("GRAFT_MAX_PREDICT_PIXELS", default=256_000_000)
# Pixels a web process decodes at once, over all its requests (about 4 bytes of memory each).
GRAFT_DECODE_PIXELS: int = env.int("GRAFT_DECODE_PIXELS", default=64_000_000)
# Serving: the runtime, and the memory a web process may spend on loaded models (least recently
# used ones are dropped past it). ONNX Runtime alone keeps torch out of the web tier (README,
# "Serving"); `auto` loads TorchScript too, to serve with the faster of the two as measured at load.
GRAFT_SERVE_RUNTIME: str = env.str("GRAFT_SERVE_RUNTIME", default="onnxruntime")
# The model's precision: auto serves its int8 model where the int8 step kept one (ml.quantize) and
# this CPU multiplies int8 as the one that tested it did (ml.predict.int8_served); fp32 never does.
# GRAFT_INT8 makes that int8 model after each job succeeds, on a worker.
GRAFT_SERVE_PRECISION: str = env.str("GRAFT_SERVE_PRECISION", default="auto")
GRAFT_INT8: bool = env.bool("GRAFT_INT8", default=True)
GRAFT_SERVE_MODEL_MEMORY: int = env.int("GRAFT_SERVE_MODEL_MEMORY", default=1024**3)
# Micro-batching (ml.predict.Batcher): images per shared forward pass, and how long a pass waits
# for more requests once one is waiting. Defaults measured with bench_serve (README, "Serving").
GRAFT_SERVE_MAX_BATCH: int = env.int("GRAFT_SERVE_MAX_BATCH", default=8)
GRAFT_SERVE_BATCH_WAIT_MS: float = env.float("GRAFT_SERVE_BATCH_WAIT_MS", default=0.0)
# ONNX Runtime's threads spin through a pass instead of sleeping between its operators: 2 ms off a
# lone request, but where several web processes serve on the same cores (deploy/ runs three) their
# passes overlap and spinning threads starve each other (README, "Serving"). On for one process.
GRAFT_SERVE_SPIN: bool = env.bool("GRAFT_SERVE_SPIN", default=False)
if GRAFT_SERVE_RUNTIME not in ("auto", "onnxruntime", "torchscript") or GRAFT_SERVE_PRECISION not in ("auto", "fp32"):
    raise ImproperlyConfigured(
        "GRAFT_SERVE_RUNTIME must be auto, onnxruntime or torchscript; GRAFT_SERVE_PRECISION auto or fp32."
    )
if GRAFT_SERVE_MAX_BATCH < 1 or not 0 <= GRAFT_SERVE_BATCH_WAIT_MS <= 1000:
    raise ImproperlyConfigured("GRAFT_SERVE_MAX_BATCH must be at least 1, GRAFT_SERVE_BATCH_WAIT_MS 0-1000.")
# The per-model prediction log (opt-in on the model page): the most recent records kept per model.
GRAFT_PREDICTION_LOG_KEEP: int = env.int("GRAFT_PREDICTION_LOG_KEEP", default=1000)
# Any other request body (forms, JSON, sign-in); uploads and predictions have the limits above.
GRAFT_MAX_REQUEST_BYTES: int = env.int("GRAFT_MAX_REQUEST_BYTES", default=1024**2)
# Per-user quotas (apps.accounts.quotas): bytes stored (datasets, models, uploads in progress),
# datasets, resumable uploads in progress, training jobs and batch predictions waiting or running.
GRAFT_QUOTA_BYTES: int = env.int("GRAFT_QUOTA_BYTES", default=50 * 1024**3)
GRAFT_QUOTA_DATASETS: int = env.int("GRAFT_QUOTA_DATASETS", default=200)
GRAFT_QUOTA_OPEN_UPLOADS: int = env.int("GRAFT_QUOTA_OPEN_UPLOADS", default=5)
GRAFT_QUOTA_ACTIVE_JOBS: int = env.int("GRAFT_QUOTA_ACTIVE_JOBS", default=4)
# A resumable upload untouched this long is deleted (beat checks hourly).
GRAFT_UPLOAD_EXPIRY_HOURS: int = env.int("GRAFT_UPLOAD_EXPIRY_HOURS", default=6)
# Background work of every kind (ingestion, training, batch prediction, apps.common.work): a running
# item whose worker has not written a heartbeat for this long is stale, and re-queued by beat.
GRAFT_JOB_STALE_SECONDS: int = env.int("GRAFT_JOB_STALE_SECONDS", default=120)
GRAFT_HEARTBEAT_SECONDS: int = env.int("GRAFT_HEARTBEAT_SECONDS", default=10)
# An item whose worker died this many times (killed, out of memory, lost) fails with a sentence
# instead of being handed to yet another worker.
GRAFT_JOB_MAX_ATTEMPTS: int = env.int("GRAFT_JOB_MAX_ATTEMPTS", default=3)
# An item (or a finders run) waiting for a worker this long has its message sent again by beat: it
# may have been lost (the broker unreachable when it was sent, or restarted without it).
GRAFT_RESEND_SECONDS: int = env.int("GRAFT_RESEND_SECONDS", default=600)
# Stored objects no row owns (a crash between storing a file and creating its row) are removed by
# the sweeper (`manage.py sweep`, beat hourly) once they are this old: younger ones may belong to a
# request or a task still on its way to its row.
GRAFT_SWEEP_GRACE_HOURS: float = env.float("GRAFT_SWEEP_GRACE_HOURS", default=24.0)

for _name in (
    "GRAFT_MAX_UPLOAD_BYTES",
    "GRAFT_MIN_IMAGES_PER_CLASS",
    "GRAFT_JOB_STALE_SECONDS",
    "GRAFT_JOB_MAX_ATTEMPTS",
    "GRAFT_RESEND_SECONDS",
):
    if globals()[_name] <= 0:
        raise ImproperlyConfigured(f"{_name} must be a positive integer.")
if GRAFT_HEARTBEAT_SECONDS * 3 > GRAFT_JOB_STALE_SECONDS:
    raise ImproperlyConfigured("GRAFT_JOB_STALE_SECONDS must be at least 3x GRAFT_HEARTBEAT_SECONDS.")

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": env.str("LOG_LEVEL", default="INFO")},
}

# Re-queue background work (ingestion, training, batches) whose worker died, and sweep storage
# (run beat: `celery -A apps beat`, or the worker's `-B`).
CELERY_BEAT_SCHEDULE = {
    "recover-stale-jobs": {"task": "jobs.recover_stale", "schedule": float(GRAFT_JOB_STALE_SECONDS) / 2},
    "expire-uploads": {"task": "datasets.expire_uploads", "schedule": 3600.0},
    "sweep-storage": {"task": "ops.sweep", "schedule": 3600.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(DATA_DIR / "celerybeat-schedule")
