"""Batch prediction: top-k labels for every image of a zip (or of a dataset), by a worker.

The input is stored first and the row follows (a failure leaves neither); the row reserves the
results' size against the owner's quota before a byte of them is written. The worker claims the
batch as every background task is claimed (apps.common.work: attempts, heartbeat, stale requeue,
fair share with training jobs on the `gpu` queue), predicts with the same `Predictor` and the same
decoding as the prediction endpoint, and writes CSV and JSON under its attempt's own names: a
replaced worker's late writes and cleanup touch nothing of the attempt that won.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import threading
import time
import uuid
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files import File
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from apps.accounts.quotas import check_new_batch, owner_locked
from apps.common import faults, work
from apps.common.errors import UserError
from apps.common.storage import delete_prefix, delete_quietly, local_copy, open_stream
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.services import ingest_config
from apps.datasets.versions import version_archive, version_head
from apps.serving.cache import get_predictor
from apps.serving.models import BatchPrediction, TrainedModel
from ml.archive import read_member, scan_images
from ml.errors import Cancelled, DatasetError
from ml.images import ImageDecodeError, thumbnail_jpeg
from ml.predict import FilePrediction, predict_archive

log = logging.getLogger(__name__)

BATCH_THUMBNAILS = 200  # the least confident images of a batch get a thumbnail on its page
THUMB_SIDE = 160
THUMB_BYTES = 16 * 1024  # what a 160-px JPEG thumbnail takes at most, for the reservation

MAX_K = 20
PROGRESS_EVERY_S = 1.0  # at most one progress write a second
# Characters that make a spreadsheet read a CSV cell as a formula (OWASP, "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _enqueue(batch_id: int, countdown: float = 0) -> None:
    from apps.serving.tasks import predict_batch

    predict_batch.apply_async((batch_id,), countdown=countdown or None)


def _drop_input(batch: BatchPrediction) -> None:
    if batch.dataset_id is None and batch.archive:
        delete_quietly(batch.archive)
    BatchPrediction.objects.filter(pk=batch.pk).update(archive="", archive_bytes=0, results_bytes=0)


BATCH = work.register(
    work.Kind(
        name="batch prediction",
        model=BatchPrediction,
        queued=BatchPrediction.Status.QUEUED,
        running=BatchPrediction.Status.RUNNING,
        failed=BatchPrediction.Status.FAILED,
        lost="The worker running this batch stopped {attempts} times without finishing; it was not handed on again.",
        enqueue=_enqueue,
        on_lost=_drop_input,
    )
)


def batch_create(
    *,
    owner: User,
    model: TrainedModel,
    file: UploadedFile[bytes] | None = None,
    dataset: Dataset | None = None,
    k: int = 5,
) -> BatchPrediction:
    """Queue a batch over an uploaded zip of images, or over a ready dataset's images."""
    if (file is None) == (dataset is None):
        raise UserError("Send either a zip of images as the multipart field 'file', or a 'dataset' id.")
    if not 1 <= k <= MAX_K:
        raise UserError(f"'k' must be between 1 and {MAX_K}.")
    batch = BatchPrediction(owner=owner, model=model, k=k)
    if dataset is not None:
        if dataset.status != Dataset.Status.READY:
            raise UserError(f"Dataset '{dataset.name}' is not ready; predict on a ready dataset.", status_code=409)
        # What the dataset is now, its images added, removed and relabelled (a dataset from before
        # versions has none: its upload is all it is).
        version = version_head(dataset)
        batch.dataset, batch.version, batch.name, batch.archive = dataset, version, dataset.name, dataset.archive
        images = version.num_images if version is not None else dataset.num_images
        batch.results_bytes = results_estimate(images, k, model.classes)
        return _create(batch)
    assert file is not None
    size = file.size or 0
    if size == 0:
        raise UserError("The uploaded file is empty.")
    if size > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError("The upload is over the size limit.", status_code=413)
    if not zipfile.is_zipfile(file):
        raise UserError(f"'{file.name}' is not a zip archive. Upload a .zip of images.")
    try:  # names and sizes from the zip's directory: an unusable archive is refused now, not by the worker
        names = scan_images(file, ingest_config().limits)
    except DatasetError as exc:
        raise UserError(exc.message) from None
    batch.archive_bytes = size
    batch.results_bytes = results_estimate(len(names), k, model.classes, names)
    check_new_batch(owner, size + batch.results_bytes)  # early, before storing: the same check follows, locked
    file.seek(0)
    stored = default_storage.save(f"{batch.storage_prefix}input.zip", file)  # first, outside any transaction
    batch.name, batch.archive = (file.name or "images.zip")[:200], stored
    try:
        return _create(batch)
    except BaseException:
        delete_quietly(stored)
        raise


