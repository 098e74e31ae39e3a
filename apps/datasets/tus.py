"""Resumable uploads over the tus protocol (core, creation, termination; https://tus.io).

The browser uses tus-js-client (vendored in frontend/static/vendor). The Python
server packages for tus are unmaintained (django-tus supports Django <= 3.1;
drf-tus pins the archived django-fsm), and the server side of the core protocol
is small, so it lives here: POST creates an upload, HEAD says how many bytes
arrived, PATCH appends at that offset, DELETE abandons it.

Nothing about an upload lives on the web host, so consecutive PATCHes may land on
different hosts that share only the database and storage:
- each PATCH body streams (1 MiB pieces) into its own stored part,
  `uploads/<id>/<offset>-<writer>`; a client that drops mid-body keeps every byte
  that arrived, and resumes from the offset HEAD reports;
- the row records the parts and the offset, moved by a conditional UPDATE only
  after the part is stored;
- one writer at a time: a PATCH takes a lease on the row (a conditional UPDATE,
  renewed while bytes arrive, released at the end); a second PATCH gets 423, and
  a writer that died loses its lease after `LEASE` seconds;
- the last byte assembles the parts into the dataset's archive (streamed, storage
  to storage), outside any transaction; only then is the Dataset row created.
"""

from __future__ import annotations

import base64
import binascii
import io
import logging
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import timedelta
from typing import IO, Any

from django.conf import settings
from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import Q
from django.http import Http404
from django.urls import reverse
from django.utils import timezone
from drf_spectacular.utils import extend_schema
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.accounts.quotas import check_new_dataset, owner_locked
from apps.common.errors import UserError
from apps.common.requests import AuthenticatedRequest, whole_number
from apps.common.schema import TUS_RESUMABLE, tus_header
from apps.common.storage import PIECE, StreamReader, delete_prefix, delete_quietly, save_stream, stored_pieces
from apps.datasets.models import Dataset, Upload
from apps.datasets.selectors import dataset_get
from apps.datasets.services import dataset_create_stored
from apps.datasets.versions import version_add_stored

log = logging.getLogger(__name__)

TUS_VERSION = "1.0.0"
LEASE = timedelta(seconds=60)  # a writer that shows no sign of life this long loses the upload
RENEW_EVERY = 10.0  # seconds between lease renewals while bytes arrive
ZIP_TAIL = 128 * 1024  # a zip's end-of-directory record (and its comment) sits in its last 64 KiB


# --- services --------------------------------------------------------------------------------


def upload_create(
    *, owner: User, length: int, filename: str = "", name: str = "", add_to: Dataset | None = None, note: str = ""
) -> Upload:
    """A resumable upload: of a new dataset, or of images to add to `add_to` as its next version."""
    if length <= 0:
        raise UserError("The file is empty.")
    if length > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError(
            f"The file is {length / 1e9:.2f} GB; the limit is {settings.GRAFT_MAX_UPLOAD_BYTES / 1e9:.2f} GB.",
            status_code=413,
        )
    if filename and not filename.lower().endswith(".zip"):
        raise UserError(f"'{filename}' is not a .zip file. Upload a zip with one folder of images per class.")
    if add_to is not None and add_to.status != Dataset.Status.READY:
        raise UserError(f"Dataset '{add_to.name}' is not ready; add images once it is.", status_code=409)
    with transaction.atomic():  # parallel creations queue on the owner's lock: none passes the cap
        owner_locked(owner)
        check_new_dataset(owner, length, resumable=True, new_dataset=add_to is None)
        return Upload.objects.create(
            owner=owner, length=length, filename=filename[:255], name=name[:200], add_to=add_to, note=note[:300]
        )


def _offset_conflict(upload: Upload, offset: int) -> UserError:
    return UserError(f"This upload is at byte {upload.offset}, not {offset}; resume from there.", status_code=409)


