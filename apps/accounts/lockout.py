"""Sign-in lockout (django-axes): a limit per username and address, and a higher one per address
whatever the usernames (AXES_HANDLER); what a locked-out sign-in gets (AXES_LOCKOUT_CALLABLE):
a sentence saying which of the two applies, with a 429."""

from __future__ import annotations

from typing import Any, Literal

from axes.handlers.database import AxesDatabaseHandler
from axes.handlers.proxy import AxesProxyHandler
from axes.helpers import get_client_username, get_failure_limit, get_lockout_parameters
from axes.models import AccessAttempt
from django.conf import settings
from django.db.models import Sum
from django.http import HttpRequest, HttpResponse, JsonResponse

Reason = Literal["account", "address"]
Credentials = dict[str, Any]  # the keyword arguments of Django's `authenticate`, as axes passes them on


def message(reason: Reason = "account") -> str:
    minutes = round(float(settings.AXES_COOLOFF_TIME) * 60)
    if reason == "address":
        return (
            f"Too many failed sign-ins from your address, for any account; try again in {minutes} minutes. "
            "(Everyone signing in from this address waits, so ask an administrator if you share it.)"
        )
    return (
        f"Too many failed sign-ins for this account from your address; try again in {minutes} minutes. "
        "(Forgot the password? An administrator can reset it.)"
    )


def client_ip(request: HttpRequest) -> str:
    """The client's address as the throttles see it (DRF's rule, REST_FRAMEWORK["NUM_PROXIES"])."""
    from rest_framework.settings import api_settings

    proxies = api_settings.NUM_PROXIES or 0
    forwarded: str = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        hops = [h.strip() for h in forwarded.split(",")]
        return hops[-min(proxies, len(hops))]
    address: str = request.META.get("REMOTE_ADDR", "")
    return address


class LockoutHandler(AxesDatabaseHandler):  # type: ignore[misc]  # axes ships no types: its base class is Any
    """Axes' database handler with a limit per lockout parameter: a username+address pair locks at
    AXES_FAILURE_LIMIT, an address alone at GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT. (Axes itself has one
    limit for all of them, so an address would lock as soon as one of its users does.)"""

    def reason(self, request: HttpRequest, credentials: Credentials | None = None) -> Reason | None:
        """Which lockout applies to this request, if any."""
        parameters = get_lockout_parameters(request, credentials)
        attempts = self.get_user_attempts(request, credentials)
        for parameter, rows in zip(parameters, attempts, strict=True):
            failures = rows.aggregate(n=Sum("failures_since_start"))["n"] or 0
            if parameter == "ip_address":
                if failures >= settings.GRAFT_LOGIN_ADDRESS_FAILURE_LIMIT:
                    return "address"
            elif failures >= get_failure_limit(request, credentials):
                return "account"
        return None

    def get_failures(self, request: HttpRequest, credentials: Credentials | None = None) -> int:
        # Axes compares this with AXES_FAILURE_LIMIT, both before a sign-in and after a failure.
        if self.reason(request, credentials) is not None:
            limit: int = get_failure_limit(request, credentials)
            return limit
        return 0

    def reset_user_attempts(self, request: HttpRequest, credentials: Credentials | None = None) -> int:
        # On a successful sign-in, forget that username's failures from that address, not the
        # address's failures for other usernames: signing in to one's own account between guesses
        # must not reset the per-address count.
        username = get_client_username(request, credentials)
        address = getattr(request, "axes_ip_address", None) or client_ip(request)  # set by axes' middleware
        rows = AccessAttempt.objects.filter(username=username, ip_address=address)
        count: int = rows.delete()[0]
        return count


def lockout_reason(request: HttpRequest, credentials: Credentials | None = None) -> Reason:
    handler = AxesProxyHandler.get_implementation()
    reason = handler.reason(request, credentials) if isinstance(handler, LockoutHandler) else None
    return reason or "account"


def locked_out(
    request: HttpRequest, original_response: HttpResponse | None = None, credentials: Credentials | None = None
) -> HttpResponse:
    text = message(lockout_reason(request, credentials))
    if request.path.startswith("/api/"):
        return JsonResponse({"error": text}, status=429)
    return HttpResponse(text, status=429, content_type="text/plain; charset=utf-8")
