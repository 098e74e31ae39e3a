"""What a Graft backup holds, and the pieces `backup` and `restore` share.

A backup is one uncompressed tar file (any `tar` can list and unpack it):

    manifest.json          counts, sizes and SHA-256s of everything below, the migration state, the time
    database.jsonl.gz      every row, as Django's JSON Lines fixture (`dumpdata`), gzip-compressed
    storage/<name>         every stored object, under its storage name

The tar itself is not compressed: stored objects are zips and images already, and an
uncompressed tar can be read member by member without reading what comes before.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, TypedDict

from django.apps import apps
from django.core.files.storage import default_storage
from django.db import connection, models
from django.db.migrations.recorder import MigrationRecorder

FORMAT = "graft-backup"
VERSION = 1
MANIFEST = "manifest.json"
DATABASE = "database.jsonl.gz"
STORAGE = "storage/"
# Made again by `migrate` (and by `flush`), with ids of their own: the dump names them by natural
# key (`--natural-foreign`) wherever a row points at one, so they are left out of it.
NOT_DUMPED = ("contenttypes", "auth.permission")


@dataclass(frozen=True)
class Stored:
    name: str
    size: int


class StoredEntry(TypedDict):
    """A stored object as the manifest lists it (`storage.objects`)."""

    name: str
    size: int
    sha256: str


def stored_objects() -> list[Stored]:
    """Every stored object, sorted by name: a bucket listing on S3, a walk of the folders on local files."""
    bucket = getattr(default_storage, "bucket", None)
    if bucket is not None:
        location = getattr(default_storage, "location", "").strip("/")
        prefix = f"{location}/" if location else ""
        found = [
            Stored(o.key[len(prefix) :], o.size)
            for o in bucket.objects.filter(Prefix=prefix)
            if not o.key.endswith("/")
        ]
    else:
        found = [Stored(name, default_storage.size(name)) for name in _walk("")]
    return sorted(found, key=lambda s: s.name)


def _walk(folder: str) -> Iterator[str]:
    try:
        dirs, files = default_storage.listdir(folder)
    except FileNotFoundError:  # MEDIA_ROOT not made yet: nothing stored
        return
    for name in files:
        yield folder + name
    for sub in dirs:
        yield from _walk(f"{folder}{sub}/")


def delete_stored(objects: list[Stored]) -> None:
    """Delete `objects` from storage (S3: a thousand to a request)."""
    bucket = getattr(default_storage, "bucket", None)
    if bucket is None:
        for obj in objects:
            default_storage.delete(obj.name)
        return
    location = getattr(default_storage, "location", "").strip("/")
    prefix = f"{location}/" if location else ""
    keys = [{"Key": prefix + obj.name} for obj in objects]
    for start in range(0, len(keys), 1000):
        bucket.delete_objects(Delete={"Objects": keys[start : start + 1000], "Quiet": True})


def dumped_models() -> list[type[models.Model]]:
    """The models whose rows the dump holds (what `dumpdata --all` writes, less NOT_DUMPED)."""
    return [
        m
        for m in apps.get_models()
        if m._meta.managed
        and not m._meta.proxy
        and not m._meta.swapped
        and m._meta.app_label not in NOT_DUMPED
        and m._meta.label_lower not in NOT_DUMPED
    ]


def row_counts() -> dict[str, int]:
    """Rows per model ({"serving.trainedmodel": 3, ...}), every model the dump holds."""
    return {m._meta.label_lower: m._base_manager.count() for m in dumped_models()}


def user_rows() -> dict[str, int]:
    """The models that hold rows (anything but what `migrate` makes): a database in use is not empty."""
    return {label: n for label, n in row_counts().items() if n}


def migration_state() -> dict[str, list[str]]:
    """The migrations applied to this database, per app: a backup loads only into the same state."""
    state: dict[str, list[str]] = {}
    for app, name in sorted(MigrationRecorder(connection).applied_migrations()):
        state.setdefault(app, []).append(name)
    return state


class HashingReader(io.RawIOBase):
    """Reads `raw` through, keeping the SHA-256 and the count of what went by (and telling `on_bytes`)."""

    def __init__(self, raw: IO[bytes], on_bytes: Callable[[int], object] | None = None) -> None:
        self._raw = raw
        self._on_bytes = on_bytes
        self._sha = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:  # a writable buffer (memoryview), as storage.RangeReader's
        data = self._raw.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._sha.update(data)
        self.size += n
        if self._on_bytes and n:
            self._on_bytes(n)
        return n

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()


def sha256_of(reader: IO[bytes]) -> tuple[str, int]:
    """SHA-256 and size of what `reader` gives, read in 1 MiB pieces."""
    hashing = HashingReader(reader)
    while hashing.read(1024 * 1024):
        pass
    return hashing.sha256, hashing.size