class _Lease:
    """The right to write an upload at one offset: taken, renewed and released with conditional UPDATEs."""

    def __init__(self, upload: Upload, offset: int) -> None:
        self.upload, self.offset, self.token = upload, offset, uuid.uuid4()
        self._renewed = 0.0

    def take(self) -> _Lease:
        now = timezone.now()
        free = Q(writer__isnull=True) | Q(writer_until__lt=now)
        rows = Upload.objects.filter(free, pk=self.upload.pk, offset=self.offset)
        if not rows.update(writer=self.token, writer_until=now + LEASE):
            current = Upload.objects.filter(pk=self.upload.pk).first()
            if current is None:
                raise UserError("This upload was abandoned; start a new one.", status_code=410)
            if current.offset != self.offset:  # the request before us moved it
                raise _offset_conflict(current, self.offset)
            raise UserError("Another request is writing this upload; retry shortly.", status_code=423)
        self._renewed = time.monotonic()
        return self

    def renew(self) -> None:
        if time.monotonic() - self._renewed < RENEW_EVERY:
            return
        self._renewed = time.monotonic()
        if not Upload.objects.filter(pk=self.upload.pk, writer=self.token).update(writer_until=timezone.now() + LEASE):
            raise _LeaseLost

    def release(self) -> None:
        Upload.objects.filter(pk=self.upload.pk, writer=self.token).update(writer=None, writer_until=None)


class _LeaseLost(Exception):
    """This writer stalled past its lease and another may have taken the upload."""


def _body(stream: IO[bytes] | None, limit: int, lease: _Lease) -> Iterator[bytes]:
    """The request body in pieces, at most `limit` bytes; a client that goes away ends it early."""
    left = limit
    while stream is not None and left > 0:
        try:
            piece = stream.read(min(PIECE, left))
        except OSError as exc:  # the client went away mid-chunk: keep the bytes we have
            log.info("upload %s interrupted after %s bytes: %s", lease.upload.pk, limit - left, exc)
            return
        if not piece:
            return
        left -= len(piece)
        lease.renew()
        yield piece


def upload_append(*, upload: Upload, offset: int, stream: IO[bytes] | None, declared: int | None) -> Upload:
    """Append the request body at `offset` as a new stored part; keeps what arrived if the client drops."""
    if offset != upload.offset:
        raise _offset_conflict(upload, offset)
    if declared is not None and upload.offset + declared > upload.length:
        raise UserError("The chunk goes past the declared length of the upload.", status_code=413)
    lease = _Lease(upload, offset).take()
    name = f"{upload.storage_prefix}{offset:020d}-{lease.token.hex[:12]}"  # this writer's alone
    recorded = False
    try:
        reader = StreamReader(_body(stream, upload.length - offset, lease))
        first = reader.read(1)  # store nothing for an empty body
        if first:
            stored = save_stream(name, StreamReader(_chain(first, reader)))
            written = reader.count
            recorded = bool(
                Upload.objects.filter(pk=upload.pk, offset=offset, writer=lease.token).update(
                    offset=offset + written, parts=[*upload.parts, stored], updated_at=timezone.now()
                )
            )
            if not recorded:
                raise _LeaseLost
            upload.offset, upload.parts = offset + written, [*upload.parts, stored]
    except _LeaseLost:
        raise UserError(
            "This upload stalled and was taken over by another request; resume it.", status_code=409
        ) from None
    finally:
        if not recorded:  # stored whole or in part, but not part of the upload
            delete_quietly(name)
        lease.release()
    return upload


def _chain(first: bytes, rest: StreamReader) -> Iterator[bytes]:
    yield first
    while piece := rest.read(PIECE):
        yield piece


