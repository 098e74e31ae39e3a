from __future__ import annotations

import uuid

from django.conf import settings
from django.db import models


def model_storage_prefix() -> str:
    return f"models/{uuid.uuid4().hex}/"


class TrainedModel(models.Model):
    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="models")
    job = models.OneToOneField("training.Job", on_delete=models.SET_NULL, null=True, related_name="trained_model")
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

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.name} (model {self.pk})"


_storage_prefix = model_storage_prefix  # the name migration 0001 refers to
