"""One error type for users, and the mapping of every API error to `{error: ...}` JSON."""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.views import defaults
from rest_framework import exceptions, status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

log = logging.getLogger(__name__)


class UserError(Exception):
    """Something the client did wrong; `message` is shown to them verbatim."""

    status_code: int = status.HTTP_400_BAD_REQUEST

    def __init__(self, message: str, *, status_code: int | None = None, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        if status_code is not None:
            self.status_code = status_code


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, UserError):
        return Response({"error": exc.message, **exc.details}, status=exc.status_code)
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    response = drf_exception_handler(exc, context)
    if response is None or not isinstance(exc, exceptions.APIException):
        return None  # a real bug: let Django log it and answer 500
    response.data = {"error": _message(exc), **_fields(exc)}
    return response


def _message(exc: exceptions.APIException) -> str:
    if isinstance(exc, exceptions.ValidationError):
        parts = []
        for field, errors in _flatten(exc.detail):
            parts.append(f"{field}: {errors}" if field else errors)
        return "Invalid request. " + " ".join(parts)
    if isinstance(exc, exceptions.NotFound):
        return "Not found."
    return str(exc.detail)


def _fields(exc: exceptions.APIException) -> dict[str, Any]:
    if isinstance(exc, exceptions.ValidationError) and isinstance(exc.detail, dict):
        return {"fields": exc.detail}
    return {}


def _flatten(detail: object, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(detail, dict):
        out = []
        for key, value in detail.items():
            name = key if key != "non_field_errors" else ""
            out.extend(_flatten(value, f"{prefix}.{name}" if prefix and name else prefix or name))
        return out
    if isinstance(detail, list):
        return [(prefix, " ".join(str(d) for d in detail if not isinstance(d, (dict, list))))] + [
            item for d in detail if isinstance(d, (dict, list)) for item in _flatten(d, prefix)
        ]
    return [(prefix, str(detail))]


def _is_api(request: HttpRequest) -> bool:
    return request.path.startswith("/api/")


def json_400_or_html(request: HttpRequest, exception: Exception) -> HttpResponse:
    """Django's own 400s (too many files or fields in one request, a malformed body)."""
    if _is_api(request):
        reason = str(exception) or "Bad request."
        return JsonResponse({"error": f"{reason.rstrip('.')}."}, status=400)
    return defaults.bad_request(request, exception)


def json_404_or_html(request: HttpRequest, exception: Exception | None = None) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"error": f"Not found: {request.path}"}, status=404)
    return defaults.page_not_found(request, exception)


def json_500_or_html(request: HttpRequest) -> HttpResponse:
    if _is_api(request):
        return JsonResponse({"error": "Internal server error; the operators have the details."}, status=500)
    return defaults.server_error(request)