def upload_finish(*, upload: Upload) -> Dataset | None:
    """The last byte arrived: the parts become one archive, and the archive a dataset.

    Idempotent: the finished upload keeps a link to its dataset (until it expires), so a
    client that lost the last response learns the dataset from a retry or a HEAD. None
    while another request is finishing it. A fault of the file (not a zip) deletes the upload;
    any other failure keeps the parts (a dataset busy with another version, a full quota, a
    server error), so a retry finishes without uploading again.
    """
    upload.refresh_from_db()
    if upload.dataset_id:
        return upload.dataset
    try:
        lease = _Lease(upload, upload.length).take()
    except UserError as exc:
        if exc.status_code == 423:
            return None
        raise
    adding = upload.add_to
    dataset = adding or Dataset(owner=upload.owner, archive_bytes=upload.length)
    archive = None
    version = None
    try:
        reader = StreamReader(stored_pieces(upload.parts, on_piece=lease.renew), tail=ZIP_TAIL)
        where = f"additions/{uuid.uuid4().hex}.zip" if adding else "archive.zip"
        archive = save_stream(f"{dataset.storage_prefix}{where}", reader)
        if reader.count != upload.length:  # parts lost (or written by an older release, on a local disk)
            raise UserError("This upload's data is gone; upload the file again.", status_code=410)
        if not zipfile.is_zipfile(io.BytesIO(reader.tail)):
            name = upload.filename or "The upload"
            raise UserError(f"'{name}' is not a zip archive. Upload a .zip with one folder of images per class.")
        with transaction.atomic():
            if adding:
                version = version_add_stored(dataset=adding, archive=archive, size=upload.length, note=upload.note)
            else:
                dataset = dataset_create_stored(
                    dataset=dataset, archive=archive, name=upload.name, filename=upload.filename or "upload.zip"
                )
            if not Upload.objects.filter(pk=upload.pk, writer=lease.token, dataset__isnull=True).update(
                dataset=dataset, version=version, writer=None, writer_until=None, updated_at=timezone.now()
            ):
                raise _LeaseLost
        archive = None
    except UserError as exc:
        if exc.status_code in (409, 413):  # the dataset busy, or the storage quota full: nothing wrong with the file
            raise UserError(
                f"{exc.message} The uploaded file is kept for {settings.GRAFT_UPLOAD_EXPIRY_HOURS} hours: resume "
                "the upload (or ask for its offset) to finish it then, without sending it again.",
                status_code=exc.status_code,
            ) from None
        upload_delete(upload=upload)
        raise
    except _LeaseLost:  # another request finished (or abandoned) it meanwhile
        current = Upload.objects.filter(pk=upload.pk).select_related("dataset").first()
        if current is None:
            raise UserError("This upload was abandoned; start a new one.", status_code=410) from None
        return current.dataset
    finally:
        delete_quietly(archive)
        lease.release()
    Upload.objects.filter(pk=upload.pk).update(parts=[])
    delete_prefix(upload.storage_prefix)  # the parts are in the archive now
    return dataset


def upload_delete(*, upload: Upload, unless_writing: bool = False) -> None:
    """Abandon an upload and its parts. `unless_writing`: refuse (423) while a request holds its
    lease (a tus DELETE racing a PATCH, or the last PATCH assembling the archive)."""
    rows = Upload.objects.filter(pk=upload.pk)
    if unless_writing:
        rows = rows.filter(Q(writer__isnull=True) | Q(writer_until__lt=timezone.now()))
    deleted, _ = rows.delete()
    if not deleted:
        if unless_writing and Upload.objects.filter(pk=upload.pk).exists():
            raise UserError("This upload is being written; retry shortly.", status_code=423)
        return
    delete_prefix(upload.storage_prefix)  # its parts, and anything a failed write left


def upload_expire() -> int:
    """Delete uploads nobody has touched for GRAFT_UPLOAD_EXPIRY_HOURS (abandoned tabs, lost laptops);
    not one that a request has just started writing (it is not abandoned)."""
    stale = Upload.objects.filter(updated_at__lt=timezone.now() - timedelta(hours=settings.GRAFT_UPLOAD_EXPIRY_HOURS))
    count = 0
    for upload in stale:
        try:
            upload_delete(upload=upload, unless_writing=True)
        except UserError:
            continue
        count += 1
    return count


# --- API ---------------------------------------------------------------------------------------


def _tus_headers(**extra: str) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Cache-Control": "no-store", **extra}


def _int_header(request: Request, name: str) -> int | None:
    value = request.headers.get(name)
    if value is None:
        return None
    if not (value.isascii() and value.isdigit() and len(value) <= 18):  # 18 digits: far past any upload
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


