"""Per-user quotas: bytes stored, datasets, uploads in progress, jobs waiting or running.

Each is a setting; each refusal is a 4xx with a sentence that names the quota and what to do.
The dashboard shows the same figures (`usage`).

A check holds only together with the row it admits: callers check and create in one transaction
after `owner_locked`, so parallel requests of one user queue on that lock and each sees the rows
(and the bytes they reserve) of those before it.
"""

from __future__ import annotations

from dataclasses import dataclass

from django.conf import settings
from django.contrib.auth.models import User
from django.db.models import F, Model, QuerySet, Sum

from apps.common.errors import UserError
from apps.common.limits import human_bytes


@dataclass(frozen=True)
class Usage:
    # Archives (uploads, added images), bundles, uploads in progress at full length, batch files, kept images.
    bytes_stored: int
    datasets: int
    open_uploads: int
    active_jobs: int  # training jobs and batch predictions, queued or running

    @property
    def bytes_quota(self) -> int:
        return settings.GRAFT_QUOTA_BYTES

    @property
    def share(self) -> float:
        return min(1.0, self.bytes_stored / self.bytes_quota)


def usage(user: User) -> Usage:
    from apps.datasets.models import Dataset, DatasetVersion, Upload
    from apps.serving.models import BatchPrediction, PredictionRecord, TrainedModel
    from apps.training.models import Job

    def total(qs: QuerySet[Model], field: str) -> int:
        n: int | None = qs.aggregate(n=Sum(field))["n"]
        return n or 0

    open_uploads = Upload.objects.filter(owner=user, dataset__isnull=True, offset__lt=F("length"))
    batches = BatchPrediction.objects.filter(owner=user)  # results_bytes: reserved while running
    active = [Job.Status.QUEUED, Job.Status.RUNNING]  # the same words for batches
    datasets = Dataset.objects.filter(owner=user).exclude(status=Dataset.Status.FAILED)
    return Usage(
        # A dataset's versions share its images' bytes: each archive (the upload, each zip of
        # added images) counts once, however many versions name what it holds.
        bytes_stored=total(datasets, "archive_bytes")
        + total(DatasetVersion.objects.filter(dataset__in=datasets).exclude(status="failed"), "archive_bytes")
        + total(TrainedModel.objects.filter(owner=user), "bundle_bytes")
        + total(open_uploads, "length")
        + total(batches, "archive_bytes")
        + total(batches, "results_bytes")
        # a labelled image's copy is charged as its version's zip until that version is ready
        + total(PredictionRecord.objects.filter(model__owner=user, labelled=""), "image_bytes"),
        datasets=datasets.count(),
        open_uploads=open_uploads.count(),
        active_jobs=Job.objects.filter(owner=user, status__in=active).count()
        + batches.filter(status__in=active).count(),
    )


def owner_locked(user: User) -> None:
    """Hold `user`'s quota lock until the transaction ends (a row lock on PostgreSQL; SQLite's
    immediate transactions already run one writer at a time)."""
    from django.db import transaction

    if not transaction.get_connection().in_atomic_block:
        raise RuntimeError("owner_locked() must be called inside transaction.atomic()")
    User.objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True).first()


def check_new_dataset(user: User, size: int, *, resumable: bool = False, new_dataset: bool = True) -> None:
    """Before accepting an upload of `size` bytes (a tus upload counts at its declared length);
    `new_dataset` False: images to add to a dataset, which take no dataset of the quota."""
    used = usage(user)
    if resumable and used.open_uploads >= settings.GRAFT_QUOTA_OPEN_UPLOADS:
        raise UserError(
            f"You have {used.open_uploads} uploads in progress, the most allowed at once; finish or "
            "cancel one first (unfinished uploads are removed after "
            f"{settings.GRAFT_UPLOAD_EXPIRY_HOURS} hours without activity).",
            status_code=429,
        )
    if new_dataset and used.datasets >= settings.GRAFT_QUOTA_DATASETS:
        raise UserError(
            f"You have {used.datasets} datasets, the most allowed; delete one to upload another.", status_code=403
        )
    if used.bytes_stored + size > used.bytes_quota:
        raise UserError(
            f"This upload ({human_bytes(size)}) would take your storage to "
            f"{human_bytes(used.bytes_stored + size)}, over your quota of {human_bytes(used.bytes_quota)}. "
            "Delete datasets or models you no longer need.",
            status_code=413,
        )


def check_new_job(user: User) -> None:
    """A job may start while its owner has fewer than GRAFT_QUOTA_ACTIVE_JOBS waiting or running and
    storage left: its model's bundle is stored, and charged, when it succeeds."""
    used = usage(user)
    _check_active(used)
    if used.bytes_stored >= used.bytes_quota:
        raise UserError(
            f"Your storage is full ({human_bytes(used.bytes_stored)} of your quota of "
            f"{human_bytes(used.bytes_quota)}), and a trained model is stored too. Delete datasets or models "
            "you no longer need, then train.",
            status_code=413,
        )


def check_new_int8(user: User) -> None:
    """A model's int8 version may be made while its owner has storage left: it is stored in the model's
    bundle, beside the fp32 model, and charged with it once made (as a job's bundle is)."""
    used = usage(user)
    if used.bytes_stored >= used.bytes_quota:
        raise UserError(
            f"Your storage is full ({human_bytes(used.bytes_stored)} of your quota of "
            f"{human_bytes(used.bytes_quota)}), and the int8 model is stored in the model's bundle, beside the "
            "fp32 one; the model serves in fp32. Delete datasets or models you no longer need, then ask again.",
            status_code=413,
        )


def _check_active(used: Usage) -> None:
    if used.active_jobs >= settings.GRAFT_QUOTA_ACTIVE_JOBS:
        raise UserError(
            f"You have {used.active_jobs} training jobs or batch predictions waiting or running, the most "
            "allowed at once; wait for one to finish, or cancel one.",
            status_code=429,
        )


def check_new_batch(user: User, size: int) -> None:
    """Before a batch prediction over an upload of `size` bytes (0 for a dataset's images): it
    waits for the GPU queue like a training job, and its input counts against storage."""
    used = usage(user)
    _check_active(used)
    if used.bytes_stored + size > used.bytes_quota:
        raise UserError(
            f"This upload ({human_bytes(size)}) would take your storage to "
            f"{human_bytes(used.bytes_stored + size)}, over your quota of {human_bytes(used.bytes_quota)}. "
            "Delete datasets, models or batch predictions you no longer need.",
            status_code=413,
        )
