from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models

from apps.common.work import WorkFields


def model_storage_prefix() -> str:
    return f"models/{uuid.uuid4().hex}/"


class TrainedModel(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="models")
    job = models.OneToOneField("training.Job", on_delete=models.SET_NULL, null=True, related_name="trained_model")
    # Its project: the dataset, and the version of it, it was trained on (they may be deleted; it stays).
    dataset = models.ForeignKey(
        "datasets.Dataset", on_delete=models.SET_NULL, null=True, blank=True, related_name="trained_models"
    )
    version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="trained_models"
    )
    # The one model of its project behind the project's stable prediction URL.
    published = models.BooleanField(default=False)
    published_at = models.DateTimeField(null=True, blank=True)
    name = models.CharField(max_length=200)
    storage_prefix = models.CharField(max_length=100, default=model_storage_prefix, unique=True, editable=False)
    bundle = models.CharField(max_length=300, help_text="Storage name of the bundle zip.")
    bundle_bytes = models.BigIntegerField(default=0)
    bundle_sha256 = models.CharField(max_length=64)
    backbone = models.CharField(max_length=50)
    classes = models.JSONField(default=list)
    metrics = models.JSONField(default=dict, blank=True)
    strategy = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Int8(models.TextChoices):
        """Its int8 model (apps.serving.quantization): made after the job, on a worker."""

        NONE = "", "not made"  # a model from before, or made where GRAFT_INT8 is off
        PENDING = "pending", "waiting for a worker"
        RUNNING = "running", "being made"
        KEPT = "kept", "kept"  # in the bundle, and served
        REFUSED = "refused", "refused"  # it did not predict as the fp32 model does
        FAILED = "failed", "failed"

    int8_status = models.CharField(max_length=10, choices=Int8.choices, default=Int8.NONE, blank=True)
    # ml.report.Int8Check's JSON (its figures, kept or refused), or {"error": ...} where it failed.
    int8 = models.JSONField(default=dict, blank=True)
    # When the int8 step last moved: asked for, its worker's heartbeat while it runs, its end (which
    # is when it replaced the bundle, where it did).
    int8_at = models.DateTimeField(null=True, blank=True)

    class Log(models.TextChoices):
        OFF = "off"
        ON = "on"  # time, latency, top label and score of each image predicted
        WITH_IMAGES = "with_images"  # ... and the image itself

    prediction_log = models.CharField(max_length=20, choices=Log.choices, default=Log.OFF)

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["dataset"], condition=models.Q(published=True), name="one_published_model_per_project"
            )
        ]

    def __str__(self) -> str:
        return f"{self.name} (model {self.pk})"


_storage_prefix = model_storage_prefix  # the name migration 0001 refers to


def batch_storage_prefix() -> str:
    return f"batches/{uuid.uuid4().hex}/"


class BatchPrediction(WorkFields):
    """Top-k labels for every image of an uploaded zip (or a dataset), computed by a worker.

    The input is stored under `storage_prefix` until the batch ends; the results stay there as
    CSV and JSON until the batch (or its model) is deleted.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="batches")
    model = models.ForeignKey(TrainedModel, on_delete=models.CASCADE, related_name="batches")
    dataset = models.ForeignKey("datasets.Dataset", on_delete=models.SET_NULL, null=True, blank=True)
    # Over a dataset: its newest version when the batch was made, whose images it predicts.
    version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="batches"
    )
    name = models.CharField(max_length=200)  # the uploaded file's name, or the dataset's
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    k = models.PositiveSmallIntegerField(default=5)
    storage_prefix = models.CharField(max_length=100, default=batch_storage_prefix, unique=True, editable=False)
    archive = models.CharField(max_length=300, blank=True)  # storage name of the input, while it is needed
    archive_bytes = models.BigIntegerField(default=0)
    total = models.PositiveIntegerField(default=0)  # images found
    done = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)  # images that could not be read
    results_csv = models.CharField(max_length=300, blank=True)
    results_json = models.CharField(max_length=300, blank=True)
    results_bytes = models.BigIntegerField(default=0)
    # The files whose thumbnails the worker stored (the least confident first; apps.serving.batches).
    thumbnails = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"batch {self.pk} of model {self.model_id} ({self.status})"

    @property
    def progress(self) -> float:
        return self.done / self.total if self.total else 0.0


class PredictionRecord(models.Model):
    """One image predicted through the endpoint, kept while the model's prediction log is on
    (the most recent GRAFT_PREDICTION_LOG_KEEP per model)."""

    model = models.ForeignKey(TrainedModel, on_delete=models.CASCADE, related_name="predictions")
    created_at = models.DateTimeField()  # when the request was answered
    latency_ms = models.FloatField()  # the request's time in the server, shared by its images
    label = models.CharField(max_length=200)
    score = models.FloatField()
    image = models.CharField(max_length=300, blank=True)  # storage name, with_images only
    image_bytes = models.BigIntegerField(default=0)
    # How sure the model was: its top score minus the next one (the labelling queue asks least sure first).
    margin = models.FloatField(null=True, blank=True)
    # Labelled by its owner into a dataset version (apps.serving.labelling); its image moved there.
    labelled = models.CharField(max_length=200, blank=True)
    labelled_version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["model", "-id"])]

    def __str__(self) -> str:
        return f"{self.label} {self.score:.2f} (model {self.model_id})"