def results_estimate(images: int, k: int, classes: list[str], names: list[str] | None = None) -> int:
    """An upper bound on the bytes of a batch's CSV and JSON, reserved before they are written:
    per image, its name and k labels with scores in each file, plus room for an error."""
    name_bytes = sum(len(n.encode()) for n in names) if names is not None else 120 * images
    label = max((len(c.encode()) for c in classes), default=16)
    per_row = 2 * (k * (2 * label + 40) + 200)  # JSON escapes, quotes and keys; the error sentence
    thumbs = min(images, BATCH_THUMBNAILS) * THUMB_BYTES  # the least confident images' thumbnails
    return 2 * name_bytes + images * per_row + thumbs + 1024


def _create(batch: BatchPrediction) -> BatchPrediction:
    """Check the quotas and create the row in one transaction, under the owner's lock: parallel
    requests see each other's reservations (input and estimated results), never the same headroom."""
    with transaction.atomic():
        owner_locked(batch.owner)
        if batch.dataset_id and not Dataset.objects.filter(pk=batch.dataset_id, status=Dataset.Status.READY).exists():
            raise UserError(f"Dataset '{batch.name}' was deleted meanwhile.", status_code=409)
        if batch.version_id and not DatasetVersion.objects.filter(pk=batch.version_id).exists():
            raise UserError(f"That version of dataset '{batch.name}' was deleted meanwhile.", status_code=409)
        if not TrainedModel.objects.filter(pk=batch.model_id).exists():
            raise UserError("This model was deleted meanwhile.", status_code=409)
        check_new_batch(batch.owner, batch.archive_bytes + batch.results_bytes)
        batch.save()
        transaction.on_commit(lambda: _enqueue(batch.pk), robust=True)  # lost: beat sends it again
    return batch


@contextmanager
def _batch_input(batch: BatchPrediction) -> Iterator[tuple[Path, set[str] | None]]:
    """A local zip of the batch's images, and which of its members they are (None: all): the
    uploaded zip; or the dataset version's images (the upload itself, or gathered from the zips its
    images came from), of which the upload may hold some the version removed."""
    if batch.dataset_id is None or batch.version_id is None:  # an uploaded zip (or a batch from before versions)
        with local_copy(batch.archive) as path:
            yield path, None
        return
    version = DatasetVersion.objects.select_related("dataset").filter(pk=batch.version_id).first()
    if version is None:
        raise DatasetError("The dataset version this batch was to predict was deleted.")
    with version_archive(version) as (path, index):
        yield path, {s.member for s in index.samples}


