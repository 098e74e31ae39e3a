"""Stored files, whatever the backend (local files, or S3-compatible object storage).

Every host reads and writes through these, streamed in pieces: a web host or a worker
never holds a dataset or a bundle whole in memory, and never needs a shared disk.

On S3 the reads and deletes here share one boto3 client per process (`s3_client`), made from the
storage's own settings. django-storages makes a boto3 resource for each thread that touches it,
about 15 MiB each: a fresh web process (8 threads) added 107 MiB on its first gallery page
(tests/benchmarks/bench_memory.py). A boto3 client, unlike a resource, is safe to share between
threads.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import IO, Any, cast

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage

log = logging.getLogger(__name__)

PIECE = 1024 * 1024
RANGE_BUFFER = 256 * 1024  # what `open_seekable` asks S3 for at least, in one ranged GET


def local_path(name: str) -> Path | None:
    """The file itself, where storage is a local disk; None for object storage."""
    try:
        return Path(default_storage.path(name))
    except NotImplementedError:  # remote storage (S3 and friends) has no local path
        return None


def open_stream(name: str) -> IO[bytes]:
    """A forward-only reader of stored file `name` that downloads as it is read.

    (django-storages' S3 file object would first copy the whole object into a temporary
    file; boto3's streaming body does not.)
    """
    obj = s3_object(name)
    if obj is None:
        return default_storage.open(name, "rb")
    return cast(IO[bytes], obj.get()["Body"])


def open_if_stored(name: str) -> IO[bytes] | None:
    """A stream of stored file `name` (`open_stream`), or None when it is absent."""
    try:
        return open_stream(name)
    except FileNotFoundError:
        return None
    except Exception as exc:
        if _s3_error_code(exc) in ("NoSuchKey", "404", "NotFound"):  # S3's answer (botocore's ClientError)
            return None
        raise


@contextmanager
def open_seekable(name: str, buffer_size: int = RANGE_BUFFER) -> Iterator[IO[bytes]]:
    """A seekable reader of stored file `name`, read where it lies: the file itself on a local disk,
    byte ranges on S3 (only what is read is fetched, `buffer_size` at least a request), else the
    backend's own file object."""
    path = local_path(name)
    obj = s3_object(name) if path is None else None
    if path is not None:
        fh: IO[bytes] = path.open("rb")
    elif obj is not None:
        fh = io.BufferedReader(RangeReader(obj), buffer_size=buffer_size)
    else:  # another backend
        fh = default_storage.open(name, "rb")
    with fh:
        yield fh


@contextmanager
def local_copy(name: str) -> Iterator[Path]:
    """A local path for stored file `name`: the file itself on local storage, else a scratch copy."""
    path = local_path(name)
    if path is not None:
        yield path
        return
    settings.GRAFT_WORK_DIR.mkdir(parents=True, exist_ok=True)
    with NamedTemporaryFile(dir=settings.GRAFT_WORK_DIR, suffix=Path(name).suffix) as tmp:
        with open_stream(name) as src:
            shutil.copyfileobj(src, tmp, length=PIECE)
        tmp.flush()
        yield Path(tmp.name)


def save_stream(name: str, reader: IO[bytes] | io.IOBase) -> str:
    """Store what `reader` gives until it ends, streamed (S3: multipart); returns the stored name."""
    return default_storage.save(name, File(cast(IO[bytes], reader), name=name))  # an io stream reads as one


def delete_quietly(name: str | None) -> None:
    """Delete a stored file; a failure is logged, never raised (cleanup must not mask the real error)."""
    if not name:
        return
    try:
        obj = s3_object(name)
        if obj is None:
            default_storage.delete(name)
        else:
            obj.delete()
    except Exception:  # noqa: BLE001
        log.exception("could not delete stored file %s", name)


def delete_prefix(prefix: str) -> None:
    """Delete every stored file under `prefix` (a dataset's, a model's, a job's folder)."""
    assert prefix.endswith("/") and len(prefix) > 1, prefix
    try:
        folder = s3_object(prefix)
        if folder is None:
            shutil.rmtree(default_storage.path(prefix), ignore_errors=True)
            return
        pages = folder.client.get_paginator("list_objects").paginate(Bucket=folder.bucket, Prefix=folder.key)
        for page in pages:  # up to 1,000 keys a page, deleted in one request
            keys = [{"Key": listed["Key"]} for listed in page.get("Contents", [])]
            if keys:
                answer = folder.client.delete_objects(Bucket=folder.bucket, Delete={"Objects": keys, "Quiet": True})
                if errors := answer.get("Errors"):
                    log.error("could not delete %d stored files under %s: %s", len(errors), prefix, errors[:3])
    except Exception:  # noqa: BLE001
        log.exception("could not delete stored files under %s", prefix)


@dataclass(frozen=True)
class S3Object:
    """A stored file on S3, reached through the process's shared client (`s3_client`).

    `get` and `content_length` are those of boto3's `s3.Object`, which is all `RangeReader` uses.
    """

    client: Any
    bucket: str
    key: str

    def get(self, **kwargs: Any) -> dict[str, Any]:
        return cast(dict[str, Any], self.client.get_object(Bucket=self.bucket, Key=self.key, **kwargs))

    @property
    def content_length(self) -> int:
        return int(self.client.head_object(Bucket=self.bucket, Key=self.key)["ContentLength"])

    def delete(self) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:
            if _s3_status(exc) != 404:  # gone already: as django-storages' S3Storage.delete
                raise


def s3_object(name: str) -> S3Object | None:
    """Stored file (or folder) `name` as an S3 object with the shared client; None where storage is not S3."""
    storage = _s3_storage()
    if storage is None:
        return None
    from storages.utils import clean_name  # type: ignore[import-untyped]  # django-storages ships no types

    key = storage._normalize_name(clean_name(name))  # the key S3Storage itself reads and writes
    return S3Object(client=_client_for(storage), bucket=storage.bucket_name, key=key)


def s3_client() -> Any | None:
    """The process's one boto3 S3 client, made on first use; None where storage is not S3."""
    storage = _s3_storage()
    return None if storage is None else _client_for(storage)


_client_lock = threading.Lock()
_client: tuple[object, int, Any] | None = None  # the storage it serves, the process that made it, the client


def _client_for(storage: Any) -> Any:
    """The shared client of `storage`, made once under a lock (a test's own storage, or a forked
    process, gets a new one)."""
    global _client
    made = _client
    if made is None or made[0] is not storage or made[1] != os.getpid():
        with _client_lock:
            made = _client
            if made is None or made[0] is not storage or made[1] != os.getpid():
                made = _client = (storage, os.getpid(), _new_client(storage))
    return made[2]


def _new_client(storage: Any) -> Any:
    """A client with what S3Storage's own `connection` is made of: its session (keys, token or
    profile), endpoint, region, TLS settings and botocore config (signature version, addressing
    style, proxies, or AWS_S3_CLIENT_CONFIG whole)."""
    return storage._create_session().client(
        "s3",
        region_name=storage.region_name,
        use_ssl=storage.use_ssl,
        endpoint_url=storage.endpoint_url,
        config=storage.client_config,
        verify=storage.verify,
    )


def _s3_storage() -> Any | None:
    """The default storage where it is django-storages' S3Storage; None for any other backend.

    Never `default_storage.bucket`: that makes the calling thread its own boto3 resource.
    """
    backend = default_storage.__class__  # default_storage is lazy: this sets it up, importing its module
    s3 = sys.modules.get("storages.backends.s3")
    if s3 is None or not issubclass(backend, s3.S3Storage):
        return None
    return default_storage._wrapped  # type: ignore[attr-defined]  # the backend itself (default_storage is its proxy)


def _s3_error_code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def _s3_status(exc: Exception) -> int | None:
    status: int | None = getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status


class RangeReader(io.RawIOBase):
    """A seekable reader of one S3 object that fetches only the bytes read, each read one ranged GET.

    `obj` is boto3's `s3.Object` or an `S3Object`. zipfile reads the directory at the end, then
    each member it opens: a few requests per member instead of the whole archive.
    """

    def __init__(self, obj: Any) -> None:
        self._obj = obj
        self._size = int(obj.content_length)  # one HEAD
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def readinto(self, buffer: Any) -> int:
        end = min(self._pos + len(buffer), self._size)
        if end <= self._pos:
            return 0
        data = self._obj.get(Range=f"bytes={self._pos}-{end - 1}")["Body"].read()
        buffer[: len(data)] = data
        self._pos += len(data)
        return len(data)


class StreamReader(io.RawIOBase):
    """A forward-only reader over pieces of bytes (for `save_stream`).

    `pieces` yields bytes; `tail` keeps the last bytes read (a zip's directory sits there).
    """

    def __init__(self, pieces: Iterable[bytes], tail: int = 0) -> None:
        self._pieces = iter(pieces)
        self._buffer = b""
        self.count = 0
        self._tail_size = tail
        self.tail = b""

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            piece = next(self._pieces, None)
            if piece is None:
                break
            self._buffer += piece
        if size < 0:
            out, self._buffer = self._buffer, b""
        else:
            out, self._buffer = self._buffer[:size], self._buffer[size:]
        self.count += len(out)
        if self._tail_size and out:
            self.tail = (self.tail + out)[-self._tail_size :]
        return out

    def readinto(self, buffer: Any) -> int:  # a writable buffer (memoryview), as RangeReader's
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def stored_pieces(names: Iterable[str], on_piece: Callable[[], None] | None = None) -> Iterator[bytes]:
    """The bytes of stored files `names`, one after another, in 1 MiB pieces."""
    for name in names:
        with open_stream(name) as src:
            while piece := src.read(PIECE):
                if on_piece:
                    on_piece()
                yield piece
