"""The per-model prediction log, written off the request path.

A prediction only puts its record on an in-process queue (microseconds). One thread per web
process takes what has gathered, stores the kept images, inserts the rows in one statement, and
trims each model's log to its most recent GRAFT_PREDICTION_LOG_KEEP records (their images too).
Kept images count against the owner's storage quota; at the quota, records are kept without them.
Records still queued when a process is killed are lost: it is a log, not an audit trail.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import PurePosixPath

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import connections, transaction
from django.db.models import QuerySet
from django.utils import timezone

from apps.accounts.quotas import usage
from apps.common.errors import UserError
from apps.common.storage import delete_quietly
from apps.serving.models import PredictionRecord, TrainedModel
from ml.images import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

GATHER_S = 0.5  # how long the writer lets records gather before one insert
MAX_QUEUED = 10_000  # past this, records are dropped rather than held in memory
MAX_QUEUED_IMAGE_BYTES = 256 * 1024**2  # past this, records are queued without their images


@dataclass(frozen=True)
class _Entry:
    model_id: int
    storage_prefix: str
    at: datetime
    latency_ms: float
    label: str
    score: float
    margin: float | None
    image: bytes | None
    suffix: str


_queue: queue.Queue[_Entry] = queue.Queue(MAX_QUEUED)
_thread: threading.Thread | None = None
_lock = threading.Lock()  # guards _thread and _image_bytes
_image_bytes = 0  # of the images queued


def record(
    *,
    model: TrainedModel,
    latency_ms: float,
    tops: list[tuple[str, float, float | None]],
    images: list[tuple[str | None, bytes]],
) -> None:
    """Log one request's predictions (`tops`: each image's top label, its score, and its margin over
    the next label; `images`: each image's file name and bytes), if the model's log is on. Never
    blocks, never raises."""
    global _image_bytes
    if model.prediction_log == TrainedModel.Log.OFF:
        return
    keep = model.prediction_log == TrainedModel.Log.WITH_IMAGES
    now = timezone.now()
    for (label, score, margin), (name, data) in zip(tops, images, strict=True):
        suffix = PurePosixPath(name or "").suffix.lower()
        suffix = suffix if suffix in IMAGE_SUFFIXES else ""  # gives the kept image its content type
        image = data if keep else None
        with _lock:
            if image is not None and _image_bytes + len(image) > MAX_QUEUED_IMAGE_BYTES:
                log.warning("prediction log: storage is behind, an image of model %s not kept", model.pk)
                image = None
            try:
                _queue.put_nowait(
                    _Entry(model.pk, model.storage_prefix, now, latency_ms, label, score, margin, image, suffix)
                )
            except queue.Full:
                log.warning("prediction log: queue full, a record of model %s dropped", model.pk)
                continue
            _image_bytes += len(image or b"")
    _ensure_writer()


def _ensure_writer() -> None:
    global _thread
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="graft-prediction-log", daemon=True)
            _thread.start()


def _run() -> None:
    while True:
        entries = [_queue.get()]
        time.sleep(GATHER_S)
        while True:
            try:
                entries.append(_queue.get_nowait())
            except queue.Empty:
                break
        _dequeued(entries)
        try:
            write(entries)
        except Exception:  # a database or storage blip costs these records, not the thread
            log.exception("prediction log: %s records not written", len(entries))
        finally:
            connections.close_all()  # this thread's own; it may sleep long before the next write


def _dequeued(entries: list[_Entry]) -> None:
    global _image_bytes
    with _lock:
        _image_bytes -= sum(len(e.image or b"") for e in entries)


def write(entries: list[_Entry]) -> None:
    """Store the images, insert the records, trim each model's log.

    Whether an image is kept is decided here, not when it was queued: the model's log may have
    been switched meanwhile, and an owner at the storage quota keeps records without images. The
    mode is read again once the records are in, in case keeping stopped during this write."""
    models = {
        m.pk: m for m in TrainedModel.objects.select_related("owner").filter(pk__in={e.model_id for e in entries})
    }
    room: dict[int, int] = {}  # storage left per owner, measured only when an image may be kept
    rows, saved = [], []
    try:
        for e in entries:
            model = models.get(e.model_id)
            if model is None:  # deleted meanwhile
                continue
            image = ""
            size = len(e.image) if e.image is not None else 0
            keep = e.image is not None and model.prediction_log == TrainedModel.Log.WITH_IMAGES
            if keep and model.owner_id not in room:
                room[model.owner_id] = settings.GRAFT_QUOTA_BYTES - usage(model.owner).bytes_stored
            if keep and e.image is not None and room[model.owner_id] >= size:
                image = default_storage.save(
                    f"{e.storage_prefix}inputs/{uuid.uuid4().hex}{e.suffix}", ContentFile(e.image)
                )
                saved.append(image)
                room[model.owner_id] -= size
            rows.append(
                PredictionRecord(
                    model_id=e.model_id,
                    created_at=e.at,
                    latency_ms=e.latency_ms,
                    label=e.label[:200],
                    score=e.score,
                    margin=e.margin,
                    image=image,
                    image_bytes=size if image else 0,
                )
            )
        PredictionRecord.objects.bulk_create(rows)
    except BaseException:
        for name in saved:  # no record will name them
            delete_quietly(name)
        raise
    if saved:
        _recheck_keeping({r.model_id for r in rows if r.image})
    for model_id in {r.model_id for r in rows}:
        trim(model_id)


def _recheck_keeping(model_ids: set[int]) -> None:
    """Drop the images just kept for models whose owner has switched keeping off since the mode was
    read. The records are committed before this read, and set_mode commits the mode before it
    reads the records: either this read sees the new mode, or set_mode sees these records."""
    stopped = TrainedModel.objects.filter(pk__in=model_ids).exclude(prediction_log=TrainedModel.Log.WITH_IMAGES)
    for model_id in stopped.values_list("pk", flat=True):
        _drop_kept_images(model_id)


def trim(model_id: int, keep: int | None = None) -> None:
    """Forget all but the most recent `keep` records of a model, and their images."""
    keep = settings.GRAFT_PREDICTION_LOG_KEEP if keep is None else keep
    records = PredictionRecord.objects.filter(model_id=model_id)
    if keep:
        cutoff = list(records.values_list("pk", flat=True)[keep : keep + 1])  # newest first
        if not cutoff:
            return
        records = records.filter(pk__lte=cutoff[0])
    forget(records)


def forget(records: QuerySet[PredictionRecord]) -> None:
    """Delete these records and their kept images: the rows first, so that no request is sent to an
    image that is gone."""
    names = list(records.exclude(image="").values_list("image", flat=True))
    records.delete()
    for name in names:
        delete_quietly(name)


def _drop_kept_images(model_id: int) -> None:
    """Delete a model's kept images; its records stay, without them (the rows first, then the files).
    Images labelled into a version still being made stay: that version settles them."""
    kept = list(
        PredictionRecord.objects.filter(model_id=model_id, labelled="").exclude(image="").values_list("pk", "image")
    )
    PredictionRecord.objects.filter(pk__in=[pk for pk, _ in kept]).update(image="", image_bytes=0)
    for _, name in kept:
        delete_quietly(name)


def set_mode(*, model: TrainedModel, mode: str) -> TrainedModel:
    """Turn the log off or on, with or without images. Kept images go when image keeping stops."""
    if mode not in TrainedModel.Log.values:
        raise UserError(f"prediction_log must be one of {', '.join(TrainedModel.Log.values)}, not '{mode[:40]}'.")
    model.prediction_log = mode
    model.save(update_fields=["prediction_log"])
    if mode != TrainedModel.Log.WITH_IMAGES:
        # The mode first, committed, then the images: a write that read the old mode has then
        # either inserted its records before they are looked up here, or sees the new mode when it
        # re-checks (write). Deleting first let such a write keep an image for good.
        model_id = model.pk
        transaction.on_commit(lambda: _drop_kept_images(model_id), robust=True)
    return model
