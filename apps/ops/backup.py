"""Write a backup: the database as one consistent snapshot, then every stored object, streamed.

The database goes first: everything it names was stored before its row was written, so it is in
storage when the objects are copied a moment later. What is deleted in between (a finished job's
checkpoints, a model deleted meanwhile) is reported as vanished, not failed.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import django
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.db import connection, transaction
from django.utils import timezone
from tqdm import tqdm

import ml
from apps.ops.archive import (
    DATABASE,
    FORMAT,
    MANIFEST,
    NOT_DUMPED,
    STORAGE,
    VERSION,
    HashingReader,
    Stored,
    StoredEntry,
    migration_state,
    row_counts,
    stored_objects,
)


class BackupError(Exception):
    """A backup or a restore that cannot go on; the message says why and what to do."""


def backup_create(*, out: Path, progress: bool = True) -> dict[str, Any]:
    """Write the backup file `out` (a tar, see apps.ops.archive); returns the summary.

    `out` appears only when it is complete (written as `out.partial`, then renamed).
    """
    if out.exists():
        raise BackupError(f"{out} already exists; name a new file (a backup never overwrites one).")
    if not out.parent.is_dir():
        raise BackupError(f"{out.parent} is not a folder; make it first.")
    started = time.monotonic()
    created_at = timezone.now()
    partial = out.with_name(out.name + ".partial")
    try:
        manifest = _write(partial, created_at, progress)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.rename(out)
    database, storage = manifest["database"], manifest["storage"]
    return {
        "backup": str(out),
        "bytes": out.stat().st_size,
        "created_at": manifest["created_at"],
        "database": {"vendor": database["vendor"], "rows": sum(database["rows"].values()), "bytes": database["bytes"]},
        "storage": {"objects": storage["count"], "bytes": storage["bytes"], "vanished": storage["vanished"]},
        "seconds": round(time.monotonic() - started, 1),
    }


def _write(partial: Path, created_at: datetime, progress: bool) -> dict[str, Any]:
    """Write the backup into `partial`; returns its manifest."""
    with tempfile.TemporaryDirectory(dir=partial.parent, prefix=".graft-backup-") as scratch:
        dump = Path(scratch) / DATABASE
        database = _dump_database(dump)
        objects = stored_objects()
        total = dump.stat().st_size + sum(o.size for o in objects)
        # Only its owner reads it: it holds every user's data, password hashes included.
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with (
            tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, mininterval=1) as bar,
            os.fdopen(fd, "wb") as fh,
            tarfile.open(fileobj=fh, mode="w", format=tarfile.PAX_FORMAT) as tar,
        ):
            with dump.open("rb") as src:
                database.update(_add(tar, DATABASE, src, dump.stat().st_size, bar.update))
            copied, vanished = _add_objects(tar, objects, bar.update)
            manifest: dict[str, Any] = {
                "format": FORMAT,
                "version": VERSION,
                "created_at": created_at.isoformat(),
                "versions": {"graft_ml": ml.__version__, "django": django.get_version()},
                "database": database,
                "storage": {
                    "backend": f"{type(default_storage).__module__}.{type(default_storage).__name__}",
                    "count": len(copied),
                    "bytes": sum(o["size"] for o in copied),
                    "vanished": vanished,
                    "objects": copied,
                },
            }
            data = json.dumps(manifest, indent=1).encode()
            _add(tar, MANIFEST, io.BytesIO(data), len(data))
    return manifest


def _dump_database(path: Path) -> dict[str, Any]:
    """Every row into `path` (`dumpdata`, JSON Lines, gzip), with the row counts and migration state
    read in the same transaction. On PostgreSQL that transaction is a REPEATABLE READ snapshot, so
    the dump is consistent while the app keeps running; on SQLite writers wait until it ends."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")  # a connection health check must not be the snapshot's first query
    with transaction.atomic():
        if connection.vendor == "postgresql":
            with connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        rows = row_counts()
        migrations = migration_state()
        call_command(
            "dumpdata",
            format="jsonl",  # one object a line: loaddata reads it line by line, not whole
            natural_foreign=True,
            use_base_manager=True,
            exclude=list(NOT_DUMPED),
            output=str(path),  # .gz: compressed as it is written
            verbosity=0,
            stdout=io.StringIO(),
        )
    return {"vendor": connection.vendor, "file": DATABASE, "rows": rows, "migrations": migrations}


def _add(
    tar: tarfile.TarFile, name: str, reader: IO[bytes], size: int, on_bytes: Callable[[int], object] | None = None
) -> dict[str, Any]:
    """Stream `size` bytes of `reader` into `tar` as `name`; returns {size, sha256}."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = int(time.time())
    info.mode = 0o600
    hashing = HashingReader(reader, on_bytes)
    tar.addfile(info, hashing)
    return {"bytes": size, "sha256": hashing.sha256}


def _add_objects(
    tar: tarfile.TarFile, objects: list[Stored], on_bytes: Callable[[int], object]
) -> tuple[list[StoredEntry], list[str]]:
    """Copy each stored object into `tar`; returns the manifest entries and the names that vanished."""
    copied: list[StoredEntry] = []
    vanished: list[str] = []
    for obj in objects:
        try:
            reader, size = _open_sized(obj.name)
        except FileNotFoundError:
            vanished.append(obj.name)
            continue
        with reader:
            added = _add(tar, STORAGE + obj.name, reader, size, on_bytes)
        copied.append({"name": obj.name, "size": size, "sha256": added["sha256"]})
    return copied, vanished


def _open_sized(name: str) -> tuple[IO[bytes], int]:
    """A streaming reader of stored `name` and its size as of this open (it may have changed since
    the listing); FileNotFoundError when it is gone."""
    bucket = getattr(default_storage, "bucket", None)
    if bucket is None:
        fh = default_storage.open(name, "rb")
        return fh, os.fstat(fh.fileno()).st_size
    from botocore.exceptions import ClientError

    key = default_storage._normalize_name(name)  # type: ignore[attr-defined]  # S3Storage's
    try:
        response = bucket.Object(key).get()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            raise FileNotFoundError(name) from None
        raise
    return response["Body"], int(response["ContentLength"])
