"""What a locked-out sign-in gets (django-axes' AXES_LOCKOUT_CALLABLE): a sentence, with a 429."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse


def message() -> str:
    minutes = round(float(settings.AXES_COOLOFF_TIME) * 60)
    return (
        f"Too many failed sign-ins for this account from your address; try again in {minutes} minutes. "
        "(Forgot the password? An administrator can reset it.)"
    )


def client_ip(request: HttpRequest) -> str:
    """The client's address as the throttles see it (DRF's rule, REST_FRAMEWORK["NUM_PROXIES"])."""
    from rest_framework.settings import api_settings

    proxies = api_settings.NUM_PROXIES or 0
    forwarded = request.META.get("HTTP_X_FORWARDED_FOR", "")
    if proxies and forwarded:
        hops = [h.strip() for h in forwarded.split(",")]
        return hops[-min(proxies, len(hops))]
    return request.META.get("REMOTE_ADDR", "")


def locked_out(request: HttpRequest, credentials: dict | None = None, *args, **kwargs) -> HttpResponse:
    if request.path.startswith("/api/"):
        return JsonResponse({"error": message()}, status=429)
    return HttpResponse(message(), status=429, content_type="text/plain; charset=utf-8")