def batch_run(*, batch: BatchPrediction) -> None:
    """Predict every image of the claimed batch and store the results. Never raises for batch-level failures."""
    mine = work.attempt_rows(BATCH, batch)
    stored: list[str] = []
    try:
        predictor = get_predictor(batch.model)
        with (
            work.Heartbeat(mine, f"batch-{batch.pk}") as beat,
            _batch_input(batch) as (path, members),
            TemporaryDirectory(dir=_scratch()) as tmp,
        ):
            faults.point("batch.claimed")
            rows = predict_archive(
                predictor,
                path,
                k=batch.k,
                limits=ingest_config().limits,
                max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS,
                progress=_Progress(mine, beat.lost),
                members=members,
            )
            csv_path, json_path, failed = _write_results(rows, Path(tmp), batch.k)
            for path_ in (csv_path, json_path):
                stored.append(_store(batch, path_))
            thumbs, thumb_bytes = _store_thumbnails(batch, path, json_path)
            size = csv_path.stat().st_size + json_path.stat().st_size + thumb_bytes
            faults.point("batch.stored")
        if mine.update(
            status=BatchPrediction.Status.SUCCEEDED,
            finished_at=timezone.now(),
            results_csv=stored[0],
            results_json=stored[1],
            results_bytes=size,
            failed=failed,
            thumbnails=thumbs,
        ):
            stored = []  # the row owns them now
    except Cancelled:
        log.info("batch %s: deleted, or taken over by another worker", batch.pk)
    except DatasetError as exc:
        _fail(mine, exc.message)
    except work.TRANSIENT:
        log.exception("batch %s lost the database or storage; handing it back", batch.pk)
        work.hand_back(BATCH, mine)
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.exception("batch %s failed (incident %s)", batch.pk, incident)
        _fail(mine, f"The batch failed unexpectedly (incident {incident}); the operators have the details.")
    finally:
        for name in stored:  # written by an attempt that did not end the batch: nobody's
            delete_quietly(name)
        # The uploaded input is done with once this attempt ended the batch (a dataset keeps its own);
        # an attempt that was replaced leaves it to the one that replaced it.
        ended = BatchPrediction.objects.filter(pk=batch.pk, attempts=batch.attempts).exclude(
            status__in=[BatchPrediction.Status.RUNNING, BatchPrediction.Status.QUEUED]
        )
        try:
            if batch.dataset_id is None and batch.archive and ended.update(archive="", archive_bytes=0):
                delete_quietly(batch.archive)
        except work.TRANSIENT:  # the input stays; the sweeper takes it once the row lets it go
            log.exception("batch %s: could not release its input", batch.pk)


def batch_thumb_name(batch: BatchPrediction, file: str) -> str:
    digest = hashlib.sha256(file.encode()).hexdigest()[:24]
    return f"{batch.storage_prefix}attempt-{batch.attempts}/thumbs/{digest}.jpg"


def _store_thumbnails(batch: BatchPrediction, archive: Path, results: Path) -> tuple[list[str], int]:
    """Thumbnails of the least confident images (where a person looks first), made while the input
    is at hand: it is deleted once the batch ends. Returns the files that got one, and their bytes."""
    with results.open(encoding="utf-8") as fh:
        rows = [r for r in json.load(fh) if not r.get("error") and r["predictions"]]
    rows.sort(key=lambda r: r["predictions"][0]["score"])
    picked = [r["file"] for r in rows[:BATCH_THUMBNAILS]]
    made: list[str] = []
    total = 0
    with zipfile.ZipFile(archive) as zf:
        for file in picked:
            try:
                data = read_member(zf, file, ingest_config().limits.max_member_bytes)
                jpeg = thumbnail_jpeg(data, THUMB_SIDE, max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS)
            except (KeyError, DatasetError, ImageDecodeError):
                continue
            default_storage.save(batch_thumb_name(batch, file), ContentFile(jpeg))
            made.append(file)
            total += len(jpeg)
    return made, total


