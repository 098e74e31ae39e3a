"""Brute force and floods: sign-in lockout (django-axes), API throttles, tokens that expire and are capped."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from django.utils import timezone

from apps.accounts.models import ApiToken
from apps.accounts.services import token_create

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery"


@pytest.fixture
def lockout(settings):
    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = 5


def _token(url: str, password: str) -> requests.Response:
    return requests.post(f"{url}/api/v1/auth/token/", json={"username": "alice", "password": password}, timeout=30)


def test_repeated_wrong_passwords_lock_the_token_endpoint_and_the_login_page(live_server, make_user, lockout):
    make_user("alice", PASSWORD)
    codes = [_token(live_server.url, f"wrong-{i}").status_code for i in range(8)]
    assert codes[:4] == [401] * 4 and codes[-1] == 429, codes
    r = _token(live_server.url, PASSWORD)  # even the right password, while locked
    assert r.status_code == 429 and "try again in 15 minutes" in r.json()["error"]
    page = requests.Session()
    page.get(f"{live_server.url}/accounts/login/", timeout=30)
    r = page.post(
        f"{live_server.url}/accounts/login/",
        data={"username": "alice", "password": PASSWORD, "csrfmiddlewaretoken": page.cookies["csrftoken"]},
        headers={"Referer": f"{live_server.url}/accounts/login/"},
        timeout=30,
    )
    assert r.status_code == 429 and "Too many failed sign-ins" in r.text


def test_another_account_from_the_same_address_is_not_locked(live_server, make_user, lockout):
    make_user("alice", PASSWORD)
    make_user("bob", PASSWORD)
    for i in range(6):
        _token(live_server.url, f"wrong-{i}")
    r = requests.post(
        f"{live_server.url}/api/v1/auth/token/", json={"username": "bob", "password": PASSWORD}, timeout=30
    )
    assert r.status_code == 200


def test_api_requests_past_the_rate_get_429_with_retry_after(api_for, settings):
    api = api_for("alice")
    settings.GRAFT_THROTTLE_RATES = {**settings.GRAFT_THROTTLE_RATES, "user": "5/min"}
    codes = [api.call("GET", "/datasets/").status_code for _ in range(7)]
    assert codes[:5] == [200] * 5 and codes[-1] == 429, codes
    r = api.call("GET", "/datasets/")
    assert "Request was throttled" in r.json()["error"] and int(r.headers["Retry-After"]) > 0


def test_expired_tokens_are_refused_with_a_sentence(api_for):
    api = api_for("alice")
    ApiToken.objects.update(expires_at=timezone.now() - timedelta(seconds=1))
    r = api.call("GET", "/datasets/")
    assert r.status_code == 401 and "expired on" in r.json()["error"]


def test_a_user_holds_at_most_the_cap_and_the_least_recently_used_go(make_user, settings):
    user = make_user("alice", PASSWORD)
    for i in range(5):
        token_create(user=user, name=f"t{i}")
    settings.GRAFT_MAX_TOKENS_PER_USER = 3
    ApiToken.objects.filter(name="t0").update(last_used_at=timezone.now())  # the oldest, but in use
    ApiToken.objects.filter(name="t1").update(expires_at=timezone.now() - timedelta(seconds=1))
    token_create(user=user, name="new")
    names = set(ApiToken.objects.filter(user=user).values_list("name", flat=True))
    assert names == {"new", "t0", "t4"}  # the new one, the one used last, the one made last
    assert ApiToken.objects.get(name="new").expires_at > timezone.now() + timedelta(days=89)


def test_the_client_address_is_the_one_the_trusted_proxy_saw_not_what_the_client_wrote(settings, rf):
    from apps.accounts.lockout import client_ip

    request = rf.get("/", HTTP_X_FORWARDED_FOR="6.6.6.6, 10.0.0.7", REMOTE_ADDR="10.0.0.1")
    assert client_ip(request) == "10.0.0.1"  # no trusted proxy: the header is the client's to forge
    settings.REST_FRAMEWORK = {**settings.REST_FRAMEWORK, "NUM_PROXIES": 1}
    assert client_ip(request) == "10.0.0.7"  # the address nginx appended, not the forged first hop
    assert settings.AXES_CLIENT_IP_CALLABLE == "apps.accounts.lockout.client_ip"
