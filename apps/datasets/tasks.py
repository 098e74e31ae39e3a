from __future__ import annotations

import logging

from celery import shared_task
from django.db import DatabaseError

from apps.datasets.models import Dataset
from apps.datasets.services import dataset_fail, dataset_ingest

log = logging.getLogger(__name__)


@shared_task(
    name="datasets.ingest_dataset",
    acks_late=True,
    reject_on_worker_lost=True,
    autoretry_for=(DatabaseError,),
    retry_backoff=True,
    max_retries=5,
)
def ingest_dataset(dataset_id: int) -> None:
    dataset = Dataset.objects.filter(pk=dataset_id).first()
    if dataset is None:
        return
    try:
        dataset_ingest(dataset=dataset)
    except DatabaseError:
        raise  # transient: retried
    except Exception:
        log.exception("ingestion of dataset %s failed", dataset_id)
        dataset_fail(
            dataset=dataset, message="Processing the archive failed unexpectedly; the operators have the details."
        )


@shared_task(name="datasets.expire_uploads")
def expire_uploads() -> int:
    from apps.datasets.tus import upload_expire

    return upload_expire()