def _dataset_headers(dataset: Dataset, upload: Upload) -> dict[str, str]:
    headers = {"Graft-Dataset": str(dataset.pk), "Graft-Dataset-Url": f"/datasets/{dataset.pk}/"}
    version = Upload.objects.filter(pk=upload.pk).values_list("version__number", flat=True).first()
    if version:  # images added to the dataset: the version they make
        headers["Graft-Version"] = str(version)
    return headers


class TusUploadListApi(APIView):
    @extend_schema(exclude=True)
    # DRF hands its views a Request, where django-stubs' View.options expects an HttpRequest.
    def options(self, request: Request, *args: Any, **kwargs: Any) -> Response:  # type: ignore[override]
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

    @extend_schema(
        request=None,
        responses={201: None},
        description="tus creation: Upload-Length, Upload-Metadata",
        parameters=[
            TUS_RESUMABLE,
            tus_header("Upload-Length", "the file's size in bytes", kind=int),
            tus_header(
                "Upload-Metadata",
                "'filename <base64>,name <base64>'; to add images to a dataset as its next version: "
                "'dataset <base64 id>,note <base64>'",
                required=False,
            ),
        ],
    )
    def post(self, request: AuthenticatedRequest) -> Response:
        length = _int_header(request, "Upload-Length")
        if length is None:
            raise UserError("The Upload-Length header is required (deferred length is not supported).")
        meta = _metadata(request.headers.get("Upload-Metadata", ""))
        add_to = None
        if meta.get("dataset"):
            dataset_id = whole_number(meta["dataset"])
            if dataset_id is None:
                raise UserError("The 'dataset' metadata must be a dataset id.")
            add_to = dataset_get(user=request.user, dataset_id=dataset_id)
        upload = upload_create(
            owner=request.user,
            length=length,
            filename=meta.get("filename", ""),
            name=meta.get("name", ""),
            add_to=add_to,
            note=meta.get("note", ""),
        )
        location = request.build_absolute_uri(reverse("api:upload", args=[upload.pk]))
        return Response(status=201, headers=_tus_headers(Location=location, **{"Upload-Offset": "0"}))


class TusUploadApi(APIView):
    def _get(self, request: AuthenticatedRequest, upload_id: uuid.UUID) -> Upload:
        try:
            return Upload.objects.get(pk=upload_id, owner=request.user)
        except Upload.DoesNotExist:
            raise Http404 from None

    @extend_schema(exclude=True)
    def head(self, request: AuthenticatedRequest, upload_id: uuid.UUID) -> Response:
        upload = self._get(request, upload_id)
        headers = _tus_headers(**{"Upload-Offset": str(upload.offset), "Upload-Length": str(upload.length)})
        if upload.offset == upload.length:  # complete: finish it if the last PATCH could not
            dataset = upload_finish(upload=upload)
            if dataset is not None:  # else another request is finishing it: ask again
                headers.update(_dataset_headers(dataset, upload))
        return Response(status=200, headers=headers)

    @extend_schema(
        request={"application/offset+octet-stream": {"type": "string", "format": "binary"}},
        responses={204: None},
        description="tus core: append bytes at Upload-Offset",
        parameters=[
            TUS_RESUMABLE,
            tus_header("Upload-Offset", "where these bytes go: the offset HEAD reports", kind=int),
        ],
    )
    def patch(self, request: AuthenticatedRequest, upload_id: uuid.UUID) -> Response:
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
            dataset = upload_finish(upload=upload)
            if dataset is None:
                raise UserError("Another request is finishing this upload; ask again shortly.", status_code=423)
            headers.update(_dataset_headers(dataset, upload))
        return Response(status=204, headers=headers)

    @extend_schema(
        request=None,
        responses={204: None},
        description="tus termination: abandon the upload",
        parameters=[TUS_RESUMABLE],
    )
    def delete(self, request: AuthenticatedRequest, upload_id: uuid.UUID) -> Response:
        upload_delete(upload=self._get(request, upload_id), unless_writing=True)
        return Response(status=204, headers=_tus_headers())
