"""Health endpoints for load balancers and orchestrators (Kubernetes probes, compose healthchecks).

- `/health/live/`: the process answers (liveness: restart it when it does not);
- `/health/ready/`: it can do its work: the database, the broker and storage all answer
  (readiness: send it no traffic until they do). 200 with each check's result, or 503.
"""

from __future__ import annotations

import logging
import time

from django.core.files.storage import default_storage
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache

log = logging.getLogger(__name__)


def _database() -> None:
    with connection.cursor() as cur:
        cur.execute("SELECT 1")


def _broker() -> None:
    from apps.celery import app

    with app.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def _storage() -> None:
    default_storage.exists("health-probe")  # a HEAD on S3, a stat on local disk


CHECKS = {"database": _database, "broker": _broker, "storage": _storage}


@never_cache
def live(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


@never_cache
def ready(request: HttpRequest) -> JsonResponse:
    results: dict[str, dict[str, object]] = {}
    ok = True
    for name, check in CHECKS.items():
        t = time.perf_counter()
        try:
            check()
            results[name] = {"ok": True, "ms": round(1000 * (time.perf_counter() - t), 1)}
        except Exception as exc:  # noqa: BLE001 - every failure is a "not ready", named
            log.warning("health: %s failed: %s", name, exc)
            results[name] = {"ok": False, "error": exc.__class__.__name__}
            ok = False
    return JsonResponse({"status": "ok" if ok else "unavailable", "checks": results}, status=200 if ok else 503)
