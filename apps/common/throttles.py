"""Request throttles for the API, with rates read from settings when they are checked
(GRAFT_THROTTLE_RATES; counts live in the cache: set CACHE_URL to Redis when there are
several web processes, so they share them)."""

from __future__ import annotations

from django.conf import settings
from rest_framework import throttling


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
