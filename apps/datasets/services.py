from __future__ import annotations

import hashlib
import json
import logging
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import UploadedFile
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from apps.accounts.quotas import check_new_dataset, owner_locked
from apps.common import faults, work
from apps.common.errors import UserError
from apps.common.storage import delete_prefix, delete_quietly, local_copy
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.versions import class_counts, store_image_thumbs, version_first
from ml.archive import ArchiveLimits, read_member
from ml.dataset import DatasetIndex, IngestConfig, index_dataset
from ml.errors import DatasetError
from ml.images import ImageDecodeError, thumbnail_jpeg
from ml.splits import with_splits

THUMB_SIDE = 160
THUMBS_PER_CLASS = 12

log = logging.getLogger(__name__)


def _enqueue_ingest(dataset_id: int, countdown: float = 0) -> None:
    from apps.datasets.tasks import ingest_dataset

    ingest_dataset.apply_async((dataset_id,), countdown=countdown or None)


def _drop_files(dataset: Dataset) -> None:
    delete_prefix(dataset.storage_prefix)


INGESTION = work.register(
    work.Kind(
        name="ingestion",
        model=Dataset,
        queued=Dataset.Status.PROCESSING,  # one word for waiting and running: the heartbeat tells them apart
        running=Dataset.Status.PROCESSING,
        failed=Dataset.Status.FAILED,
        lost=(
            "Processing this archive stopped its worker {attempts} times (killed, or out of memory), so it "
            "was not tried again. Try a smaller archive, or ask the operators to check the workers."
        ),
        enqueue=_enqueue_ingest,
        on_lost=_drop_files,
    )
)


def dataset_create(*, owner: User, file: UploadedFile[bytes], name: str = "") -> Dataset:
    """Store an uploaded zip and queue its ingestion. Rejects non-zips at once."""
    size = file.size or 0  # an uploaded file always has its size; only a file made by hand has none
    if size == 0:
        raise UserError("The uploaded file is empty.")
    if size > settings.GRAFT_MAX_UPLOAD_BYTES:
        raise UserError("The upload is over the size limit.", status_code=413)
    if not zipfile.is_zipfile(file):
        raise UserError(f"'{file.name}' is not a zip archive. Upload a .zip with one folder of images per class.")
    check_new_dataset(owner, size)  # early, before storing: the same check follows, locked
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


def dataset_create_stored(
    *, dataset: Dataset, archive: str, name: str, filename: str, reserved: bool = False
) -> Dataset:
    """The row for an archive already in storage, with its ingestion queued once the transaction
    commits. Call it in a transaction: the quotas are checked under the owner's lock (unless the
    caller's row, `reserved`, already counts these bytes), so parallel uploads cannot pass them together."""
    owner_locked(dataset.owner)
    check_new_dataset(dataset.owner, 0 if reserved else dataset.archive_bytes)
    dataset.name = (name or _default_name(filename))[:200]
    dataset.archive = archive
    dataset.save()
    transaction.on_commit(lambda: _enqueue_ingest(dataset.pk), robust=True)  # lost: beat sends it again
    return dataset


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
    """Validate and index the claimed dataset's archive; end `ready` or `failed`.

    Every write names this attempt (`work.attempt_rows`): a worker that went silent and was replaced
    changes nothing, deletes nothing. A database or object store gone for a moment hands the dataset
    back (`work.hand_back`: tried again a little later); anything unforeseen fails it with a sentence.
    """
    mine = work.attempt_rows(INGESTION, dataset)
    try:
        with work.Heartbeat(mine, f"dataset-{dataset.pk}"), local_copy(dataset.archive) as path:
            faults.point("ingestion.claimed")
            # Every image's split is written down now, so later versions keep each where it was.
            index = with_splits(index_dataset(path, ingest_config()))
            assessment = _assess(path, index)
            thumbnails = _store_thumbnails(path, dataset, index)
            store_image_thumbs(dataset, path, index.samples)
            faults.point("ingestion.thumbnails")
            manifest = default_storage.save(
                f"{dataset.storage_prefix}manifest.json",
                ContentFile(json.dumps(index.to_dict()).encode()),
            )
            faults.point("ingestion.manifest")
        _mark_ready(mine, dataset, index, manifest, assessment, thumbnails)
    except DatasetError as exc:
        _fail(mine, dataset, exc.message)
    except work.TRANSIENT:
        log.exception("ingestion of dataset %s lost the database or storage; handing it back", dataset.pk)
        work.hand_back(INGESTION, mine)
    except Exception:
        log.exception("ingestion of dataset %s failed", dataset.pk)
        _fail(mine, dataset, "Processing the archive failed unexpectedly; the operators have the details.")


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


