"""/health/ready/: the status for anyone (probes), the checks' details for staff and the operators' token."""

from __future__ import annotations

import pytest

from apps.common import health

pytestmark = pytest.mark.django_db

TOKEN = "f3a1c9e07b5d4e2a8c6b1d0e9f7a5c3b"


def _refused() -> None:
    raise ConnectionRefusedError("redis://:hunter2@10.0.0.7:6379 refused")


def _ready(client, **headers):
    response = client.get("/health/ready/", headers=headers)
    return response.status_code, response.json()


def test_anonymous_callers_get_the_status_alone(client):
    assert _ready(client) == (200, {"status": "ok"})


def test_a_failing_check_gives_anonymous_callers_a_503_without_naming_it(client, monkeypatch):
    monkeypatch.setitem(health.CHECKS, "broker", _refused)
    assert _ready(client) == (503, {"status": "unavailable"})


def test_staff_see_each_check_with_its_time_and_error_class(client, django_user_model, monkeypatch):
    monkeypatch.setitem(health.CHECKS, "broker", _refused)
    client.force_login(django_user_model.objects.create_user("ops", password="x", is_staff=True))
    status, body = _ready(client)
    assert status == 503 and body["status"] == "unavailable"
    assert body["checks"]["broker"] == {"ok": False, "error": "ConnectionRefusedError"}
    assert body["checks"]["database"]["ok"] is True and "ms" in body["checks"]["database"]


def test_other_users_do_not(client, django_user_model):
    client.force_login(django_user_model.objects.create_user("alice", password="x"))
    assert _ready(client) == (200, {"status": "ok"})


def test_the_operators_token_shows_the_checks_and_a_wrong_or_empty_one_does_not(client, settings):
    settings.GRAFT_HEALTH_TOKEN = TOKEN
    status, body = _ready(client, x_health_token=TOKEN)
    assert status == 200 and set(body["checks"]) == {"database", "broker", "storage"}
    assert _ready(client, x_health_token=TOKEN[:-1] + "0") == (200, {"status": "ok"})
    assert _ready(client, x_health_token="") == (200, {"status": "ok"})
    settings.GRAFT_HEALTH_TOKEN = ""  # unset: an empty header is no token
    assert _ready(client, x_health_token="") == (200, {"status": "ok"})
