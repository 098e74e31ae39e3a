from __future__ import annotations

import json

from django.contrib.auth.models import User
from django.core.files.storage import default_storage
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from apps.datasets.models import Dataset, DatasetVersion
from ml.dataset import DatasetIndex


def dataset_list(*, user: User) -> QuerySet[Dataset]:
    return Dataset.objects.filter(owner=user)


def dataset_get(*, user: User, dataset_id: int) -> Dataset:
    """The user's own dataset, or 404 (other users' datasets do not exist for them)."""
    return get_object_or_404(dataset_list(user=user), pk=dataset_id)


def dataset_index(*, dataset: Dataset) -> DatasetIndex:
    with default_storage.open(dataset.manifest, "rb") as fh:
        return DatasetIndex.from_dict(json.load(fh))


def version_list(*, dataset: Dataset) -> QuerySet[DatasetVersion]:
    return dataset.versions.order_by("-number")


def version_get(*, user: User, dataset_id: int, number: int) -> DatasetVersion:
    """A version of the user's own dataset, or 404."""
    return get_object_or_404(
        DatasetVersion.objects.select_related("dataset", "dataset__owner"),
        dataset__owner=user,
        dataset_id=dataset_id,
        number=number,
    )
