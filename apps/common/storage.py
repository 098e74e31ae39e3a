"""Stored files, whatever the backend (local files, or S3-compatible object storage).

Every host reads and writes through these, streamed in pieces: a web host or a worker
never holds a dataset or a bundle whole in memory, and never needs a shared disk.
"""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import IO, cast

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage

log = logging.getLogger(__name__)

PIECE = 1024 * 1024


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
    bucket = getattr(default_storage, "bucket", None)
    if bucket is None:
        return default_storage.open(name, "rb")
    key = default_storage._normalize_name(name)  # type: ignore[attr-defined]  # S3Storage's: it has the bucket
    return bucket.Object(key).get()["Body"]


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
        default_storage.delete(name)
    except Exception:  # noqa: BLE001
        log.exception("could not delete stored file %s", name)


def delete_prefix(prefix: str) -> None:
    """Delete every stored file under `prefix` (a dataset's, a model's, a job's folder)."""
    assert prefix.endswith("/") and len(prefix) > 1, prefix
    try:
        bucket = getattr(default_storage, "bucket", None)
        if bucket is not None:
            key_prefix = default_storage._normalize_name(prefix)  # type: ignore[attr-defined]  # S3Storage's
            bucket.objects.filter(Prefix=key_prefix).delete()
        else:
            shutil.rmtree(default_storage.path(prefix), ignore_errors=True)
    except Exception:  # noqa: BLE001
        log.exception("could not delete stored files under %s", prefix)


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

    def readinto(self, buffer) -> int:
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
