"""Getting stored files onto the worker's local disk, whatever the storage backend."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import NamedTemporaryFile

from django.conf import settings
from django.core.files.storage import default_storage


@contextmanager
def local_copy(name: str) -> Iterator[Path]:
    """A local path for stored file `name`: the file itself on local storage, else a temp copy."""
    try:
        path = Path(default_storage.path(name))
    except NotImplementedError:  # remote storage (S3 and friends) has no local path
        path = None
    if path is not None:
        yield path
        return
    settings.GRAFT_WORK_DIR.mkdir(parents=True, exist_ok=True)
    with NamedTemporaryFile(dir=settings.GRAFT_WORK_DIR, suffix=Path(name).suffix) as tmp:
        with default_storage.open(name, "rb") as src:
            shutil.copyfileobj(src, tmp, length=1024 * 1024)
        tmp.flush()
        yield Path(tmp.name)


def delete_quietly(name: str | None) -> None:
    if name:
        default_storage.delete(name)