def _store_thumbnails(path: Path, dataset: Dataset, index: DatasetIndex) -> dict[str, list[str]]:
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


def _assess(path: Path, index: DatasetIndex) -> dict[str, Any]:
    """The transfer-matrix cell with the default backbone, for the train page. Never fails ingestion."""
    from ml.backbones import DEFAULT_BACKBONE
    from ml.errors import MLError
    from ml.measure import assess

    try:
        # On the CPU always: a worker of the ingestion queue must not take a trainer's GPU.
        return {**assess(path, index, device="cpu").to_dict(), "backbone": DEFAULT_BACKBONE}
    except MLError as exc:
        return {"error": exc.message}


def _mark_ready(
    mine: QuerySet[Dataset],
    dataset: Dataset,
    index: DatasetIndex,
    manifest: str,
    assessment: dict[str, Any],
    thumbnails: dict[str, list[str]],
) -> None:
    warnings = [asdict(w) for w in index.warnings]
    twin = (
        Dataset.objects.filter(owner=dataset.owner, status=Dataset.Status.READY, content_hash=index.content_hash)
        .exclude(pk=dataset.pk)
        .order_by("created_at")
        .first()
    )
    if twin is not None:  # the same images, labels and splits uploaded again
        warnings.insert(
            0,
            {
                "code": "same_as_dataset",
                "message": f"These are the same images and labels as your dataset '{twin.name}', uploaded "
                f"{twin.created_at:%Y-%m-%d %H:%M}. Open that one, or delete this copy.",
                "files": [],
                "dataset": twin.pk,
            },
        )
    with transaction.atomic():
        updated = mine.update(
            finished_at=timezone.now(),
            status=Dataset.Status.READY,
            manifest=manifest,
            layout=index.layout,
            num_images=len(index.samples),
            classes=class_counts(index),
            warnings=warnings,
            content_hash=index.content_hash,
            assessment=assessment,
            thumbnails=thumbnails,
            error="",
        )
        if updated:
            version_first(dataset=dataset, index=index, manifest=manifest)
    if not updated and not Dataset.objects.filter(pk=dataset.pk).exists():
        delete_prefix(dataset.storage_prefix)  # deleted meanwhile (if taken over, the files are the winner's)


def _fail(mine: QuerySet[Dataset], dataset: Dataset, message: str) -> None:
    """Mark failed and drop what was stored (a failed upload leaves no files behind), if this
    attempt still holds the dataset."""
    if mine.update(status=Dataset.Status.FAILED, error=message, finished_at=timezone.now()):
        delete_prefix(dataset.storage_prefix)


def dataset_delete(*, dataset: Dataset) -> None:
    """Delete a dataset and its files. Refused (409) while a training job or a batch prediction
    waits for or reads it: its models, and batches that ended, stay."""
    from apps.datasets.models import Upload
    from apps.serving.models import BatchPrediction
    from apps.training.models import Job

    active = [Job.Status.QUEUED, Job.Status.RUNNING]
    with transaction.atomic():
        owner_locked(dataset.owner)  # no job or batch can start on it between the check and the delete
        jobs = Job.objects.filter(dataset=dataset, status__in=active).count()
        batches = BatchPrediction.objects.filter(dataset=dataset, status__in=active).count()
        if jobs or batches:
            work_ = " and ".join(
                f"{n} {what}{'s' if n > 1 else ''}"
                for n, what in ((jobs, "training job"), (batches, "batch prediction"))
                if n
            )
            raise UserError(
                f"Dataset '{dataset.name}' is in use by {work_} waiting or running; cancel "
                f"{'them' if jobs + batches > 1 else 'it'} or wait for {'them' if jobs + batches > 1 else 'it'} "
                "to finish, then delete the dataset.",
                status_code=409,
            )
        prefix = dataset.storage_prefix
        Upload.objects.filter(dataset=dataset).delete()  # its parts went into the archive already
        # Predictions labelled into a version still being made go back to their queue (their images
        # stay with their model's log until that version is ready, and it will not be).
        from apps.serving.labelling import settle_labelled

        for version in dataset.versions.filter(status=DatasetVersion.Status.PROCESSING):
            settle_labelled(version, ready=False)
        dataset.delete()
    delete_prefix(prefix)
