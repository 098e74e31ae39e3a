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


def test_openapi_schema_is_served_to_those_who_sign_in(live_server, api_for):
    """The issue: the schema, a map of every operation, was served to anyone."""
    r = requests.get(f"{live_server.url}/api/v1/schema/?format=json")
    assert r.status_code == 401 and "error" in r.json()
    api = api_for("alice")
    r = api.session.get(f"{live_server.url}/api/v1/schema/?format=json")
    assert r.status_code == 200 and "/api/v1/models/{model_id}/predict/" in r.json()["paths"]


def test_tokens_made_before_expiry_existed_expire_a_token_lifetime_after_the_upgrade(make_user, settings):
    """A token from a release before 0002 had no expiry; migrating gives it GRAFT_TOKEN_DAYS from then."""
    from datetime import timedelta

    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor
    from django.utils import timezone

    from apps.accounts.models import ApiToken

    user = make_user()
    before, after = [("accounts", "0001_initial")], [("accounts", "0002_token_expiry")]
    executor = MigrationExecutor(connection)
    executor.migrate(before)
    try:
        OldApiToken = executor.loader.project_state(before).apps.get_model("accounts", "ApiToken")  # noqa: N806
        OldApiToken.objects.create(user_id=user.pk, key_hash=ApiToken.hash_key("an old key"), prefix="an old k")
        upgraded_at = timezone.now()
        MigrationExecutor(connection).migrate(after)
    finally:  # the rest of the suite runs on the latest schema
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
    token = ApiToken.objects.get(key_hash=ApiToken.hash_key("an old key"))
    lifetime = timedelta(days=settings.GRAFT_TOKEN_DAYS)
    assert token.expires_at is not None, "an old token would never expire"
    assert upgraded_at + lifetime <= token.expires_at <= timezone.now() + lifetime


def test_a_bearer_token_is_told_the_header_graft_expects(client):
    r = client.get("/api/v1/datasets/", HTTP_AUTHORIZATION="Bearer 0123456789abcdef")
    assert r.status_code == 401
    assert r.json()["error"] == "Graft API tokens are sent as `Authorization: Token <key>`, not `Bearer <key>`."
    assert r["WWW-Authenticate"] == "Token"


def test_a_token_name_with_a_nul_is_kept_without_it(client, make_user):
    """The Tokens page passes its form on as posted; a NUL is no text PostgreSQL stores (a 500 before)."""
    from apps.accounts.models import ApiToken

    make_user("alice")
    client.login(username="alice", password="correct horse battery")
    r = client.post("/tokens/", {"name": "laptop\x00 script"})
    assert r.status_code == 200
    assert ApiToken.objects.get(user__username="alice").name == "laptop script"