def batch_items(batch: BatchPrediction, *, label: str = "", page: int = 1, page_size: int = 60) -> dict[str, Any]:
    """The batch's predictions a page at a time, least confident first (unreadable files last),
    filtered by top label; with the label counts and, where stored, a thumbnail."""
    rows = _read_results(batch.results_json) if batch.results_json else []
    counts: dict[str, int] = {}
    for r in rows:
        if r["predictions"]:
            top = r["predictions"][0]["label"]
            counts[top] = counts.get(top, 0) + 1
    if label:
        rows = [r for r in rows if r["predictions"] and r["predictions"][0]["label"] == label]
    rows = sorted(rows, key=lambda r: (bool(r.get("error")), r["predictions"][0]["score"] if r["predictions"] else 1))
    shown = set(batch.thumbnails)
    start = (page - 1) * page_size
    results = [
        {
            "file": r["file"],
            "label": r["predictions"][0]["label"] if r["predictions"] else None,
            "score": r["predictions"][0]["score"] if r["predictions"] else None,
            "predictions": r["predictions"],
            "error": r.get("error", ""),
            "has_thumbnail": r["file"] in shown,
        }
        for r in rows[start : start + page_size]
    ]
    return {
        "count": len(rows),
        "page": page,
        "pages": max(1, -(-len(rows) // page_size)),
        "labels": dict(sorted(counts.items(), key=lambda kv: -kv[1])),
        "results": results,
    }


@functools.lru_cache(maxsize=8)
def _read_results(name: str) -> list[dict[str, Any]]:
    """A finished batch's predictions.json (immutable once the batch ended)."""
    with open_stream(name) as fh:
        rows: list[dict[str, Any]] = json.load(fh)  # one {file, predictions, error?} per image (`_write_results`)
        return rows


def _store(batch: BatchPrediction, path: Path) -> str:
    """Stored under this attempt's own name: two attempts never write (or delete) the same file."""
    with path.open("rb") as fh:
        return default_storage.save(f"{batch.storage_prefix}attempt-{batch.attempts}/{path.name}", File(fh))


def _scratch() -> Path:
    settings.GRAFT_WORK_DIR.mkdir(parents=True, exist_ok=True)
    return settings.GRAFT_WORK_DIR


def _fail(mine: QuerySet[BatchPrediction], message: str) -> None:
    mine.update(status=BatchPrediction.Status.FAILED, finished_at=timezone.now(), error=message, results_bytes=0)


class _Progress:
    """Writes images done (and found) to the row, at most once a second and at the end; stops the
    batch once the row is no longer this attempt's (deleted, or taken over)."""

    def __init__(self, rows: QuerySet[BatchPrediction], lost: threading.Event) -> None:
        self.rows, self.lost, self.last = rows, lost, 0.0

    def __call__(self, done: int, total: int) -> None:
        if self.lost.is_set():
            raise Cancelled()
        now = time.monotonic()
        if done == total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            if not self.rows.update(done=done, total=total):
                raise Cancelled()
            faults.point("batch.progress")


def _write_results(rows: Iterator[FilePrediction], folder: Path, k: int) -> tuple[Path, Path, int]:
    """predictions.csv (file, label_1, score_1, ..., error) and predictions.json, streamed row by row."""
    csv_path, json_path = folder / "predictions.csv", folder / "predictions.json"
    failed = 0
    with csv_path.open("w", newline="", encoding="utf-8") as c, json_path.open("w", encoding="utf-8") as j:
        out = csv.writer(c)
        out.writerow(["file", *[f"{f}_{i}" for i in range(1, k + 1) for f in ("label", "score")], "error"])
        j.write("[")
        for n, row in enumerate(rows):
            failed += bool(row.error)
            cells = [x for p in row.predictions for x in (p.label, f"{p.score:.6f}")]
            out.writerow([_cell(row.file), *map(_cell, cells), *[""] * (2 * k - len(cells)), _cell(row.error)])
            record = {"file": row.file, "predictions": [{"label": p.label, "score": p.score} for p in row.predictions]}
            if row.error:
                record["error"] = row.error
            j.write(("," if n else "") + "\n" + json.dumps(record, ensure_ascii=False))
        j.write("\n]\n")
    return csv_path, json_path, failed


def _cell(text: str) -> str:
    """A CSV cell a spreadsheet shows as text: one that would start a formula gets a leading quote."""
    return "'" + text if text.startswith(FORMULA_START) else text


def batch_delete(*, batch: BatchPrediction) -> None:
    """Delete a batch in any state: a running one stops at its next progress write (its row is
    gone), and what its worker writes after this is removed by that worker, or by the sweeper."""
    batch.delete()
    delete_prefix(batch.storage_prefix)  # its input (a dataset keeps its own) and its results
