from __future__ import annotations

import logging

from celery import Task, shared_task

from apps.common import work
from apps.datasets.services import INGESTION, dataset_ingest

log = logging.getLogger(__name__)


# Claimed like every background task (apps.common.work): a duplicate or a redelivered message of
# an ingestion alive elsewhere does nothing; one whose worker died is re-queued by beat, and one
# that killed its workers GRAFT_JOB_MAX_ATTEMPTS times fails with a sentence instead of looping.
@shared_task(name="datasets.ingest_dataset", bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest_dataset(self: Task, dataset_id: int) -> None:
    dataset = work.claim(INGESTION, dataset_id, worker=self.request.hostname or "")
    if dataset is not None:
        dataset_ingest(dataset=dataset)


@shared_task(name="datasets.expire_uploads")
def expire_uploads() -> int:
    from apps.datasets.tus import upload_expire

    return upload_expire()


@shared_task(name="datasets.ingest_addition", bind=True, acks_late=True, reject_on_worker_lost=True)
def ingest_addition(self: Task, version_id: int) -> None:
    """Images added to a dataset, ingested as its next version (claimed like an upload's ingestion)."""
    from apps.datasets.versions import ADDITION, version_ingest

    version = work.claim(ADDITION, version_id, worker=self.request.hostname or "")
    if version is not None:
        version_ingest(version=version)


@shared_task(name="datasets.find_issues", acks_late=True)
def find_issues(version_id: int) -> None:
    """The finders on one dataset version; a duplicate message finds the work taken and does nothing."""
    from apps.datasets.findings import version_find

    version_find(version_id=version_id)
