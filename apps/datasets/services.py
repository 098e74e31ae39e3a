from __future__ import annotations

import json
import logging
import zipfile
from dataclasses import asdict

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from apps.common.errors import UserError
from apps.common.storage import delete_quietly, local_copy
from apps.datasets.models import Dataset
from ml.archive import ArchiveLimits
from ml.dataset import DatasetIndex, IngestConfig, index_dataset
from ml.errors import DatasetError

log = logging.getLogger(__name__)


def dataset_create(*, owner: AbstractBaseUser, file: UploadedFile, name: str = "") -> Dataset:
    """Store an uploaded zip and queue its ingestion. Rejects non-zips at once."""
    if file.size == 0:
        raise UserError("The uploaded file is empty.")
    if file.size > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError("The upload is over the size limit.", status_code=413)
    if not zipfile.is_zipfile(file):
        raise UserError(f"'{file.name}' is not a zip archive. Upload a .zip with one folder of images per class.")
    file.seek(0)
    dataset = Dataset(owner=owner, name=(name or _default_name(file.name))[:200], archive_bytes=file.size)
    stored = None
    try:
        with transaction.atomic():
            dataset.save()
            # Streams from the upload's temporary file in chunks; never the whole file in memory.
            stored = default_storage.save(f"{dataset.storage_prefix}archive.zip", file)
            dataset.archive = stored
            dataset.save(update_fields=["archive"])
            transaction.on_commit(lambda: _enqueue_ingest(dataset.pk))
    except BaseException:
        delete_quietly(stored)
        raise
    return dataset


def _enqueue_ingest(dataset_id: int) -> None:
    from apps.datasets.tasks import ingest_dataset

    ingest_dataset.delay(dataset_id)


def _default_name(filename: str) -> str:
    stem = filename.rsplit("/", 1)[-1]
    return stem[:-4] if stem.lower().endswith(".zip") else stem or "dataset"


def ingest_config() -> IngestConfig:
    return IngestConfig(
        limits=ArchiveLimits(
            max_entries=settings.GRAFT_MAX_ARCHIVE_ENTRIES,
            max_total_bytes=settings.GRAFT_MAX_UNCOMPRESSED_BYTES,
        ),
        min_per_class=settings.GRAFT_MIN_IMAGES_PER_CLASS,
        max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS,
    )


def dataset_ingest(*, dataset: Dataset) -> None:
    """Validate and index the stored archive; end `ready` or `failed`. Safe to run twice."""
    if dataset.status != Dataset.Status.PROCESSING:
        return
    try:
        with local_copy(dataset.archive) as path:
            index = index_dataset(path, ingest_config())
            assessment = _assess(path, index)
    except DatasetError as exc:
        dataset_fail(dataset=dataset, message=exc.message)
        return
    manifest = default_storage.save(
        f"{dataset.storage_prefix}manifest.json",
        ContentFile(json.dumps(index.to_dict()).encode()),
    )
    try:
        _mark_ready(dataset, index, manifest, assessment)
    except BaseException:
        delete_quietly(manifest)
        raise


def _assess(path, index: DatasetIndex) -> dict:
    """The transfer-matrix cell with the default backbone, for the train page. Never fails ingestion."""
    from ml.backbones import DEFAULT_BACKBONE
    from ml.errors import MLError
    from ml.fit import assess

    try:
        return {**assess(path, index).to_dict(), "backbone": DEFAULT_BACKBONE}
    except MLError as exc:
        return {"error": exc.message}


def _mark_ready(dataset: Dataset, index: DatasetIndex, manifest: str, assessment: dict) -> None:
    totals, train, val = index.counts(), index.counts("train"), index.counts("val")
    updated = Dataset.objects.filter(pk=dataset.pk, status=Dataset.Status.PROCESSING).update(
        status=Dataset.Status.READY,
        manifest=manifest,
        layout=index.layout,
        num_images=len(index.samples),
        classes=[{"name": c, "count": totals[c], "train": train[c], "val": val[c]} for c in index.classes],
        warnings=[asdict(w) for w in index.warnings],
        content_hash=index.content_hash,
        assessment=assessment,
        error="",
    )
    if not updated:  # deleted or failed meanwhile
        delete_quietly(manifest)


def dataset_fail(*, dataset: Dataset, message: str) -> None:
    """Mark failed and drop what was stored: a failed upload leaves no files behind."""
    Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.Status.FAILED, error=message)
    delete_quietly(dataset.archive)
    delete_quietly(dataset.manifest)


def dataset_delete(*, dataset: Dataset) -> None:
    names = [dataset.archive, dataset.manifest]
    dataset.delete()
    for name in names:
        delete_quietly(name)
