"""Resumable uploads over the tus protocol (core, creation, termination; https://tus.io).

The browser uses tus-js-client (vendored in frontend/static/vendor). The Python
server packages for tus are unmaintained (django-tus supports Django <= 3.1;
drf-tus pins the archived django-fsm), and the server side of the core protocol
is small, so it lives here: POST creates an upload, HEAD says how many bytes
arrived, PATCH appends at that offset, DELETE abandons it. Bodies are streamed to
a part file in 1 MiB pieces, so neither the page nor the server holds the file in
memory; a dropped connection keeps every byte written, and the client resumes
from the offset HEAD reports. The last byte turns the file into a Dataset (moved, not copied, into local storage).
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import logging
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files import File
from django.db import transaction
from django.http import Http404
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.common.errors import UserError
from apps.datasets.models import Dataset, Upload
from apps.datasets.services import dataset_create

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
CHUNK = 1024 * 1024
UPLOAD_EXPIRY = timedelta(days=1)  # an upload untouched this long is deleted


# --- services --------------------------------------------------------------------------------


def upload_create(*, owner: AbstractBaseUser, length: int, filename: str = "", name: str = "") -> Upload:
    if length <= 0:
        raise UserError("The file is empty.")
    if length > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError(
            f"The file is {length / 1e9:.2f} GB; the limit is {settings.GRAFT_MAX_UPLOAD_BYTES / 1e9:.2f} GB.",
            status_code=413,
        )
    if filename and not filename.lower().endswith(".zip"):
        raise UserError(f"'{filename}' is not a .zip file. Upload a zip with one folder of images per class.")
    upload = Upload.objects.create(owner=owner, length=length, filename=filename[:255], name=name[:200])
    upload.part_path.parent.mkdir(parents=True, exist_ok=True)
    upload.part_path.touch()
    return upload


def _offset_conflict(upload: Upload, offset: int) -> UserError:
    return UserError(f"This upload is at byte {upload.offset}, not {offset}; resume from there.", status_code=409)


def upload_append(*, upload: Upload, offset: int, stream, declared: int | None) -> Upload:
    """Append the request body at `offset`; keeps what arrived even if the client drops.

    One PATCH at a time per upload (an exclusive lock on the part file; a second
    gets 423 and tus clients retry). A client that goes away mid-body keeps every
    byte written; a failing disk is the server's error, never reported as success.
    """
    if offset != upload.offset:
        raise _offset_conflict(upload, offset)
    if declared is not None and upload.offset + declared > upload.length:
        raise UserError("The chunk goes past the declared length of the upload.", status_code=413)
    try:
        part = open(upload.part_path, "r+b", buffering=0)  # unbuffered: written means on disk
    except FileNotFoundError:
        raise UserError("This upload was abandoned; start a new one.", status_code=410) from None
    with part:
        try:
            fcntl.flock(part, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError("Another request is writing this upload; retry shortly.", status_code=423) from None
        upload.refresh_from_db(fields=["offset"])
        if offset != upload.offset:  # the request holding the lock before us moved it
            raise _offset_conflict(upload, offset)
        part.seek(upload.offset)
        written = 0
        try:
            while stream is not None and upload.offset + written < upload.length:
                try:
                    piece = stream.read(min(CHUNK, upload.length - upload.offset - written))
                except OSError as exc:  # the client went away mid-chunk: keep the bytes we have
                    log.info("upload %s interrupted after %s bytes: %s", upload.pk, written, exc)
                    break
                if not piece:
                    break
                part.write(piece)
                written += len(piece)
        finally:
            if written:
                Upload.objects.filter(pk=upload.pk).update(offset=upload.offset + written, updated_at=timezone.now())
                upload.offset += written
    return upload


class _PartFile(File):
    """The finished part file; its path lets local storage move it instead of copying gigabytes."""

    def temporary_file_path(self) -> str:
        return self.file.name


def upload_finish(*, upload: Upload) -> Dataset:
    """The last byte arrived: the part file becomes a dataset (validated like any upload).

    Idempotent: the finished upload keeps a link to its dataset (until it expires),
    so a client that lost the last response learns the dataset from a retry or a
    HEAD. A user error (not a zip) deletes the upload; any other failure keeps the
    bytes, so a retry finishes without uploading again.
    """
    try:
        with transaction.atomic():
            upload = Upload.objects.select_for_update().get(pk=upload.pk)
            if upload.dataset_id:
                return upload.dataset
            try:
                with open(upload.part_path, "rb") as part:
                    file = _PartFile(part, name=upload.filename or "upload.zip")
                    dataset = dataset_create(owner=upload.owner, file=file, name=upload.name)
            except FileNotFoundError:
                raise UserError("This upload's data is gone; upload the file again.", status_code=410) from None
            upload.dataset = dataset
            upload.save(update_fields=["dataset", "updated_at"])
    except UserError:  # outside the rolled-back transaction: the refusal is final
        upload_delete(upload=upload)
        raise
    upload.part_path.unlink(missing_ok=True)  # moved into storage already, on local disks
    return dataset


def upload_delete(*, upload: Upload) -> None:
    upload.part_path.unlink(missing_ok=True)
    upload.delete()


def upload_expire() -> int:
    """Delete uploads nobody has touched for a day (abandoned tabs, lost laptops)."""
    stale = Upload.objects.filter(updated_at__lt=timezone.now() - UPLOAD_EXPIRY)
    count = 0
    for upload in stale:
        upload_delete(upload=upload)
        count += 1
    return count


# --- API ---------------------------------------------------------------------------------------


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit()):
        raise UserError(f"The {name} header must be a non-negative integer.")
    return int(value)


def _metadata(header: str) -> dict[str, str]:
    """Upload-Metadata: 'key base64(value),key2 base64(value2)'."""
    out = {}
    for pair in filter(None, (p.strip() for p in header.split(","))):
        key, _, value = pair.partition(" ")
        try:
            out[key] = base64.b64decode(value, validate=True).decode("utf-8") if value else ""
        except (binascii.Error, UnicodeDecodeError):
            raise UserError(f"Upload-Metadata '{key}' is not valid base64 UTF-8.") from None
    return out


def _dataset_headers(dataset: Dataset) -> dict[str, str]:
    return {"Graft-Dataset": str(dataset.pk), "Graft-Dataset-Url": f"/datasets/{dataset.pk}/"}


class TusUploadListApi(APIView):
    @extend_schema(exclude=True)
    def options(self, request: Request, *args, **kwargs) -> Response:
        return Response(
            status=204,
            headers=_tus_headers(
                **{
                    "Tus-Version": TUS_VERSION,
                    "Tus-Extension": "creation,termination",
                    "Tus-Max-Size": str(settings.GRAFT_MAX_UPLOAD_BYTES),
                }
            ),
        )

    @extend_schema(request=None, responses={201: None}, description="tus creation: Upload-Length, Upload-Metadata")
    def post(self, request: Request) -> Response:
        length = _int_header(request, "Upload-Length")
        if length is None:
            raise UserError("The Upload-Length header is required (deferred length is not supported).")
        meta = _metadata(request.headers.get("Upload-Metadata", ""))
        upload = upload_create(
            owner=request.user, length=length, filename=meta.get("filename", ""), name=meta.get("name", "")
        )
        location = request.build_absolute_uri(reverse("api:upload", args=[upload.pk]))
        return Response(status=201, headers=_tus_headers(Location=location, **{"Upload-Offset": "0"}))


class TusUploadApi(APIView):
    def _get(self, request: Request, upload_id) -> Upload:
        try:
            return Upload.objects.get(pk=upload_id, owner=request.user)
        except Upload.DoesNotExist:
            raise Http404 from None

    @extend_schema(exclude=True)
    def head(self, request: Request, upload_id) -> Response:
        upload = self._get(request, upload_id)
        headers = _tus_headers(**{"Upload-Offset": str(upload.offset), "Upload-Length": str(upload.length)})
        if upload.offset == upload.length:  # complete: finish it if the last PATCH could not
            headers.update(_dataset_headers(upload_finish(upload=upload)))
        return Response(status=200, headers=headers)

    @extend_schema(request=None, responses={204: None}, description="tus core: append bytes at Upload-Offset")
    def patch(self, request: Request, upload_id) -> Response:
        if request.content_type != "application/offset+octet-stream":
            raise UserError("A tus PATCH must have Content-Type application/offset+octet-stream.", status_code=415)
        offset = _int_header(request, "Upload-Offset")
        if offset is None:
            raise UserError("The Upload-Offset header is required.")
        upload = self._get(request, upload_id)
        upload = upload_append(
            upload=upload, offset=offset, stream=request.stream, declared=_int_header(request, "Content-Length")
        )
        headers = _tus_headers(**{"Upload-Offset": str(upload.offset)})
        if upload.offset == upload.length:
            headers.update(_dataset_headers(upload_finish(upload=upload)))
        return Response(status=204, headers=headers)

    @extend_schema(request=None, responses={204: None}, description="tus termination: abandon the upload")
    def delete(self, request: Request, upload_id) -> Response:
        with transaction.atomic():
            upload_delete(upload=self._get(request, upload_id))
        return Response(status=204, headers=_tus_headers())
