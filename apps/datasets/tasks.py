from __future__ import annotations

import logging

from celery import shared_task

from apps.common import work
from apps.datasets.services import INGESTION, dataset_ingest

log = logging.getLogger(__name__)


# Claimed like every background task (apps.common.work): a duplicate or a redelivered message of
# an ingestion alive elsewhere does nothing; one whose worker died is re-queued by beat, and one
# that killed its workers GRAFT_JOB_MAX_ATTEMPTS times fails with a sentence instead of looping.
@shared_task(name="datasets.ingest_dataset", bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest_dataset(self, dataset_id: int) -> None:
    dataset = work.claim(INGESTION, dataset_id, worker=self.request.hostname or "")
    if dataset is not None:
        dataset_ingest(dataset=dataset)


@shared_task(name="datasets.expire_uploads")
def expire_uploads() -> int:
    from apps.datasets.tus import upload_expire

    return upload_expire()
