"""A model's int8 variant: made on a worker after its job succeeded, kept only where it holds.

The model serves in fp32 from the moment its job succeeds. `int8_request` queues the int8 step
(`serving.make_int8`, on the training hosts, where the dataset's archive is cached); the step
reads the dataset version the model was trained on, quantizes and tests the bundle's ONNX model
(ml.quantize), and stores the bundle again with the int8 model in it where it was kept, and with
the figures in its card either way. The new bundle replaces the old one only if the model still
has the bundle the step started from (it was not deleted, nor made again meanwhile); the serving
cache keys on the bundle's SHA-256, so the next prediction loads the new one. The old bundle stays
stored until the sweeper's grace period has passed, for whoever read the row just before.

Where it stands (`int8_status`): pending (queued), running (claimed by one worker, whose heartbeat
keeps `int8_at` fresh), then kept, refused or failed. A worker that went silent mid-step (killed,
out of memory) has its step failed by beat, not run again by itself: a model that kills its worker
would loop. A step still pending after `ASK_AGAIN_AFTER` (its message lost, or a long queue) can be
asked for again; a second message for one step finds it claimed and returns.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.core.files import File
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from apps.accounts.quotas import check_new_int8
from apps.common import faults, work
from apps.common.errors import UserError
from apps.common.storage import delete_quietly, local_copy
from apps.serving.models import TrainedModel
from ml.errors import MLError
from ml.predict import int8_served

log = logging.getLogger(__name__)

ASK_AGAIN_AFTER = timedelta(minutes=10)  # pending this long, the step can be asked for again


def int8_request(*, model: TrainedModel) -> TrainedModel:
    """Queue the model's int8 step; the model serves in fp32 meanwhile. A step on its way is left to
    finish (asked again, the model comes back as it is); one made already is not made twice (409); none
    is queued while its owner's storage is full (413)."""
    from apps.serving.tasks import make_int8

    if model.job is None or model.job.dataset is None:
        raise UserError(
            "The int8 model is made from the dataset this model was trained on, and that job or dataset was deleted.",
            status_code=409,
        )
    Int8 = TrainedModel.Int8
    if model.int8_status in (Int8.KEPT, Int8.REFUSED):
        raise UserError(f"Its int8 version was made already. {model.int8.get('reason', '')}".strip(), status_code=409)
    if model.int8_status == Int8.RUNNING or (model.int8_status == Int8.PENDING and not int8_waited_long(model)):
        return model
    check_new_int8(model.owner)
    now = timezone.now()
    asked = TrainedModel.objects.filter(pk=model.pk, int8_status=model.int8_status)  # not claimed meanwhile
    if not asked.update(int8_status=Int8.PENDING, int8={}, int8_at=now):
        model.refresh_from_db()
        return model

    def enqueue() -> None:
        try:
            make_int8.delay(model.pk)
        except Exception:  # the broker unreachable: say so, and leave the model askable again
            log.exception("model %s: the int8 step could not be queued", model.pk)
            error = "The task queue could not be reached, so the int8 model was not queued; try again in a minute."
            TrainedModel.objects.filter(pk=model.pk, int8_status=Int8.PENDING).update(
                int8_status=Int8.FAILED, int8={"error": error}, int8_at=timezone.now()
            )

    transaction.on_commit(enqueue)
    model.refresh_from_db()
    return model


def int8_waited_long(model: TrainedModel) -> bool:
    """Pending for longer than a step waits in a working queue: it may be asked for again."""
    return (
        model.int8_status == TrainedModel.Int8.PENDING
        and model.int8_at is not None
        and timezone.now() - model.int8_at > ASK_AGAIN_AFTER
    )


def int8_not_served_here(model: TrainedModel) -> str | None:
    """Why this server answers a model whose int8 version was kept in fp32, in a sentence; None where
    it serves the int8 version (or none was kept)."""
    if model.int8_status != TrainedModel.Int8.KEPT:
        return None
    if settings.GRAFT_SERVE_PRECISION == "fp32" or settings.GRAFT_SERVE_RUNTIME == "torchscript":
        return "This server is set to serve fp32 models (GRAFT_SERVE_PRECISION or GRAFT_SERVE_RUNTIME)."
    if not int8_served(model.int8):
        tester = (
            "the worker that tested the int8 version added them exactly"
            if "arithmetic" in model.int8
            else "the int8 version was tested before Graft recorded how the tester's CPU multiplies, and is taken "
            "to have been tested on one that adds them exactly (VNNI)"
        )
        return (
            f"This server's CPU (an x86 CPU without VNNI) adds int8 products in 16 bits, which saturate; {tester}, "
            "so here it could answer otherwise. The bundle's predict.py decides the same way on the machine it "
            "runs on (--precision int8 runs the int8 version anyway)."
        )
    return None


