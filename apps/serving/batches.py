"""Batch prediction: top-k labels for every image of a zip (or of a dataset), by a worker.

The input is stored first and the row follows (a failure leaves neither); the worker claims the
batch with a conditional UPDATE, predicts with the same `Predictor` and the same decoding as the
prediction endpoint, writes CSV and JSON to storage, and forgets the uploaded input.
"""

from __future__ import annotations

import csv
import json
import logging
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from tempfile import TemporaryDirectory

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files import File
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from apps.accounts.quotas import check_new_batch
from apps.common.errors import UserError
from apps.common.storage import delete_prefix, delete_quietly, local_copy
from apps.datasets.models import Dataset
from apps.datasets.services import ingest_config
from apps.serving.cache import get_predictor
from apps.serving.models import BatchPrediction, TrainedModel
from ml.archive import scan_images
from ml.errors import DatasetError
from ml.predict import FilePrediction, predict_archive

log = logging.getLogger(__name__)

MAX_K = 20
MAX_ATTEMPTS = 3
PROGRESS_EVERY_S = 1.0  # at most one progress write a second


def batch_create(
    *, owner: User, model: TrainedModel, file: UploadedFile | None = None, dataset: Dataset | None = None, k: int = 5
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
        check_new_batch(owner, 0)
        batch.dataset, batch.name, batch.archive = dataset, dataset.name, dataset.archive
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
        scan_images(file, ingest_config().limits)
    except DatasetError as exc:
        raise UserError(exc.message) from None
    check_new_batch(owner, size)
    file.seek(0)
    stored = default_storage.save(f"{batch.storage_prefix}input.zip", file)  # first, outside any transaction
    batch.name, batch.archive, batch.archive_bytes = (file.name or "images.zip")[:200], stored, size
    try:
        return _create(batch)
    except BaseException:
        delete_quietly(stored)
        raise


def _create(batch: BatchPrediction) -> BatchPrediction:
    with transaction.atomic():
        batch.save()
        transaction.on_commit(lambda: _enqueue(batch.pk))
    return batch


def _enqueue(batch_id: int) -> None:
    from apps.serving.tasks import predict_batch

    predict_batch.delay(batch_id)


def batch_claim(*, batch_id: int, redelivered: bool = False) -> BatchPrediction | None:
    """Take a queued batch for this worker (a duplicate delivery gets None). A message redelivered
    because its worker died takes a running batch over, up to MAX_ATTEMPTS runs in all."""
    statuses = [BatchPrediction.Status.QUEUED] + ([BatchPrediction.Status.RUNNING] if redelivered else [])
    claimed = BatchPrediction.objects.filter(pk=batch_id, status__in=statuses, attempts__lt=MAX_ATTEMPTS).update(
        status=BatchPrediction.Status.RUNNING, started_at=timezone.now(), attempts=F("attempts") + 1
    )
    if not claimed and redelivered:
        _fail(
            BatchPrediction.objects.filter(pk=batch_id, status=BatchPrediction.Status.RUNNING),
            f"The worker running this batch stopped {MAX_ATTEMPTS} times; it was not handed on again.",
        )
    return BatchPrediction.objects.select_related("model").get(pk=batch_id) if claimed else None


def batch_run(*, batch: BatchPrediction) -> None:
    """Predict every image of the claimed batch and store the results. Never raises for batch-level failures."""
    mine = BatchPrediction.objects.filter(pk=batch.pk, status=BatchPrediction.Status.RUNNING)
    try:
        predictor = get_predictor(batch.model)
        with local_copy(batch.archive) as path, TemporaryDirectory(dir=_scratch()) as tmp:
            rows = predict_archive(
                predictor,
                path,
                k=batch.k,
                limits=ingest_config().limits,
                max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS,
                progress=_Progress(mine),
            )
            csv_path, json_path, failed = _write_results(rows, Path(tmp), batch.k)
            stored = [_store(batch, "predictions.csv", csv_path), _store(batch, "predictions.json", json_path)]
            size = csv_path.stat().st_size + json_path.stat().st_size
        if not mine.update(
            status=BatchPrediction.Status.SUCCEEDED,
            finished_at=timezone.now(),
            results_csv=stored[0],
            results_json=stored[1],
            results_bytes=size,
            failed=failed,
        ):
            delete_prefix(batch.storage_prefix)  # deleted meanwhile
    except DatasetError as exc:
        _fail(mine, exc.message)
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.exception("batch %s failed (incident %s)", batch.pk, incident)
        _fail(mine, f"The batch failed unexpectedly (incident {incident}); the operators have the details.")
    finally:
        if batch.dataset_id is None and batch.archive:  # the uploaded input is done with (a dataset keeps its own)
            delete_quietly(batch.archive)
            BatchPrediction.objects.filter(pk=batch.pk).update(archive="", archive_bytes=0)


def _store(batch: BatchPrediction, name: str, path: Path) -> str:
    with path.open("rb") as fh:
        return default_storage.save(f"{batch.storage_prefix}{name}", File(fh))


def _scratch() -> Path:
    settings.GRAFT_WORK_DIR.mkdir(parents=True, exist_ok=True)
    return settings.GRAFT_WORK_DIR


def _fail(mine, message: str) -> None:
    mine.update(status=BatchPrediction.Status.FAILED, finished_at=timezone.now(), error=message)


class _Progress:
    """Writes images done (and found) to the row, at most once a second and at the end."""

    def __init__(self, rows) -> None:
        self.rows, self.last = rows, 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if done == total or now - self.last >= PROGRESS_EVERY_S:
            self.last = now
            self.rows.update(done=done, total=total)


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
            out.writerow([row.file, *cells, *[""] * (2 * k - len(cells)), row.error])
            record = {"file": row.file, "predictions": [{"label": p.label, "score": p.score} for p in row.predictions]}
            if row.error:
                record["error"] = row.error
            j.write(("," if n else "") + "\n" + json.dumps(record, ensure_ascii=False))
        j.write("\n]\n")
    return csv_path, json_path, failed


def batch_delete(*, batch: BatchPrediction) -> None:
    if batch.status in (BatchPrediction.Status.QUEUED, BatchPrediction.Status.RUNNING):
        raise UserError("This batch is still running; wait for it to finish.", status_code=409)
    batch.delete()
    delete_prefix(batch.storage_prefix)
