from __future__ import annotations

from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from apps.training.models import Job


def job_list(*, user: User) -> QuerySet[Job]:
    return Job.objects.filter(owner=user).select_related("trained_model")


def job_get(*, user: User, job_id: int) -> Job:
    return get_object_or_404(job_list(user=user).prefetch_related("history"), pk=job_id)
