"""Brute force and floods: sign-in lockout (django-axes), API throttles, tokens that expire and are capped."""

from __future__ import annotations

from datetime import timedelta

import pytest
import requests
from django.test import Client
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


def _sign_in_page(client, username: str, password: str):
    return client.post("/accounts/login/", {"username": username, "password": password})


def test_wrong_passwords_for_many_usernames_from_one_address_lock_the_address(client, settings, make_user):
    """40 usernames tried from one address: the per-address lockout stops it before the 40th, for
    every account from that address; other addresses are not affected."""
    import apps.settings as production

    settings.AXES_ENABLED = True
    settings.AXES_FAILURE_LIMIT = production.AXES_FAILURE_LIMIT
    settings.GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT = production.GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT
    make_user("bob", PASSWORD)
    responses = [_sign_in_page(client, f"user{i}", "guess") for i in range(40)]
    codes = [r.status_code for r in responses]
    assert 429 in codes[:39], codes
    first = codes.index(429)
    assert first == settings.GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT - 1 and set(codes[first:]) == {429}, codes
    text = responses[first].content.decode()
    assert "Too many failed sign-ins from your address, for any account; try again in 15 minutes" in text
    r = _sign_in_page(client, "bob", PASSWORD)  # a real account, the right password: the address waits
    assert r.status_code == 429 and "for any account" in r.content.decode()
    assert _sign_in_page(Client(REMOTE_ADDR="198.51.100.9"), "bob", PASSWORD).status_code == 302


def test_an_account_lockout_still_comes_first_and_says_it_is_for_this_account(client, settings, make_user, lockout):
    settings.GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT = 50
    make_user("alice", PASSWORD)
    codes = [_sign_in_page(client, "alice", "wrong").status_code for _ in range(5)]
    assert codes == [200] * 4 + [429], codes
    r = _sign_in_page(client, "alice", PASSWORD)
    assert r.status_code == 429 and "Too many failed sign-ins for this account from your address" in r.content.decode()
    assert "for any account" not in r.content.decode()


def test_signing_in_to_ones_own_account_does_not_reset_the_address_count(client, settings, make_user, lockout):
    settings.GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT = 8
    make_user("mallory", PASSWORD)
    make_user("victim", PASSWORD)
    for i in range(7):
        assert _sign_in_page(client, f"user{i}", "guess").status_code == 200
    assert _sign_in_page(client, "mallory", PASSWORD).status_code == 302  # between guesses
    client.post("/accounts/logout/")
    r = _sign_in_page(client, "victim", "guess")
    assert r.status_code == 429 and "for any account" in r.content.decode()


def test_the_sign_in_page_and_the_token_endpoint_share_a_throttle_per_address(live_server, settings, make_user):
    from django.core.cache import cache

    import apps.settings as production

    cache.clear()
    settings.GRAFT_THROTTLE_RATES = {
        **settings.GRAFT_THROTTLE_RATES,
        "sign_in": production.GRAFT_THROTTLE_RATES["sign_in"],
    }
    assert settings.GRAFT_THROTTLE_RATES["sign_in"] == "20/min"
    make_user("alice", PASSWORD)
    page = requests.Session()
    page.get(f"{live_server.url}/accounts/login/", timeout=30)

    def sign_in_page(password: str) -> requests.Response:
        return page.post(
            f"{live_server.url}/accounts/login/",
            data={"username": "alice", "password": password, "csrfmiddlewaretoken": page.cookies["csrftoken"]},
            headers={"Referer": f"{live_server.url}/accounts/login/"},
            allow_redirects=False,
            timeout=30,
        )

    codes = [sign_in_page(f"wrong-{i}").status_code for i in range(12)]
    codes += [_token(live_server.url, f"wrong-{i}").status_code for i in range(8)]
    assert codes == [200] * 12 + [401] * 8, codes  # 20 passwords a minute from one address, in all
    r = sign_in_page(PASSWORD)
    assert r.status_code == 429 and int(r.headers["Retry-After"]) > 0
    assert "Too many sign-in attempts from your address; try again in" in r.text
    assert _token(live_server.url, PASSWORD).status_code == 429
    cache.clear()
