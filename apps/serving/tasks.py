from __future__ import annotations

from celery import Task, shared_task
from django.conf import settings

from apps.serving.batches import BATCH
from apps.training.services import RetryLater, gpu_ticket


# On the GPU queue (CELERY_TASK_ROUTES), a ticket like training's: it runs the fairest waiting job
# or batch of any user (apps.common.work); a lost worker's batch is re-queued by beat.
@shared_task(name="serving.predict_batch", bind=True, acks_late=True, reject_on_worker_lost=True, max_retries=30)
def predict_batch(self: Task, batch_id: int) -> None:
    try:
        gpu_ticket(
            kind=BATCH,
            item_id=batch_id,
            redelivered=bool(self.request.delivery_info.get("redelivered")),
            worker=self.request.hostname or "",
        )
    except RetryLater:
        raise self.retry(countdown=settings.GRAFT_JOB_STALE_SECONDS) from None


# The int8 variant of a model whose job succeeded (apps.serving.quantization), on the training hosts.
# Redelivered if its worker is lost; the step it claimed is then failed by beat, not run again.
@shared_task(name="serving.make_int8", acks_late=True, reject_on_worker_lost=True)
def make_int8(model_id: int) -> None:
    from apps.serving.quantization import int8_run

    int8_run(model_id=model_id)
