"""Pages for errors and the API docs: a person sees Graft's own pages, never Django's bare ones."""

from __future__ import annotations

import re

import pytest
from django.test import Client

pytestmark = pytest.mark.django_db


@pytest.fixture
def signed_in(make_user) -> Client:
    client = Client()
    client.force_login(make_user("alice"))
    return client


def test_not_found_is_a_styled_page_with_a_way_back(signed_in, settings):
    settings.DEBUG = False
    r = signed_in.get("/datasets/999999/")
    assert r.status_code == 404
    html = r.content.decode()
    assert "graft.css" in html and "Not found" in html and 'href="/"' in html
    assert "that belongs to you" in html
    # An API path still answers JSON.
    r = signed_in.get("/api/v1/datasets/999999/")
    assert r.status_code == 404 and r.json()["error"]


def test_server_error_page_is_styled_and_needs_nothing_but_static(settings):
    from django.template.loader import render_to_string

    html = render_to_string("500.html")  # no request, no database: what Django renders on a 500
    assert "graft.css" in html and "Something went wrong" in html


def test_expired_form_is_explained(make_user, settings):
    settings.DEBUG = False
    client = Client(enforce_csrf_checks=True)
    client.force_login(make_user("alice"))
    r = client.post("/tokens/", {"name": "x"})
    assert r.status_code == 403
    assert "This form has expired" in r.content.decode()


def test_api_docs_are_served_by_the_app_for_signed_in_users(signed_in, client):
    r = signed_in.get("/api/v1/docs/")
    assert r.status_code == 200
    html = r.content.decode()
    assert "swagger-ui" in html and "/api/v1/schema/" in html
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert assets and all(a.startswith("/") for a in assets), assets  # no CDN
    for asset in assets:
        if asset.endswith((".js", ".css")):
            assert signed_in.get(asset).status_code == 200, asset
    assert client.get("/api/v1/docs/").status_code in (401, 403)
