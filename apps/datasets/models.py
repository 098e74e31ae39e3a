from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from apps.common.work import WorkFields


def _storage_prefix() -> str:
    return f"datasets/{uuid.uuid4().hex}/"


class Dataset(WorkFields):
    """An uploaded archive, and while `processing`, its ingestion (background work: apps.common.work)."""

    class Status(models.TextChoices):
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="datasets")
    name = models.CharField(max_length=200)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.PROCESSING, db_index=True)
    # Everything stored for this dataset lives under this prefix, and nowhere else.
    storage_prefix = models.CharField(max_length=100, default=_storage_prefix, unique=True, editable=False)
    archive = models.CharField(max_length=300, blank=True, help_text="Storage name of the uploaded zip.")
    archive_bytes = models.BigIntegerField(default=0)
    manifest = models.CharField(max_length=300, blank=True, help_text="Storage name of the image index.")
    layout = models.CharField(max_length=20, blank=True)
    num_images = models.PositiveIntegerField(default=0)
    classes = models.JSONField(default=list, blank=True)  # [{name, count, train, val}]
    warnings = models.JSONField(default=list, blank=True)  # [{code, message, files}]
    content_hash = models.CharField(max_length=64, blank=True)
    # The highest version number given out, deleted versions included: numbers are never reused
    # (a model card naming "version 5" must keep meaning that data).
    last_version_number = models.PositiveIntegerField(default=0)
    # Where the data sits in the transfer matrix, measured at ingestion (ml.fit.assess):
    # {name, cell, images_per_class, similarity, reason, measurements, backbone} or {error}.
    assessment = models.JSONField(default=dict, blank=True)
    # The images its page shows, {class: [member, ...]}, their thumbnails stored at ingestion.
    thumbnails = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    # Images (sha256) whose findings the user dismissed: the review's finder filters leave them out,
    # in every version.
    dismissed = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} ({self.status})"


class Upload(models.Model):
    """A resumable upload in progress (tus protocol, https://tus.io/protocols/resumable-upload).

    Each PATCH's bytes are a stored part under `storage_prefix`; when the last byte arrives
    the parts become the archive of a Dataset, linked here until the upload expires (so
    retries find it). Nothing lives on a web host: any host can take the next PATCH.
    """

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="uploads")
    length = models.BigIntegerField()
    offset = models.BigIntegerField(default=0)
    filename = models.CharField(max_length=255, blank=True)
    name = models.CharField(max_length=200, blank=True)
    dataset = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    # An upload of images to add to this dataset (a new version, `version`), not a dataset of its own.
    add_to = models.ForeignKey(Dataset, null=True, blank=True, on_delete=models.CASCADE, related_name="+")
    version = models.ForeignKey("DatasetVersion", null=True, blank=True, on_delete=models.SET_NULL, related_name="+")
    note = models.CharField(max_length=300, blank=True)
    parts = models.JSONField(default=list, blank=True)  # storage names, in order
    # The request writing it now, and until when its lease holds (apps.datasets.tus._Lease).
    writer = models.UUIDField(null=True, blank=True)
    writer_until = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    def __str__(self) -> str:
        return f"upload {self.pk} ({self.offset}/{self.length})"

    @property
    def storage_prefix(self) -> str:
        return f"uploads/{self.pk.hex}/"


class DatasetVersion(WorkFields):
    """One immutable state of a dataset: its parent plus a change set (relabel, remove, add).

    A version is a manifest (an `ml.dataset.DatasetIndex` in storage), not a copy: each image is
    named by its content (sha256) and its bytes stay in the archive they arrived in, the upload's
    or the zip of images added later (`archive`, the one thing a version stores). So versions that
    share images share their bytes, and the usage meter counts each archive once. While `processing`,
    a version with added images is being ingested (background work: apps.common.work)."""

    class Status(models.TextChoices):
        PROCESSING = "processing"
        READY = "ready"
        FAILED = "failed"

    class FindingsStatus(models.TextChoices):
        NONE = "none"
        QUEUED = "queued"
        RUNNING = "running"
        READY = "ready"
        FAILED = "failed"

    dataset = models.ForeignKey(Dataset, on_delete=models.CASCADE, related_name="versions")
    number = models.PositiveIntegerField()
    parent = models.ForeignKey("self", on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.READY, db_index=True)
    note = models.CharField(max_length=300, blank=True)
    manifest = models.CharField(max_length=300, blank=True, help_text="Storage name of the image index.")
    archive = models.CharField(max_length=300, blank=True, help_text="Storage name of the added images' zip.")
    archive_bytes = models.BigIntegerField(default=0)
    num_images = models.PositiveIntegerField(default=0)
    classes = models.JSONField(default=list, blank=True)  # [{name, count, train, val}]
    content_hash = models.CharField(max_length=64, blank=True)
    # What changed from the parent: {"relabelled": [{sha256, member, from, to}], "removed": [{sha256,
    # member, label}], "added": [{sha256, member, label, split}]}; `summary` counts them.
    changes = models.JSONField(default=dict, blank=True)
    summary = models.JSONField(default=dict, blank=True)
    warnings = models.JSONField(default=list, blank=True)  # of the added images' ingestion
    error = models.TextField(blank=True)
    # The finders' results (ml.finders.Findings.to_dict(), in storage) and their counts.
    findings_status = models.CharField(max_length=20, choices=FindingsStatus.choices, default=FindingsStatus.NONE)
    findings = models.CharField(max_length=300, blank=True)
    findings_summary = models.JSONField(default=dict, blank=True)
    findings_error = models.TextField(blank=True)
    findings_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["dataset", "-number"]
        constraints = [models.UniqueConstraint(fields=["dataset", "number"], name="one_number_per_version")]

    def __str__(self) -> str:
        return f"{self.dataset.name} v{self.number}"

    @property
    def label(self) -> str:
        return f"v{self.number}"
