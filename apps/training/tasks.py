from __future__ import annotations

from celery import Task, shared_task
from django.conf import settings

from apps.training.services import TRAINING, RetryLater, gpu_ticket


# A message on the `gpu` queue is a ticket: it runs the fairest waiting job or batch of any user
# (apps.common.work). A redelivered message of a job alive elsewhere checks again later, for a
# bounded time (a lost worker is found by its stale heartbeat and re-queued by beat, not by redelivery).
@shared_task(name="training.train_job", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=30)
def train_job(self: Task, job_id: int) -> None:
    try:
        gpu_ticket(
            kind=TRAINING,
            item_id=job_id,
            redelivered=bool(self.request.delivery_info.get("redelivered")),
            worker=self.request.hostname or "",
        )
    except RetryLater:
        raise self.retry(countdown=settings.GRAFT_JOB_STALE_SECONDS) from None


@shared_task(name="jobs.recover_stale")
def recover_stale_jobs() -> dict[str, list[int]]:
    """Every kind of background work, not only jobs (the name is kept for beat schedules in use)."""
    from apps.common.work import work_recover_stale, work_resend_waiting
    from apps.datasets import services as _datasets  # noqa: F401 - registers the ingestion kind
    from apps.datasets.findings import findings_recover_stale
    from apps.serving import batches as _batches  # noqa: F401 - registers the batch kind
    from apps.serving.quantization import int8_recover_stale

    return {
        **work_recover_stale(),
        **{f"{kind} sent again": ids for kind, ids in work_resend_waiting().items()},
        "findings": findings_recover_stale(),
        "int8": int8_recover_stale(),
    }
