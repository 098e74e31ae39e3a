"""Health endpoints for load balancers and orchestrators (Kubernetes probes, compose healthchecks).

- `/health/live/`: the process answers (liveness: restart it when it does not);
- `/health/ready/`: it can do its work: the database, the broker and storage all answer
  (readiness: send it no traffic until they do). 200 or 503, with `{"status": "ok"|"unavailable"}`.
  Each check's name, time and error class go only to staff users and to requests carrying
  GRAFT_HEALTH_TOKEN (header `X-Health-Token`): they tell a stranger what runs behind the site.
  Failures are logged either way.
"""

from __future__ import annotations

import hmac
import logging
import time

from django.conf import settings
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
    body: dict[str, object] = {"status": "ok" if ok else "unavailable"}
    if may_see_details(request):
        body["checks"] = results
    return JsonResponse(body, status=200 if ok else 503)


def may_see_details(request: HttpRequest) -> bool:
    """A caller with the operators' health token, or a staff user (a session)."""
    token = settings.GRAFT_HEALTH_TOKEN
    given = request.headers.get("X-Health-Token", "")
    if token and hmac.compare_digest(given.encode(), token.encode()):
        return True
    try:  # the session's user is read from the database, which may be the check that failed
        user = getattr(request, "user", None)
        return bool(user is not None and user.is_active and user.is_staff)
    except Exception:  # noqa: BLE001 - no details, never a 500 from the probe
        return False
