"""Who may create an account: GRAFT_SIGNUP open, invite (single-use, expiring links) or closed;
the first account of an empty server; sign-ups throttled per address."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import timedelta
from urllib.parse import urlsplit

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.core.management import call_command
from django.test import Client
from django.utils import timezone

import apps.settings as production
from apps.accounts.models import Invitation

pytestmark = [pytest.mark.integration, pytest.mark.django_db]

PASSWORD = "correct horse battery"
SIGNUP = "/accounts/signup/"


@pytest.fixture(autouse=True)
def _fresh_throttle_counts():
    cache.clear()  # the throttles' counts: one test's sign-ups must not count against the next's
    yield
    cache.clear()


def _form(username: str, **extra: str) -> dict[str, str]:
    return {"username": username, "password1": PASSWORD, "password2": PASSWORD, **extra}


def _links_to_sign_up(path: str) -> bool:
    """Whether the page's own content (below the site's header) links to the sign-up page."""
    body = Client().get(path).content.decode().split("</header>", 1)[1]
    return f'href="{SIGNUP}"' in body


def _invite(**options: object) -> str:
    """`manage.py invite` as an administrator runs it; the path and query of the link it prints."""
    out = io.StringIO()
    call_command("invite", *[f"--{k}={v}" for k, v in options.items()], stdout=out, stderr=io.StringIO())
    link = urlsplit(out.getvalue().strip().splitlines()[-1])
    assert link.path == SIGNUP and link.query.startswith("invite="), out.getvalue()
    return f"{link.path}?{link.query}"


def test_eight_sign_ups_from_one_address_the_later_ones_get_429(settings):
    settings.GRAFT_SIGNUP = "open"
    settings.GRAFT_THROTTLE_RATES = {
        **settings.GRAFT_THROTTLE_RATES,
        "sign_up": production.GRAFT_THROTTLE_RATES["sign_up"],
    }
    assert settings.GRAFT_THROTTLE_RATES["sign_up"] == "5/hour"
    one_address = Client(REMOTE_ADDR="203.0.113.7")
    responses = [one_address.post(SIGNUP, _form(f"user{i}")) for i in range(8)]
    codes = [r.status_code for r in responses]
    assert codes == [302] * 5 + [429] * 3, codes
    refused = responses[-1]
    assert "Too many sign-up attempts from your address; try again in" in refused.content.decode()
    assert 0 < int(refused["Retry-After"]) <= 3600
    assert User.objects.count() == 5
    assert one_address.get(SIGNUP).status_code in (200, 302)  # reading the page is not an attempt
    other = Client(REMOTE_ADDR="198.51.100.9")
    assert other.post(SIGNUP, _form("elsewhere")).status_code == 302


def test_invite_only_without_a_code_is_a_readable_403_and_makes_no_account(settings, make_user):
    settings.GRAFT_SIGNUP = "invite"
    make_user("admin", PASSWORD)
    page = Client().get(SIGNUP)
    assert page.status_code == 403
    assert "Sign-up on this server is by invitation" in page.content.decode()
    r = Client().post(SIGNUP, _form("mallory"))
    assert r.status_code == 403 and not User.objects.filter(username="mallory").exists()
    r = Client().post(SIGNUP + "?invite=made-up", _form("mallory"))
    assert r.status_code == 403 and "not one of them" in r.content.decode()
    assert not User.objects.filter(username="mallory").exists()


def test_an_invitation_link_signs_up_once(settings, make_user):
    settings.GRAFT_SIGNUP = "invite"
    make_user("admin", PASSWORD)
    link = _invite(note="for Ada")
    page = Client().get(link)
    assert page.status_code == 200 and "Your invitation is valid" in page.content.decode()
    code = link.split("invite=", 1)[1]
    assert f'name="invite" value="{code}"' in page.content.decode()  # the form carries the code on
    ada = Client()
    r = ada.post(SIGNUP, _form("ada", invite=code))
    assert r.status_code == 302 and r["Location"] == "/"
    assert ada.get("/").context["user"].username == "ada"  # signed in
    invitation = Invitation.objects.get()
    assert invitation.used_by == User.objects.get(username="ada") and invitation.note == "for Ada"
    assert invitation.code_hash != code and code not in invitation.code_hash  # only its hash is kept

    again = Client().get(link)
    assert again.status_code == 403 and "already been used" in again.content.decode()
    r = Client().post(SIGNUP, _form("eve", invite=code))
    assert r.status_code == 403 and not User.objects.filter(username="eve").exists()


def test_an_expired_invitation_says_so(settings, make_user):
    settings.GRAFT_SIGNUP = "invite"
    make_user("admin", PASSWORD)
    link = _invite(days=1)
    Invitation.objects.update(expires_at=timezone.now() - timedelta(minutes=1))
    page = Client().get(link)
    assert page.status_code == 403 and "This invitation expired on" in page.content.decode()
    r = Client().post(SIGNUP, _form("late", invite=link.split("invite=", 1)[1]))
    assert r.status_code == 403 and not User.objects.filter(username="late").exists()


def test_a_wrong_form_keeps_the_invitation_unspent(settings, make_user):
    settings.GRAFT_SIGNUP = "invite"
    make_user("admin", PASSWORD)
    code = _invite().split("invite=", 1)[1]
    r = Client().post(SIGNUP, {**_form("ada", invite=code), "password2": "something else"})
    assert r.status_code == 200 and "didn’t match" in r.content.decode()
    assert Invitation.objects.get().used_at is None
    assert Client().post(SIGNUP, _form("ada", invite=code)).status_code == 302


def test_the_first_account_of_an_empty_server_needs_no_invitation(settings):
    """A fresh `make run` (DEBUG off: sign-up by invitation) can still be used at once."""
    settings.GRAFT_SIGNUP = "invite"
    assert _links_to_sign_up("/")  # offered while there is nobody
    page = Client().get(SIGNUP)
    assert page.status_code == 200 and "This is the first account on this server" in page.content.decode()
    assert Client().post(SIGNUP, _form("ada")).status_code == 302
    r = Client().post(SIGNUP, _form("bob"))
    assert r.status_code == 403 and "by invitation" in r.content.decode()
    assert list(User.objects.values_list("username", flat=True)) == ["ada"]
    assert not _links_to_sign_up("/")


def test_closed_sign_up_says_so_and_no_page_links_to_it(settings, make_user):
    settings.GRAFT_SIGNUP = "closed"
    page = Client().get(SIGNUP)
    assert page.status_code == 403
    assert "Sign-up is closed on this server. An administrator creates accounts" in page.content.decode()
    r = Client().post(SIGNUP, _form("mallory"))
    assert r.status_code == 403 and not User.objects.exists()  # not even a first account
    assert not _links_to_sign_up("/") and not _links_to_sign_up("/accounts/login/")


def test_open_sign_up_is_linked_from_the_landing_and_login_pages(settings, make_user):
    settings.GRAFT_SIGNUP = "open"
    make_user("admin", PASSWORD)
    assert _links_to_sign_up("/") and _links_to_sign_up("/accounts/login/")
    assert Client().post(SIGNUP, _form("anyone")).status_code == 302


def test_the_invite_command_refuses_a_nonsense_lifetime_or_creator(make_user):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="positive number of days"):
        _invite(days=0)
    make_user("plain", PASSWORD)
    with pytest.raises(CommandError, match="not a staff user"):
        _invite(by="plain")
    assert not Invitation.objects.exists()


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, "invite"),
        ({"DEBUG": "true"}, "open"),
        ({"GRAFT_SIGNUP": "closed"}, "closed"),
        ({"GRAFT_SIGNUP": "shut"}, "must be open, invite or closed"),
    ],
)
def test_the_default_mode_is_invite_without_debug_and_a_typo_is_refused(env, expected, tmp_path):
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME")}
    run = subprocess.run(
        [sys.executable, "-c", "import apps.settings as s; print(s.GRAFT_SIGNUP)"],
        env={**keep, "SECRET_KEY": "k" * 50, "GRAFT_DATA_DIR": str(tmp_path), **env},
        capture_output=True,
        text=True,
        cwd=production.BASE_DIR,
    )
    assert expected in (run.stdout + run.stderr), run.stderr


# A real password hash (tests/settings.py uses MD5) keeps each sign-up's transaction open long
# enough for the others to run into it: without the first-account lock, all eight get accounts.
REAL_HASH = ["django.contrib.auth.hashers.PBKDF2PasswordHasher"]


def _parallel_sign_ups(url: str, n: int, code: str = "") -> list[int]:
    """n people post the sign-up form at the same moment (each with its own session and CSRF)."""
    import threading

    import requests

    query = f"?invite={code}" if code else ""
    sessions = [requests.Session() for _ in range(n)]
    for s in sessions:
        assert s.get(f"{url}{SIGNUP}{query}", timeout=30).status_code == 200
    start = threading.Barrier(n)
    codes: list[int] = [0] * n

    def post(i: int) -> None:
        data = {**_form(f"racer{i}", invite=code), "csrfmiddlewaretoken": sessions[i].cookies["csrftoken"]}
        start.wait()
        r = sessions[i].post(
            f"{url}{SIGNUP}", data=data, headers={"Referer": f"{url}{SIGNUP}"}, allow_redirects=False, timeout=60
        )
        codes[i] = r.status_code

    threads = [threading.Thread(target=post, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return codes


@pytest.mark.django_db(transaction=True)
def test_one_invitation_used_by_eight_at_once_makes_one_account(live_server, settings, make_user):
    settings.GRAFT_SIGNUP = "invite"
    settings.PASSWORD_HASHERS = REAL_HASH
    make_user("admin", PASSWORD)
    code = _invite().split("invite=", 1)[1]
    codes = _parallel_sign_ups(live_server.url, 8, code)
    assert sorted(codes) == [302] + [403] * 7, codes
    assert User.objects.filter(username__startswith="racer").count() == 1


@pytest.mark.django_db(transaction=True)
def test_eight_first_accounts_at_once_make_one(live_server, settings):
    settings.GRAFT_SIGNUP = "invite"
    settings.PASSWORD_HASHERS = REAL_HASH
    codes = _parallel_sign_ups(live_server.url, 8)
    assert sorted(codes) == [302] + [403] * 7, codes
    assert User.objects.count() == 1


def test_staff_make_an_invitation_in_the_admin_and_see_its_link_once(rf, settings, make_user):
    from django.contrib import admin
    from django.contrib.messages import get_messages
    from django.contrib.messages.storage.fallback import FallbackStorage

    settings.GRAFT_SIGNUP = "invite"
    staff = make_user("staff", PASSWORD)
    staff.is_staff = True
    staff.save()
    request = rf.post("/admin/accounts/invitation/add/")
    request.user = staff
    request.session = {}
    request._messages = FallbackStorage(request)
    model_admin = admin.site._registry[Invitation]
    model_admin.save_model(request, Invitation(note="for Ada"), form=None, change=False)
    invitation = Invitation.objects.get()
    assert invitation.created_by == staff and invitation.note == "for Ada" and invitation.used_at is None
    shown = " ".join(str(m) for m in get_messages(request))
    link = shown.rsplit(" ", 1)[1]
    assert "shown only now" in shown and urlsplit(link).path == SIGNUP
    r = Client().post(f"{SIGNUP}?{urlsplit(link).query}", _form("ada", invite=link.split("invite=", 1)[1]))
    assert r.status_code == 302 and User.objects.filter(username="ada").exists()
