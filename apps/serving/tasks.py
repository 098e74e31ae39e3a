from __future__ import annotations

from celery import shared_task

from apps.serving.batches import batch_claim, batch_run


# On the GPU queue (CELERY_TASK_ROUTES). A message redelivered after its worker died takes the
# batch over, a bounded number of times.
@shared_task(name="serving.predict_batch", bind=True, acks_late=True, reject_on_worker_lost=True)
def predict_batch(self, batch_id: int) -> None:
    batch = batch_claim(batch_id=batch_id, redelivered=bool(self.request.delivery_info.get("redelivered")))
    if batch is not None:
        batch_run(batch=batch)
