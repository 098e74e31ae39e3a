"""Loaded models stay in the process: a bundle is fetched and loaded once, then reused.

How many stay loaded is set by memory, not by count: each model is charged what loading it added
to the process's resident memory (its weights, the runtime's buffers and a warm-up pass), and the
least recently used are dropped while the total is over GRAFT_SERVE_MODEL_MEMORY. The newest one
always stays.

Loads are per model: each (model, bundle) key has its own lock, so one model is fetched and
unpacked once however many requests ask for it, while different models fetch, verify and unpack
side by side (the slow, unbounded part: object storage and bundle size). Only building the
predictor, the part whose growth is measured, takes turns across models: the process's resident
memory is one number, so two builds at once would each be charged the other's weights; and the
runtime a predictor picks comes from timing both runtimes, which another build's passes would
skew. A build is CPU-bound, so on a web host's few cores two at once would not end much sooner.
An unpack running beside a build can still add its passing buffer (one file of its bundle) to
that build's charge: the budget bounds the process, it is not an exact account.

A bundle is loaded only if its SHA-256 is the one the database recorded when it was stored: a
file changed in the bucket (or on the way) is refused with a logged error, never unpacked.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings

from apps.common.errors import UserError
from apps.common.storage import PIECE, local_copy
from apps.serving.models import TrainedModel
from ml.bundle_format import unpack_bundle
from ml.predict import Predictor

log = logging.getLogger(__name__)


class BundleIntegrityError(UserError):
    """The stored bundle is not the file that was recorded; the caller gets a 503, not the model."""

    status_code = 503


@dataclass(frozen=True)
class Loaded:
    predictor: Predictor
    bytes: int  # what loading it added to the process's resident memory


Key = tuple[int, str]  # (model id, bundle SHA-256)


@dataclass
class _Loading:
    """One model's load: its requests take turns on `lock`; the last to leave forgets it."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    requests: int = 0


_lock = threading.Lock()  # guards _loaded and _loading; held for lookups only, never while a model loads
_build = threading.Lock()  # one predictor built at a time: what it adds is measured as the process's growth
_loaded: OrderedDict[Key, Loaded] = OrderedDict()
_loading: dict[Key, _Loading] = {}  # the models being loaded, each with the requests waiting for it


def get_predictor(model: TrainedModel) -> Predictor:
    """The model's loaded predictor, loading it on first use. Requests for models already loaded
    are never held up by another model's load (seconds: fetch, unpack, time both runtimes), and a
    model's first load waits for no other model's fetch or unpack."""
    key = (model.pk, model.bundle_sha256)
    if (predictor := _cached(key)) is not None:
        return predictor
    with _lock:
        loading = _loading.setdefault(key, _Loading())
        loading.requests += 1
    try:
        with loading.lock:
            if (predictor := _cached(key)) is not None:  # loaded while this request waited
                return predictor
            predictor, added = _load(model)
            _keep(key, Loaded(predictor, added))
            return predictor
    finally:
        with _lock:
            loading.requests -= 1
            if not loading.requests:
                del _loading[key]


def _load(model: TrainedModel) -> tuple[Predictor, int]:
    """Fetch, verify, unpack and build the model's predictor; return it and the memory it added."""
    folder = settings.GRAFT_WORK_DIR / "serving" / f"{model.pk}-{model.bundle_sha256[:16]}"
    with local_copy(model.bundle) as archive:
        verify_bundle(model, archive)
        unpack_bundle(archive, folder)
    with _build:
        before = resident_bytes()
        predictor = Predictor(
            folder,
            runtime=settings.GRAFT_SERVE_RUNTIME,
            max_batch=settings.GRAFT_SERVE_MAX_BATCH,
            max_wait_s=settings.GRAFT_SERVE_BATCH_WAIT_MS / 1000,
            spin=settings.GRAFT_SERVE_SPIN,
            precision=settings.GRAFT_SERVE_PRECISION,
        )
        return predictor, max(0, resident_bytes() - before)


def _keep(key: Key, entry: Loaded) -> None:
    """Add a loaded model, drop the bundles it replaced (the int8 step stores a model's bundle again),
    then the least recently used while over the memory budget."""
    with _lock:
        for old in [k for k in _loaded if k[0] == key[0] and k != key]:
            _loaded.pop(old).predictor.close()
        _loaded[key] = entry
        while len(_loaded) > 1 and loaded_bytes() > settings.GRAFT_SERVE_MODEL_MEMORY:
            _, dropped = _loaded.popitem(last=False)
            dropped.predictor.close()


def verify_bundle(model: TrainedModel, archive: Path) -> None:
    """Raise BundleIntegrityError unless `archive` has the SHA-256 recorded for the model."""
    digest = hashlib.sha256()
    with archive.open("rb") as fh:
        while piece := fh.read(PIECE):
            digest.update(piece)
    if digest.hexdigest() != model.bundle_sha256:
        log.error(
            "model %s: bundle %s has SHA-256 %s, but %s was recorded when it was stored; not loading it",
            model.pk,
            model.bundle,
            digest.hexdigest(),
            model.bundle_sha256,
        )
        raise BundleIntegrityError(
            "This model's stored file failed its integrity check, so it cannot serve predictions; "
            "the operators have the details."
        )


def _cached(key: Key) -> Predictor | None:
    with _lock:
        if key not in _loaded:
            return None
        _loaded.move_to_end(key)
        return _loaded[key].predictor


def loaded_bytes() -> int:
    return sum(entry.bytes for entry in _loaded.values())


def resident_bytes() -> int:
    """This process's resident memory (Linux; 0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")
