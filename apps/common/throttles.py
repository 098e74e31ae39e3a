"""Request throttles for the API and the sign-in and sign-up pages, with rates read from
settings when they are checked (GRAFT_THROTTLE_RATES; counts live in the cache: set CACHE_URL
to Redis when there are several web processes, so they share them)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.shortcuts import render
from rest_framework import throttling

if TYPE_CHECKING:  # rest_framework.views reads the throttles from settings: no import of it here
    from rest_framework.request import Request
    from rest_framework.views import APIView

View = Callable[..., HttpResponseBase]


class _SettingsRate:
    scope: str | None  # the throttle's own (AnonRateThrottle's "anon", ...)

    def get_rate(self) -> str | None:
        return settings.GRAFT_THROTTLE_RATES.get(self.scope) if self.scope else None


class AnonThrottle(_SettingsRate, throttling.AnonRateThrottle):
    """Requests without credentials, per client address."""


class UserThrottle(_SettingsRate, throttling.UserRateThrottle):
    """Requests of one signed-in user, whichever host or token they use."""


class SignInThrottle(_SettingsRate, throttling.AnonRateThrottle):
    """Token requests (a password each), per client address, whatever the username."""

    scope = "sign_in"


class AddressThrottle(_SettingsRate, throttling.SimpleRateThrottle):
    """Per client address, signed in or not: for the HTML sign-in and sign-up forms. Its counts
    share the keys of the API throttle of the same scope (SignInThrottle's for `sign_in`), so the
    login page and the token endpoint spend one budget of passwords per address."""

    def __init__(self, scope: str) -> None:
        self.scope = scope
        super().__init__()

    def get_cache_key(self, request: Request, view: APIView) -> str:
        return self.cache_format % {"scope": self.scope, "ident": self.get_ident(request)}

    def allow(self, request: HttpRequest) -> bool:
        """Count this request; False past the rate. (DRF's throttles read only request.META, which
        a Django request has too.)"""
        return self.allow_request(request, None)  # type: ignore[arg-type]


_WHAT = {"sign_in": "sign-in attempts", "sign_up": "sign-up attempts"}


def throttle_posts(scope: str) -> Callable[[View], View]:
    """Decorate a page so that its form posts count against GRAFT_THROTTLE_RATES[scope] per client
    address; past the rate it answers 429 with a sentence and Retry-After (GETs are never counted)."""

    def decorate(view: View) -> View:
        @functools.wraps(view)
        def throttled(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
            if request.method == "POST":
                throttle = AddressThrottle(scope)
                if not throttle.allow(request):
                    return _too_many(request, _WHAT.get(scope, "requests"), throttle.wait())
            return view(request, *args, **kwargs)

        return throttled

    return decorate


def _too_many(request: HttpRequest, what: str, wait: float | None) -> HttpResponse:
    seconds = max(1, math.ceil(wait or 1))
    later = f"{seconds} seconds" if seconds < 120 else f"{math.ceil(seconds / 60)} minutes"
    sentence = f"Too many {what} from your address; try again in {later}."
    response = render(request, "registration/throttled.html", {"message": sentence}, status=429)
    response["Retry-After"] = str(seconds)
    return response
