"""A worker host's cache of the zips training reads, kept by content under GRAFT_WORK_DIR/archives.

A retrain of a dataset version on the same host then neither downloads its archive again (S3) nor
gathers it again from several. An entry is named by a key derived from what determines its bytes,
so it never goes stale: it is only evicted, least recently used first, once the folder holds more
than GRAFT_ARCHIVE_CACHE_BYTES (0: no cache, a scratch file made for each use, as before).

The worker processes of a host share the folder. An entry is built into a temporary file and
renamed into place, so a racing build can only replace a whole entry with another whole one. A
reader gets a hard link of its own to the entry, not the entry: ml opens the archive by path again
and again (a reader per thread and per loader process), so another process's eviction must not take
the path away mid-fit. A linked entry frees nothing while read, so eviction passes over it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings

from apps.common.storage import PIECE, local_path, open_stream

PART_GRACE_S = 24 * 3600  # a build's temporary file this old was left by a killed process
_KEY = re.compile(r"[0-9A-Za-z_-]{1,128}")


def content_key(*parts: object) -> str:
    """A key (a file name) for an archive whose bytes `parts` determine (JSON-able values)."""
    return hashlib.sha256(json.dumps(parts, separators=(",", ":")).encode()).hexdigest()


@contextmanager
def cached_archive(key: str, make: Callable[[Path], None]) -> Iterator[Path]:
    """A local zip of what `key` names: this host's cached entry if it has one, else one `make(path)`
    writes (and the cache keeps). The path yielded is the caller's own, and gone afterwards."""
    if not _KEY.fullmatch(key):
        raise ValueError(f"an archive cache key is 1-128 letters, digits, '-' or '_', not {key!r}")
    work_dir = Path(settings.GRAFT_WORK_DIR)
    work_dir.mkdir(parents=True, exist_ok=True)
    # Named as apps.ops.sweep expects a gathered version: it removes those a killed worker left.
    mine = work_dir / f"version-{uuid.uuid4().hex[:12]}.zip"
    try:
        if settings.GRAFT_ARCHIVE_CACHE_BYTES > 0:
            _take(key, make, mine)
        else:
            make(mine)
        yield mine
    finally:
        mine.unlink(missing_ok=True)


@contextmanager
def stored_archive(name: str) -> Iterator[Path]:
    """A local path of stored zip `name`: the file itself on local storage, else this host's cached
    download. A stored archive is never rewritten (each has a name of its own, under its dataset's
    unique prefix), so its name is its key."""
    path = local_path(name)
    if path is not None:
        yield path
        return

    def download(to: Path) -> None:
        with open_stream(name) as src, to.open("wb") as dst:
            shutil.copyfileobj(src, dst, PIECE)

    with cached_archive(content_key("stored", name), download) as path:
        yield path


def _take(key: str, make: Callable[[Path], None], mine: Path) -> None:
    """Link `mine` to the entry `key`, built first if this host has none (or it was just evicted)."""
    folder = Path(settings.GRAFT_WORK_DIR) / "archives"
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{key}.zip"
    try:
        _link(entry, mine)
    except FileNotFoundError:
        pass
    else:
        with contextlib.suppress(FileNotFoundError):
            os.utime(entry)  # used now: the last to be evicted
        return
    part = folder / f".{key}.{uuid.uuid4().hex[:12]}.part"
    try:
        make(part)
        _link(part, mine)
        os.replace(part, entry)
    finally:
        part.unlink(missing_ok=True)
    evict(folder, settings.GRAFT_ARCHIVE_CACHE_BYTES)


def _link(entry: Path, mine: Path) -> None:
    try:
        os.link(entry, mine)
    except FileNotFoundError:
        raise
    except OSError:  # a file system without hard links: a copy is still no download
        shutil.copyfile(entry, mine)


def evict(folder: Path, cap: int) -> None:
    """Remove the least recently used entries until `folder` holds at most `cap` bytes (those being
    read stay: removing them would free nothing yet), and the temporary files of killed builds."""
    entries = []
    for path in folder.glob("*.zip"):
        with contextlib.suppress(FileNotFoundError):  # another process evicted it just now
            st = path.stat()
            entries.append((st.st_mtime, path, st.st_size, st.st_nlink))
    total = sum(size for _, _, size, _ in entries)
    for _, path, size, links in sorted(entries):
        if total <= cap:
            break
        if links == 1:
            path.unlink(missing_ok=True)
            total -= size
    for part in folder.glob(".*.part"):
        with contextlib.suppress(FileNotFoundError):
            if time.time() - part.stat().st_mtime > PART_GRACE_S:
                part.unlink(missing_ok=True)
