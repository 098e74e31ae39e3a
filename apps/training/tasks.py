from __future__ import annotations

from celery import shared_task
from django.conf import settings

from apps.training.services import RetryLater, job_claim, job_recover_stale, job_run


# A redelivered message of a job that is alive elsewhere checks again later, for a bounded time
# (a lost worker is found by its stale heartbeat and re-queued by beat, not by redelivery).
@shared_task(name="training.train_job", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=30)
def train_job(self, job_id: int) -> None:
    try:
        job = job_claim(
            job_id=job_id,
            redelivered=bool(self.request.delivery_info.get("redelivered")),
            worker=self.request.hostname or "",
        )
    except RetryLater:
        raise self.retry(countdown=settings.GRAFT_JOB_STALE_SECONDS) from None
    if job is not None:
        job_run(job=job)


@shared_task(name="jobs.recover_stale")
def recover_stale_jobs() -> list[int]:
    return job_recover_stale()
