"""The misclassified gallery: thumbnails of the validation images a model got wrong.

The job page shows up to GALLERY_SIZE of them. They are made by the training worker when the
job ends, from the dataset's archive read in byte ranges (its directory and the members shown,
never the whole object), and stored under the model's prefix: a web host then serves a small
stored file and never opens an archive, and the gallery stays when the dataset is deleted
("Models trained on it stay"). Models trained before this have none; their pages show a
placeholder.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from typing import IO, Any

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from apps.common.storage import open_if_stored, open_seekable
from apps.datasets.models import Dataset
from apps.datasets.services import THUMB_SIDE, ingest_config
from ml.archive import read_member
from ml.errors import MLError
from ml.images import ImageDecodeError, thumbnail_jpeg

log = logging.getLogger(__name__)

GALLERY_SIZE = 60  # the job page shows at most this many misclassified images
RANGE_BUFFER = 256 * 1024  # one ranged GET holds a member's header and the start of its data
# What the page shows for an image with no stored thumbnail (a model trained before the gallery was).
GALLERY_PLACEHOLDER = (
    '<svg xmlns="http://www.w3.org/2000/svg" width="160" height="160" viewBox="0 0 160 160">'
    '<rect width="160" height="160" fill="#ececec"/>'
    '<text x="80" y="85" font-family="sans-serif" font-size="13" fill="#888" text-anchor="middle">no preview</text>'
    "</svg>"
)


def gallery_members(metrics: dict[str, Any]) -> list[str]:
    """The archive members the gallery shows: the most confident mistakes first (ml.evaluate)."""
    wrong = metrics.get("misclassified") or []
    return [w["file"] for w in wrong[:GALLERY_SIZE] if isinstance(w, dict) and isinstance(w.get("file"), str)]


def gallery_thumb_name(prefix: str, member: str) -> str:
    """Where the thumbnail of `member` is stored under a model's `prefix`."""
    return f"{prefix}thumbs/{hashlib.sha256(member.encode()).hexdigest()[:24]}.jpg"


def gallery_store(
    *,
    prefix: str,
    dataset: Dataset | None,
    metrics: dict[str, Any],
    origins: dict[str, tuple[str, str]] | None = None,
) -> int:
    """Store the thumbnails of the misclassified images under the model's `prefix`; returns how many.
    `origins` says where each image the fit named lies ({name: (stored archive, member)}: a dataset
    version's images may sit in several archives); else they are members of the dataset's upload.

    Never raises: a model is worth keeping without its gallery (its page shows placeholders).
    """
    members = gallery_members(metrics)
    if not members or dataset is None or not dataset.archive:
        return 0
    by_archive: dict[str, list[tuple[str, str]]] = {}
    for name in members:
        archive, member = (origins or {}).get(name, (dataset.archive, name))
        by_archive.setdefault(archive, []).append((name, member))
    stored = 0
    for archive, pairs in by_archive.items():
        try:
            stored += _store_thumbnails(prefix, archive, pairs)
        except Exception:  # noqa: BLE001 - the archive gone (dataset deleted), storage down, a damaged zip
            log.exception("gallery thumbnails of %s not made from %s", prefix, archive)
    return stored


def gallery_open(*, prefix: str, member: str) -> IO[bytes] | None:
    """A stream of the stored thumbnail of `member` under `prefix`, or None when there is none."""
    return open_if_stored(gallery_thumb_name(prefix, member))


def _store_thumbnails(prefix: str, archive: str, members: list[tuple[str, str]]) -> int:
    """Thumbnails of `members` ((name the gallery uses, member in `archive`)) of one stored zip."""
    max_bytes = ingest_config().limits.max_member_bytes
    local = threading.local()

    with ExitStack() as opened, ThreadPoolExecutor(max_workers=4) as pool:  # S3: round trips, not bandwidth

        def make(pair: tuple[str, str]) -> bool:
            name, member = pair
            if not hasattr(local, "zf"):  # a zip file object per thread: each seeks on its own
                local.zf = opened.enter_context(_open_archive(archive))
            try:
                data = read_member(local.zf, member, max_bytes)
                jpeg = thumbnail_jpeg(data, THUMB_SIDE, max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS)
            except (KeyError, MLError, ImageDecodeError) as exc:  # not in the archive, damaged, undecodable
                log.warning("gallery: no thumbnail of %r (%s)", member, exc)
                return False
            default_storage.save(gallery_thumb_name(prefix, name), ContentFile(jpeg))
            return True

        return sum(pool.map(make, members))


@contextmanager
def _open_archive(name: str) -> Iterator[zipfile.ZipFile]:
    """The stored zip `name`, read where it lies (on S3, in byte ranges: its directory and the members read)."""
    with open_seekable(name, buffer_size=RANGE_BUFFER) as fh, zipfile.ZipFile(fh) as zf:
        yield zf
