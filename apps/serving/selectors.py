from __future__ import annotations

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from apps.serving.models import BatchPrediction, TrainedModel


def model_list(*, user: User) -> QuerySet[TrainedModel]:
    return TrainedModel.objects.filter(owner=user)


def model_get(*, user: User, model_id: int) -> TrainedModel:
    return get_object_or_404(model_list(user=user), pk=model_id)


def batch_list(*, user: User, model: TrainedModel | None = None) -> QuerySet[BatchPrediction]:
    batches = BatchPrediction.objects.filter(owner=user)
    return batches.filter(model=model) if model is not None else batches


def batch_get(*, user: User, batch_id: int) -> BatchPrediction:
    return get_object_or_404(batch_list(user=user), pk=batch_id)