def int8_recover_stale() -> list[int]:
    """Steps whose worker went silent fail with a sentence (beat); the model serves in fp32 and the
    step can be asked for again."""
    before = timezone.now() - timedelta(seconds=settings.GRAFT_JOB_STALE_SECONDS)
    stale = TrainedModel.objects.filter(int8_status=TrainedModel.Int8.RUNNING, int8_at__lt=before)
    ids = list(stale.values_list("pk", flat=True))
    error = (
        "The worker making the int8 model stopped before it finished (killed, or out of memory); "
        "the model serves in fp32. Try again."
    )
    stale.filter(pk__in=ids).update(int8_status=TrainedModel.Int8.FAILED, int8={"error": error}, int8_at=timezone.now())
    return ids


def int8_run(*, model_id: int) -> None:
    """The int8 step for one model. Never raises for the model's own failures: they are recorded."""
    from apps.datasets.models import Dataset
    from apps.serving.services import file_sha256
    from apps.training.services import training_data
    from ml.config import FitConfig
    from ml.quantize import quantize_bundle_zip

    Int8 = TrainedModel.Int8
    # Claimed by one worker: a second message for the step (asked again, redelivered) finds it taken.
    if not TrainedModel.objects.filter(pk=model_id, int8_status=Int8.PENDING).update(
        int8_status=Int8.RUNNING, int8_at=timezone.now()
    ):
        return
    model = TrainedModel.objects.select_related("job", "job__dataset", "job__version").get(pk=model_id)
    mine = TrainedModel.objects.filter(pk=model.pk, int8_status=Int8.RUNNING)
    rows = mine.filter(bundle=model.bundle)  # the bundle this step starts from
    try:
        job, dataset = model.job, model.job.dataset if model.job else None
        if job is None or dataset is None:
            raise MLError("The job or the dataset this model was trained on was deleted.")
        if dataset.status != Dataset.Status.READY:
            raise MLError("The dataset this model was trained on is not ready; try again once it is.")
        config = FitConfig(**job.config)
        work_dir = Path(settings.GRAFT_WORK_DIR) / "int8"
        work_dir.mkdir(parents=True, exist_ok=True)
        with (
            work.Heartbeat(mine, f"int8-{model.pk}", field="int8_at"),
            tempfile.TemporaryDirectory(dir=work_dir) as tmp,
            training_data(job, dataset) as (archive, index, _),
            local_copy(model.bundle) as bundle,
        ):
            faults.point("int8.running")
            # The data must be what the model trained on: ml.quantize checks the card's data hash (a
            # version deleted since would leave the job its upload), and splits by the job's seed.
            new_zip, check = quantize_bundle_zip(
                bundle, Path(tmp), archive, index, val_fraction=config.val_fraction, seed=config.seed
            )
            with new_zip.open("rb") as fh:
                stored = default_storage.save(f"{model.storage_prefix}bundle-{uuid.uuid4().hex[:8]}.zip", File(fh))
            size, sha256 = new_zip.stat().st_size, file_sha256(new_zip)
        status = Int8.KEPT if check.kept else Int8.REFUSED
        # The old bundle is left where it is: a request or a download that read the row just before this
        # update fetches it still. No row names it any more, so the sweeper removes it once `int8_at` and
        # the file are past its grace period (apps/ops/sweep.py); the usage meter charges the new one alone.
        if not rows.update(
            bundle=stored,
            bundle_bytes=size,
            bundle_sha256=sha256,
            int8_status=status,
            int8=check.to_json(),
            int8_at=timezone.now(),
        ):
            delete_quietly(stored)  # the model went (or changed, or beat failed the step) meanwhile
        log.info("model %s: int8 %s (%s)", model.pk, status, check.reason)
    except MLError as exc:
        mine.update(int8_status=Int8.FAILED, int8={"error": exc.message}, int8_at=timezone.now())
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.exception("model %s: the int8 step failed (incident %s)", model.pk, incident)
        error = f"Making the int8 model failed unexpectedly (incident {incident}); it serves in fp32."
        mine.update(int8_status=Int8.FAILED, int8={"error": error}, int8_at=timezone.now())
