"""A model's int8 variant: made on a worker after its job succeeded, kept only where it holds.

The model serves in fp32 from the moment its job succeeds. `int8_request` queues the int8 step
(`serving.make_int8`, on the training hosts, where the dataset's archive is cached); the step
reads the dataset version the model was trained on, quantizes and tests the bundle's ONNX model
(ml.quantize), and stores the bundle again with the int8 model in it where it was kept, and with
the figures in its card either way. The new bundle replaces the old one only if the model still
has the bundle the step started from (it was not deleted, nor made again meanwhile); the serving
cache keys on the bundle's SHA-256, so the next prediction loads the new one. The old bundle stays
stored until the sweeper's grace period has passed, for whoever read the row just before.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction

from apps.common.errors import UserError
from apps.common.storage import delete_quietly, local_copy
from apps.serving.models import TrainedModel
from ml.errors import MLError

log = logging.getLogger(__name__)


def int8_request(*, model: TrainedModel) -> TrainedModel:
    """Queue the model's int8 step (again, where it was made before); the model serves meanwhile."""
    from apps.serving.tasks import make_int8

    if model.job is None or model.job.dataset is None:
        raise UserError(
            "The int8 model is made from the dataset this model was trained on, and that job or dataset was deleted.",
            status_code=409,
        )
    # Asked again while pending (a lost message, a second click), it is queued again: a step that finds
    # the work done returns, and of two that overlap only the first replaces the bundle.
    TrainedModel.objects.filter(pk=model.pk).update(int8_status=TrainedModel.Int8.PENDING, int8={})
    model.int8_status, model.int8 = TrainedModel.Int8.PENDING, {}
    transaction.on_commit(lambda: make_int8.delay(model.pk))
    return model


def int8_run(*, model_id: int) -> None:
    """The int8 step for one model. Never raises for the model's own failures: they are recorded."""
    from apps.datasets.models import Dataset
    from apps.serving.services import file_sha256
    from apps.training.services import training_data
    from ml.config import FitConfig
    from ml.quantize import quantize_bundle_zip

    model = TrainedModel.objects.select_related("job", "job__dataset").filter(pk=model_id).first()
    if model is None or model.int8_status != TrainedModel.Int8.PENDING:
        return  # deleted, or already done by a delivery before this one
    rows = TrainedModel.objects.filter(pk=model.pk, bundle=model.bundle)  # the bundle this step starts from
    try:
        job, dataset = model.job, model.job.dataset if model.job else None
        if job is None or dataset is None or dataset.status != Dataset.Status.READY:
            raise MLError("The job or the dataset this model was trained on was deleted.")
        config = FitConfig(**job.config)
        work = Path(settings.GRAFT_WORK_DIR) / "int8"
        work.mkdir(parents=True, exist_ok=True)
        with (
            tempfile.TemporaryDirectory(dir=work) as tmp,
            training_data(job, dataset) as (archive, index, _),
            local_copy(model.bundle) as bundle,
        ):
            new_zip, check = quantize_bundle_zip(
                bundle, Path(tmp), archive, index, val_fraction=config.val_fraction, seed=config.seed
            )
            with new_zip.open("rb") as fh:
                stored = default_storage.save(f"{model.storage_prefix}bundle-{uuid.uuid4().hex[:8]}.zip", File(fh))
            size, sha256 = new_zip.stat().st_size, file_sha256(new_zip)
        status = TrainedModel.Int8.KEPT if check.kept else TrainedModel.Int8.REFUSED
        # The old bundle is left where it is: a request or a download that read the row just before this
        # update fetches it still. No row names it any more, so the sweeper removes it after its grace
        # period (apps/ops/sweep.py), and the usage meter charges the new one alone.
        if not rows.update(
            bundle=stored, bundle_bytes=size, bundle_sha256=sha256, int8_status=status, int8=check.to_json()
        ):
            delete_quietly(stored)  # the model went (or changed) meanwhile
        log.info("model %s: int8 %s (%s)", model.pk, status, check.reason)
    except MLError as exc:
        rows.update(int8_status=TrainedModel.Int8.FAILED, int8={"error": exc.message})
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.exception("model %s: the int8 step failed (incident %s)", model.pk, incident)
        error = f"Making the int8 model failed unexpectedly (incident {incident}); it serves in fp32."
        rows.update(int8_status=TrainedModel.Int8.FAILED, int8={"error": error})
