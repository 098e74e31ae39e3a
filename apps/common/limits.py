"""Request bodies bounded before anything reads them.

`BodyLimitMiddleware` runs first: a request whose Content-Length is over its path's limit
gets 413 at once, before authentication, CSRF or any parser reads a byte of the body. A body
without a length (chunked) is read through a counter that stops at the limit. Limits
per path: whole-dataset uploads and resumable-upload chunks may be large, predictions a few
images, everything else (forms, JSON, sign-in) small.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import BinaryIO

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse

FRAMING = 64 * 1024  # multipart boundaries and headers around the files


def _limits() -> list[tuple[re.Pattern[str], int]]:
    return [
        (re.compile(r"^/api/v1/datasets/$"), settings.GRAFT_MAX_UPLOAD_BYTES + FRAMING),
        (re.compile(r"^/api/v1/uploads/[^/]+/$"), settings.GRAFT_MAX_UPLOAD_BYTES),
        (re.compile(r"^/api/v1/models/\d+/predict/$"), settings.GRAFT_MAX_PREDICT_BYTES + FRAMING),
        (re.compile(r"^/api/v1/projects/\d+/predict/$"), settings.GRAFT_MAX_PREDICT_BYTES + FRAMING),
        (re.compile(r"^/api/v1/models/\d+/batch/$"), settings.GRAFT_MAX_UPLOAD_BYTES + FRAMING),
        # a version from a zip of images to add (multipart), or from a change set (JSON)
        (re.compile(r"^/api/v1/datasets/\d+/versions/$"), settings.GRAFT_MAX_UPLOAD_BYTES + FRAMING),
    ]


def body_limit(path: str) -> int:
    for pattern, limit in _limits():
        if pattern.match(path):
            return limit
    return settings.GRAFT_MAX_REQUEST_BYTES


def human_bytes(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def too_large(request: HttpRequest, limit: int) -> HttpResponse:
    message = f"The request body is larger than the limit of {human_bytes(limit)} for {request.path}."
    if request.path.startswith("/api/"):
        response: HttpResponse = JsonResponse({"error": message, "limit_bytes": limit}, status=413)
    else:
        response = HttpResponse(message, status=413, content_type="text/plain; charset=utf-8")
    return response


class BodyTooLarge(OSError):
    """Raised by a capped stream past its limit (an OSError, as a broken connection would be)."""


class _CappedStream:
    def __init__(self, stream: BinaryIO, limit: int) -> None:
        self._stream, self._limit, self._read = stream, limit, 0

    def _count(self, data: bytes) -> bytes:
        self._read += len(data)
        if self._read > self._limit:
            raise BodyTooLarge(f"request body over {self._limit} bytes")
        return data

    def read(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._limit + 1 - self._read
        return self._count(self._stream.read(size))

    def readline(self, size: int = -1) -> bytes:
        if size is None or size < 0:
            size = self._limit + 1 - self._read
        return self._count(self._stream.readline(size))


class BodyLimitMiddleware:
    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        limit = body_limit(request.path)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return JsonResponse({"error": "The Content-Length header is not a number."}, status=400)
        if length > limit:
            return too_large(request, limit)
        if not length and request.META.get("wsgi.input_terminated"):  # chunked: no length to check
            # Django reads the body stream only through read() and readline(), which it has.
            request._stream = _CappedStream(request._stream, limit)  # type: ignore[assignment]
        return self.get_response(request)

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        if isinstance(exception, BodyTooLarge):
            return too_large(request, body_limit(request.path))
        return None
