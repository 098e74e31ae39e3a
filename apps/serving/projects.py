"""Projects: a dataset's versions and the models trained on them, as one timeline.

A project is its dataset (the same id): nothing is stored for it but which of its models is
**published**, the one behind the project's stable prediction URL
(`/api/v1/projects/{id}/predict/`), so clients keep their URL when a better model is published.
At most one model of a project is published (a database constraint); deleting it leaves the
project with none, and the project URL says so instead of serving another.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, NotRequired, TypedDict

from django.contrib.auth.models import User
from django.db import transaction
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404
from django.utils import timezone

from apps.common.errors import UserError
from apps.datasets.models import Dataset, DatasetVersion
from apps.serving.models import TrainedModel


def project_list(*, user: User) -> QuerySet[Dataset]:
    return Dataset.objects.filter(owner=user)


def project_get(*, user: User, project_id: int) -> Dataset:
    return get_object_or_404(project_list(user=user), pk=project_id)


def project_models(project: Dataset) -> QuerySet[TrainedModel]:
    return TrainedModel.objects.filter(dataset=project).select_related("version", "job").order_by("-created_at")


def project_published(project: Dataset) -> TrainedModel | None:
    return TrainedModel.objects.filter(dataset=project, published=True).first()


class TimelineEvent(TypedDict):
    kind: Literal["version", "model"]
    at: datetime
    version: NotRequired[DatasetVersion]  # a "version" event's
    model: NotRequired[TrainedModel]  # a "model" event's


def project_timeline(project: Dataset) -> list[TimelineEvent]:
    """Versions and models, newest first, each model under the version it was trained on."""
    events: list[TimelineEvent] = []
    for v in project.versions.order_by("-number"):
        events.append({"kind": "version", "at": v.created_at, "version": v})
    for m in project_models(project):
        events.append({"kind": "model", "at": m.created_at, "model": m})
    events.sort(key=lambda e: e["at"], reverse=True)
    return events


def model_publish(*, model: TrainedModel) -> TrainedModel:
    """Make `model` its project's published model (the one the project URL serves)."""
    if model.dataset_id is None:
        raise UserError(
            f"Model '{model.name}' has no project (its dataset was deleted), so it cannot be published; "
            "its own prediction URL still works.",
            status_code=409,
        )
    with transaction.atomic():
        # One at a time per project: the row lock on the dataset orders concurrent publishes.
        Dataset.objects.select_for_update().filter(pk=model.dataset_id).values_list("pk", flat=True).first()
        TrainedModel.objects.filter(dataset_id=model.dataset_id, published=True).exclude(pk=model.pk).update(
            published=False, published_at=None
        )
        TrainedModel.objects.filter(pk=model.pk).update(published=True, published_at=timezone.now())
    model.refresh_from_db()
    return model


def model_unpublish(*, model: TrainedModel) -> TrainedModel:
    TrainedModel.objects.filter(pk=model.pk).update(published=False, published_at=None)
    model.refresh_from_db()
    return model


def model_rename(*, model: TrainedModel, name: str) -> TrainedModel:
    name = name.strip()
    if not name:
        raise UserError("A model's name cannot be empty.")
    if len(name) > 200:
        raise UserError("A model's name is at most 200 characters.")
    TrainedModel.objects.filter(pk=model.pk).update(name=name)
    model.name = name
    return model


def project_serving_model(project: Dataset) -> TrainedModel:
    """The model the project URL serves, or a 404 with a sentence when none is published."""
    model = project_published(project)
    if model is None:
        raise UserError(
            f"Project '{project.name}' has no published model yet; publish one of its models first.",
            status_code=404,
        )
    return model
