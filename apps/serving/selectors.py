from __future__ import annotations

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from apps.serving.models import TrainedModel


def model_list(*, user: User) -> QuerySet[TrainedModel]:
    return TrainedModel.objects.filter(owner=user)


def model_get(*, user: User, model_id: int) -> TrainedModel:
    return get_object_or_404(model_list(user=user), pk=model_id)
