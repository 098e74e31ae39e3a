from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone

from apps.common.work import WorkFields


class Job(WorkFields):
    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"

    FINISHED = (Status.SUCCEEDED, Status.FAILED, Status.CANCELLED)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="jobs")
    dataset = models.ForeignKey("datasets.Dataset", on_delete=models.SET_NULL, null=True, related_name="jobs")
    # The version it trains on (the dataset's newest when the job was made, unless it named one).
    version = models.ForeignKey(
        "datasets.DatasetVersion", on_delete=models.SET_NULL, null=True, blank=True, related_name="jobs"
    )
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    config = models.JSONField(default=dict, blank=True)  # what the user asked for (ml.FitConfig fields)
    strategy = models.JSONField(default=dict, blank=True)  # what was decided: name, cell, reason, ...
    phase = models.CharField(max_length=30, blank=True)
    progress = models.FloatField(default=0.0)  # 0..1
    metrics = models.JSONField(default=dict, blank=True)
    timings = models.JSONField(default=dict, blank=True)
    # The engine's account of the run: sanity checks, hyperparameters, LR range test, log lines.
    report = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    # The fine-tune's last checkpoint in storage (under `storage_prefix`), while the job runs, and
    # the last history row it covers: a worker that takes the job over goes on from there.
    checkpoint = models.CharField(max_length=300, blank=True)
    checkpoint_history_id = models.BigIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"job {self.pk} ({self.status})"

    @property
    def storage_prefix(self) -> str:
        """Where its checkpoints are stored (removed when the job ends, however it ends)."""
        return f"jobs/{self.pk}/"

    @property
    def is_stale(self) -> bool:
        """Running, but its worker has stopped reporting: it died or lost the database."""
        if self.status != self.Status.RUNNING or self.heartbeat_at is None:
            return False
        return timezone.now() - self.heartbeat_at > timedelta(seconds=settings.GRAFT_JOB_STALE_SECONDS)


class JobHistory(models.Model):
    """One row per epoch (fine-tunes) or per step (probe regularisation search)."""

    job = models.ForeignKey(Job, on_delete=models.CASCADE, related_name="history")
    step = models.PositiveIntegerField()
    phase = models.CharField(max_length=30)
    data = models.JSONField(default=dict)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["job", "id"]
