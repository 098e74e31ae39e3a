"""Refusing oversized uploads before they are stored."""

from __future__ import annotations

from django.core.files.uploadhandler import FileUploadHandler
from django.http import HttpRequest
from rest_framework.request import Request

from apps.common.errors import UserError
from apps.common.limits import human_bytes


def _too_large(limit: int) -> UserError:
    return UserError(
        f"The upload is larger than the limit of {human_bytes(limit)}.",
        status_code=413,
        limit_bytes=limit,
    )


class MaxSizeUploadHandler(FileUploadHandler):
    """Aborts a multipart upload as soon as it passes `limit` bytes (covers chunked bodies)."""

    def __init__(self, request: HttpRequest | None = None, *, limit: int) -> None:
        super().__init__(request)
        self.limit = limit
        self.seen = 0

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        self.seen += len(raw_data)
        if self.seen > self.limit:
            raise _too_large(self.limit)
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None


def limit_upload_size(request: Request, limit: int) -> None:
    """Call before touching request.data: checks Content-Length, then guards the stream."""
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        length = 0
    if length > limit + 64 * 1024:  # allow for multipart framing around the file
        raise _too_large(limit)
    request.upload_handlers.insert(0, MaxSizeUploadHandler(request, limit=limit))
