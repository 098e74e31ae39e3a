from __future__ import annotations

import os

import pytest
import requests
from django.core.management import call_command

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def test_token_for_username_and_password(live_server, make_user):
    make_user("alice", "correct horse battery")
    r = requests.post(
        f"{live_server.url}/api/v1/auth/token/", json={"username": "alice", "password": "correct horse battery"}
    )
    assert r.status_code == 200
    token = r.json()["token"]
    listed = requests.get(f"{live_server.url}/api/v1/datasets/", headers={"Authorization": f"Token {token}"})
    assert listed.status_code == 200 and listed.json()["results"] == []


def test_wrong_password_and_missing_or_bad_token_are_json_401(live_server, make_user):
    make_user("alice", "correct horse battery")
    r = requests.post(f"{live_server.url}/api/v1/auth/token/", json={"username": "alice", "password": "nope"})
    assert r.status_code == 401 and r.json()["error"] == "Invalid username or password."
    r = requests.get(f"{live_server.url}/api/v1/datasets/")
    assert r.status_code in (401, 403) and "credentials" in r.json()["error"]
    r = requests.get(f"{live_server.url}/api/v1/datasets/", headers={"Authorization": "Token deadbeef"})
    assert r.status_code == 401 and "Invalid or revoked" in r.json()["error"]


def test_malformed_requests_get_readable_4xx(live_server, make_user):
    r = requests.post(
        f"{live_server.url}/api/v1/auth/token/", data="{not json", headers={"Content-Type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]
    r = requests.post(f"{live_server.url}/api/v1/auth/token/", json={"username": "x"})
    assert r.status_code == 400 and "password" in r.json()["error"]
    r = requests.get(f"{live_server.url}/api/v1/nowhere/")
    assert r.status_code == 404 and r.json()["error"].startswith("Not found")


def test_createsuperuser_noinput_from_environment(live_server, monkeypatch):
    monkeypatch.setitem(os.environ, "DJANGO_SUPERUSER_PASSWORD", "an0ther-secret")
    call_command("createsuperuser", "--noinput", "--username", "ops", "--email", "ops@example.com")
    r = requests.post(f"{live_server.url}/api/v1/auth/token/", json={"username": "ops", "password": "an0ther-secret"})
    assert r.status_code == 200 and r.json()["token"]


def test_openapi_schema_is_served(live_server):
    r = requests.get(f"{live_server.url}/api/v1/schema/?format=json")
    assert r.status_code == 200 and "/api/v1/models/{model_id}/predict/" in r.json()["paths"]
