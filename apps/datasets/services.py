from __future__ import annotations

import hashlib
import json
import logging
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction

from apps.accounts.quotas import check_new_dataset
from apps.common.errors import UserError
from apps.common.storage import delete_prefix, delete_quietly, local_copy
from apps.datasets.models import Dataset
from ml.archive import ArchiveLimits, read_member
from ml.dataset import DatasetIndex, IngestConfig, index_dataset
from ml.errors import DatasetError
from ml.images import ImageDecodeError, thumbnail_jpeg

THUMB_SIDE = 160
THUMBS_PER_CLASS = 12

log = logging.getLogger(__name__)


def dataset_create(*, owner: User, file: UploadedFile, name: str = "") -> Dataset:
    """Store an uploaded zip and queue its ingestion. Rejects non-zips at once."""
    size = file.size or 0  # an uploaded file always has its size; only a file made by hand has none
    if size == 0:
        raise UserError("The uploaded file is empty.")
    if size > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError("The upload is over the size limit.", status_code=413)
    if not zipfile.is_zipfile(file):
        raise UserError(f"'{file.name}' is not a zip archive. Upload a .zip with one folder of images per class.")
    check_new_dataset(owner, size)
    file.seek(0)
    dataset = Dataset(owner=owner, archive_bytes=size)
    # Stored first, streamed from the upload's temporary file (never whole in memory), and
    # outside any transaction; the row follows, so a failure leaves neither behind.
    stored = default_storage.save(f"{dataset.storage_prefix}archive.zip", file)
    try:
        with transaction.atomic():
            return dataset_create_stored(dataset=dataset, archive=stored, name=name, filename=file.name or "")
    except BaseException:
        delete_quietly(stored)
        raise


def dataset_create_stored(*, dataset: Dataset, archive: str, name: str, filename: str) -> Dataset:
    """The row for an archive already in storage, with its ingestion queued once the transaction commits."""
    dataset.name = (name or _default_name(filename))[:200]
    dataset.archive = archive
    dataset.save()
    transaction.on_commit(lambda: _enqueue_ingest(dataset.pk))
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
            thumbnails = _store_thumbnails(path, dataset, index)
    except DatasetError as exc:
        dataset_fail(dataset=dataset, message=exc.message)
        return
    manifest = default_storage.save(
        f"{dataset.storage_prefix}manifest.json",
        ContentFile(json.dumps(index.to_dict()).encode()),
    )
    _mark_ready(dataset, index, manifest, assessment, thumbnails)


def thumbnail_members(index: DatasetIndex) -> dict[str, list[str]]:
    """The images a dataset's page shows: the first few of each class, in index order."""
    picked: dict[str, list[str]] = {}
    for sample in index.samples:
        group = picked.setdefault(sample.label, [])
        if len(group) < THUMBS_PER_CLASS:
            group.append(sample.member)
    return picked


def thumbnail_name(dataset: Dataset, member: str) -> str:
    return f"{dataset.storage_prefix}thumbs/{hashlib.sha256(member.encode()).hexdigest()[:24]}.jpg"


def thumbnail_store(dataset: Dataset, member: str, data: bytes) -> str | None:
    """Store the JPEG thumbnail of one image (its bytes `data`); None when it cannot be decoded."""
    try:
        jpeg = thumbnail_jpeg(data, THUMB_SIDE, max_pixels=settings.GRAFT_MAX_IMAGE_PIXELS)
    except ImageDecodeError:
        return None
    return default_storage.save(thumbnail_name(dataset, member), ContentFile(jpeg))


def _store_thumbnails(path, dataset: Dataset, index: DatasetIndex) -> dict[str, list[str]]:
    """Thumbnails made once, at ingestion, and stored: pages never decode a full image."""
    members = [m for group in thumbnail_members(index).values() for m in group]
    local = threading.local()

    def make(member: str) -> None:
        if not hasattr(local, "zf"):
            local.zf = zipfile.ZipFile(path)
        thumbnail_store(dataset, member, read_member(local.zf, member, ingest_config().limits.max_member_bytes))

    with ThreadPoolExecutor(max_workers=4) as pool:  # object storage: a round trip per thumbnail
        list(pool.map(make, members))
    return thumbnail_members(index)


def _assess(path, index: DatasetIndex) -> dict:
    """The transfer-matrix cell with the default backbone, for the train page. Never fails ingestion."""
    from ml.backbones import DEFAULT_BACKBONE
    from ml.errors import MLError
    from ml.fit import assess

    try:
        # On the CPU always: a worker of the ingestion queue must not take a trainer's GPU.
        return {**assess(path, index, device="cpu").to_dict(), "backbone": DEFAULT_BACKBONE}
    except MLError as exc:
        return {"error": exc.message}


def _mark_ready(dataset: Dataset, index: DatasetIndex, manifest: str, assessment: dict, thumbnails: dict) -> None:
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
        thumbnails=thumbnails,
        error="",
    )
    if not updated:  # deleted or failed meanwhile
        delete_prefix(dataset.storage_prefix)


def dataset_fail(*, dataset: Dataset, message: str) -> None:
    """Mark failed and drop what was stored: a failed upload leaves no files behind."""
    Dataset.objects.filter(pk=dataset.pk).update(status=Dataset.Status.FAILED, error=message)
    delete_prefix(dataset.storage_prefix)


def dataset_delete(*, dataset: Dataset) -> None:
    from apps.datasets.models import Upload

    prefix = dataset.storage_prefix
    Upload.objects.filter(dataset=dataset).delete()  # its parts went into the archive already
    dataset.delete()
    delete_prefix(prefix)
