"""Training jobs: create, claim, run, cancel, recover.

A job is claimed with a conditional UPDATE, so a duplicate delivery does
nothing; a worker heartbeat marks it alive, so a job whose worker died is
detected (`Job.is_stale`) and re-queued by `job_recover_stale`. The fine-tune
checkpoints to storage after each epoch, so the worker that takes a lost job
over goes on from its last epoch; after GRAFT_JOB_MAX_ATTEMPTS lost workers
the job fails with a reason instead of being handed on forever.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import TYPE_CHECKING, Any

from django.conf import settings
from django.contrib.auth.models import User
from django.core.files.storage import default_storage
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from apps.accounts.quotas import check_new_job, owner_locked
from apps.common import faults, work
from apps.common.archive_cache import stored_archive
from apps.common.errors import UserError
from apps.common.storage import delete_prefix, delete_quietly, local_copy
from apps.datasets.findings import load_embeddings
from apps.datasets.models import Dataset, DatasetVersion
from apps.datasets.selectors import dataset_index
from apps.datasets.versions import training_names, version_archive
from apps.training.models import Job, JobHistory
from ml.checkpoint import read_record, write_record
from ml.config import options_for
from ml.dataset import DatasetIndex
from ml.errors import Cancelled, MLError
from ml.report import json_safe

if TYPE_CHECKING:  # for their types only: ml.fit brings in torch
    from ml.fit import FitResult
    from ml.run import Progress

log = logging.getLogger(__name__)


class RetryLater(Exception):
    """The job looks alive elsewhere; check again once a heartbeat would have gone stale."""


# FitConfig fields a user may set, through the API and the web form (ml.config; the rest keep the engine's defaults).
USER_OPTIONS = tuple(o.name for o in options_for("user"))


def job_create(*, owner: User, dataset: Dataset, version: int | None = None, **options: Any) -> Job:
    """Queue training on a version of `dataset` (its newest ready one unless `version` names another)."""
    from ml.config import FitConfig

    if dataset.status != Dataset.Status.READY:
        state = "is still being processed" if dataset.status == Dataset.Status.PROCESSING else "failed to process"
        raise UserError(f"Dataset '{dataset.name}' {state}; train on a ready dataset.", status_code=409)
    unknown = set(options) - set(USER_OPTIONS)
    if unknown:
        raise UserError(f"Unknown option(s): {', '.join(sorted(unknown))}.")
    config = FitConfig(**{k: v for k, v in options.items() if v is not None})
    try:
        config.validate()
    except MLError as exc:
        raise UserError(exc.message) from None
    with transaction.atomic():  # parallel requests queue on the owner's lock: none passes the cap
        owner_locked(owner)
        if not Dataset.objects.filter(pk=dataset.pk, status=Dataset.Status.READY).exists():
            raise UserError(f"Dataset '{dataset.name}' was deleted meanwhile.", status_code=409)
        check_new_job(owner)
        trained_on = _version_for_job(dataset, version)
        job = Job.objects.create(
            owner=owner,
            dataset=dataset,
            version=trained_on,
            config={k: getattr(config, k) for k in USER_OPTIONS},
        )
        transaction.on_commit(lambda: _enqueue(job.pk), robust=True)  # lost: beat sends it again
    return job


def job_retrain(*, job: Job) -> Job:
    """Train again with `job`'s options, on its dataset's newest version (one click after relabelling,
    adding images, a cancel or a failure)."""
    if job.dataset is None:
        raise UserError(f"The dataset of job {job.pk} was deleted; there is nothing to train on.", status_code=409)
    options = {k: v for k, v in job.config.items() if k in USER_OPTIONS}
    return job_create(owner=job.owner, dataset=job.dataset, **options)


def _version_for_job(dataset: Dataset, number: int | None) -> DatasetVersion | None:
    versions = dataset.versions.filter(status=DatasetVersion.Status.READY)
    if number is None:
        return versions.order_by("-number").first()
    chosen = versions.filter(number=number).first()
    if chosen is None:
        raise UserError(f"Dataset '{dataset.name}' has no ready version {number}.", status_code=400)
    return chosen


def _enqueue(job_id: int, countdown: float = 0) -> None:
    from apps.training.tasks import train_job

    train_job.apply_async((job_id,), countdown=countdown or None)


def job_cancel(*, job: Job) -> Job:
    updated = Job.objects.filter(pk=job.pk, status__in=[Job.Status.QUEUED, Job.Status.RUNNING]).update(
        status=Job.Status.CANCELLED, finished_at=timezone.now(), phase="cancelled", checkpoint=""
    )
    job.refresh_from_db()
    if not updated and job.status != Job.Status.CANCELLED:
        raise UserError(f"Job {job.pk} already {job.status}; there is nothing to cancel.", status_code=409)
    delete_prefix(job.storage_prefix)  # its checkpoints (a worker still writing one deletes its own)
    return job


LOST_TOO_OFTEN = (
    "The worker training this job stopped {attempts} times without finishing (killed, out of memory, "
    "or the machine was lost), so it was not handed to another worker again. "
    "Try a smaller budget or fewer epochs, or ask the operators to check the GPU workers."
)


def _drop_checkpoints(job: Job) -> None:
    Job.objects.filter(pk=job.pk).update(checkpoint="", phase="failed")
    delete_prefix(job.storage_prefix)


TRAINING = work.register(
    work.Kind(
        name="training",
        model=Job,
        queued=Job.Status.QUEUED,
        running=Job.Status.RUNNING,
        failed=Job.Status.FAILED,
        lost=LOST_TOO_OFTEN,
        enqueue=lambda pk, countdown=0: _enqueue(pk, countdown),
        on_lost=_drop_checkpoints,
        requeued={"phase": "requeued after a lost worker"},
    )
)


def gpu_kinds() -> list[work.Kind[Any]]:
    """The kinds of work on the `gpu` queue, which share its fair-share order."""
    from apps.serving.batches import BATCH

    return [TRAINING, BATCH]


def job_delete(*, job: Job) -> None:
    """Delete a finished job and its history; the model it made stays (it names the job no more)."""
    if job.status in (Job.Status.QUEUED, Job.Status.RUNNING):
        raise UserError(f"Job {job.pk} is still {job.status}; cancel it first, then delete it.", status_code=409)
    prefix = job.storage_prefix
    if not Job.objects.filter(pk=job.pk).exclude(status__in=[Job.Status.QUEUED, Job.Status.RUNNING]).delete()[0]:
        raise UserError(f"Job {job.pk} started meanwhile; cancel it first, then delete it.", status_code=409)
    delete_prefix(prefix)  # checkpoints, if a crash left any


def job_claim(*, job_id: int, redelivered: bool = False, worker: str = "") -> Job | None:
    """Take a job for this worker, or return None if there is none to run.

    A message on the training queue is a ticket, one per queued job, not an order to run that job:
    the worker takes the ticket's own job only when a lost worker left it running; otherwise it takes
    the fairest waiting job (`work.claim_fairest`), so one user's backlog cannot starve everyone else.
    Every queued job has a ticket of its own, so every queued job is taken by some ticket. A ticket
    that finds a batch prediction the fairest runs that (`gpu_ticket`); this returns jobs only.

    A job taken over from a worker that went silent keeps its history up to its last
    checkpoint (the fit goes on from there); one whose workers were lost too often fails.
    """
    job = work.claim(TRAINING, job_id, worker=worker, waiting=False)
    if job is None:
        picked = work.claim_fairest([TRAINING], worker=worker)
        job = picked[1] if picked else None
    if job is not None:
        if job.attempts > 1:
            _forget_after_checkpoint(job)
        return job
    if redelivered and Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).exists():
        raise RetryLater
    return None


def gpu_ticket(*, kind: work.Kind[Any], item_id: int, redelivered: bool = False, worker: str = "") -> None:
    """Run what one message on the `gpu` queue stands for: its own item when a lost worker left it
    running, else the fairest waiting training job or batch prediction of any user."""
    from apps.serving.batches import batch_run

    picked: tuple[work.Kind[Any], Any] | None = None
    if (item := work.claim(kind, item_id, worker=worker, waiting=False)) is not None:
        picked = (kind, item)
    else:
        picked = work.claim_fairest(gpu_kinds(), worker=worker)
    if picked is None:
        if redelivered and kind.rows().filter(pk=item_id, status=kind.running).exists():
            raise RetryLater
        return
    kind, item = picked
    if kind is TRAINING:
        if item.attempts > 1:
            _forget_after_checkpoint(item)
        job_run(job=item)
    else:
        batch_run(batch=item)


def _forget_after_checkpoint(job: Job) -> None:
    """History rows the lost worker wrote after its last checkpoint: the resumed fit writes them again."""
    rows = JobHistory.objects.filter(job=job)
    if job.checkpoint and job.checkpoint_history_id is not None:
        rows = rows.filter(pk__gt=job.checkpoint_history_id)
    rows.delete()


def job_recover_stale() -> list[int]:
    """Re-queue running jobs whose worker stopped heart-beating (or fail them when that happened
    too often). Returns the ids re-queued. (Beat runs `work.work_recover_stale` for every kind.)"""
    return work.work_recover_stale().get(TRAINING.name, [])


def job_run(*, job: Job) -> None:
    """Fit the claimed job and record the outcome. Never raises for job-level failures."""
    from ml.fit import FitConfig, Known, fit

    workdir = settings.GRAFT_WORK_DIR / "jobs" / str(job.pk)
    shutil.rmtree(workdir, ignore_errors=True)
    # Every write of this run names its attempt: once a worker that went silent has been replaced,
    # its writes (progress, checkpoints, the outcome, cleanup) match nothing and it stops.
    mine = Job.objects.filter(pk=job.pk, attempts=job.attempts)  # work.attempt_rows, any status
    recorder = _Recorder(job.pk, mine)
    config = FitConfig(**job.config, device=settings.GRAFT_DEVICE)
    try:
        dataset = job.dataset
        if dataset is None or dataset.status != Dataset.Status.READY:
            raise MLError("The dataset of this job was deleted or is not ready.")
        checkpoints = JobCheckpoints(job, recorder)
        with work.Heartbeat(work.attempt_rows(TRAINING, job), f"job-{job.pk}") as beat:
            recorder.cancelled = beat.lost
            with training_data(job, dataset) as (archive, index, about):
                faults.point("training.claimed")
                # The frozen features the finders measured when the version was made: read, not extracted.
                store = load_embeddings(dataset)
                known = Known(about=about, index=index, store=store)
                result = fit(archive, workdir, config, known=known, progress=recorder, checkpoints=checkpoints)
            origins = training_names(job.version) if job.version is not None else None
            _succeed(job, result, mine, origins)  # storing a large bundle takes a while: still beating
    except Cancelled:
        log.info("job %s cancelled (or taken over by another worker)", job.pk)
    except MLError as exc:
        _fail(job.pk, exc.message, mine)
    except Exception:
        incident = uuid.uuid4().hex[:8]
        log.exception("job %s failed (incident %s)", job.pk, incident)
        # The exception's text can name server paths and internals: it goes to the log, not the user.
        _fail(job.pk, f"Training failed unexpectedly (incident {incident}); the operators have the details.", mine)
    finally:
        # However this attempt ended the job, its checkpoints are done with. (A lost worker never
        # gets here; one that was replaced matches nothing and leaves them to its successor.)
        if mine.exclude(status=Job.Status.RUNNING).update(checkpoint=""):
            delete_prefix(job.storage_prefix)
        shutil.rmtree(workdir, ignore_errors=True)
        _release_gpu_memory()


@contextmanager
def training_data(job: Job, dataset: Dataset) -> Iterator[tuple[Path, DatasetIndex, dict[str, Any]]]:
    """The archive and index of the version the job trains on, and what its model card says of them."""
    version = job.version
    if version is None:  # a job made before versions: the dataset as it was uploaded
        with stored_archive(dataset.archive) as archive:
            yield archive, dataset_index(dataset=dataset), {"dataset": dataset.name}
        return
    about = {"dataset": dataset.name, "dataset_version": version.number, "dataset_version_hash": version.content_hash}
    with version_archive(version) as (archive, index):
        yield archive, index, about


def _release_gpu_memory() -> None:
    """A worker child lives on after the job: hand its cached GPU memory back to the other processes."""
    import torch

    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class JobCheckpoints:
    """The fine-tune's checkpoints in storage (ml.checkpoint.Checkpoints): written through local
    scratch, then recorded on the job with a conditional UPDATE, then the previous one deleted."""

    def __init__(self, job: Job, recorder: _Recorder) -> None:
        self.job, self.recorder = job, recorder

    def load(self) -> dict[str, Any] | None:
        name = Job.objects.filter(pk=self.job.pk).values_list("checkpoint", flat=True).first()
        if not name:
            return None
        try:
            with local_copy(name) as path, path.open("rb") as fh:
                return read_record(fh)
        except Exception:  # noqa: BLE001 - a checkpoint that cannot be read only costs the epochs it held
            log.exception("job %s: checkpoint %s unreadable; starting over", self.job.pk, name)
            self.discard(everything=True)
            return None

    def discard(self, everything: bool) -> None:
        """The fit will not go on from the checkpoint: the earlier attempt's rows it will send
        again go (all of them, or those of its fine-tune, when the measurements before it held)."""
        rows = JobHistory.objects.filter(job_id=self.job.pk)
        if not everything:
            rows = rows.filter(data__phase__in=["finetune", "search"])
        rows.delete()

    def save(self, record: dict[str, Any]) -> None:
        previous = Job.objects.filter(pk=self.job.pk).values_list("checkpoint", flat=True).first()
        epoch = record["state"]["epoch"]
        settings.GRAFT_WORK_DIR.mkdir(parents=True, exist_ok=True)
        with NamedTemporaryFile(dir=settings.GRAFT_WORK_DIR, suffix=".pt") as tmp:
            write_record(record, tmp)
            tmp.flush()
            tmp.seek(0)
            name = default_storage.save(f"{self.job.storage_prefix}checkpoint-{epoch}-{uuid.uuid4().hex[:8]}.pt", tmp)
        if not self.recorder.mine.filter(status=Job.Status.RUNNING).update(
            checkpoint=name, checkpoint_history_id=self.recorder.last_row_id
        ):
            delete_quietly(name)  # cancelled, or taken over by another worker, meanwhile
            raise Cancelled()
        if previous and previous != name:
            delete_quietly(previous)
        faults.point("training.checkpoint")


def _succeed(
    job: Job, result: FitResult, mine: QuerySet[Job], origins: dict[str, tuple[str, str]] | None = None
) -> None:
    from apps.serving.models import TrainedModel
    from apps.serving.quantization import int8_request
    from apps.serving.services import bundle_store, model_create
    from apps.training.gallery import gallery_store

    # The bundle is copied to storage and hashed first, outside any transaction.
    bundle = bundle_store(result.artifacts["bundle"])
    faults.point("training.bundle")
    try:
        metrics = result.metrics.to_json()
        gallery_store(prefix=bundle.prefix, dataset=job.dataset, metrics=metrics, origins=origins)  # never raises
        with transaction.atomic():
            updated = _mark_succeeded(mine, result)
            if updated:  # not cancelled in the meantime
                model = model_create(job=job, bundle=bundle, result=result)
    except BaseException:
        delete_prefix(bundle.prefix)
        raise
    if not updated:
        delete_prefix(bundle.prefix)
        return
    # Its int8 model, made next as a step of its own (it serves in fp32 meanwhile). After the commit:
    # whatever happens to it, the job has succeeded and its model is stored.
    if settings.GRAFT_INT8 and job.dataset_id is not None:
        try:
            int8_request(model=model)
        except UserError as refused:  # storage full: the model says why, and can be asked again once there is room
            TrainedModel.objects.filter(pk=model.pk, int8_status="").update(
                int8_status=TrainedModel.Int8.FAILED, int8={"error": refused.message}, int8_at=timezone.now()
            )
        except Exception:  # noqa: BLE001 - the model can be asked for its int8 version again
            log.exception("job %s: the int8 step of model %s was not queued", job.pk, model.pk)


# The parts of FitResult.to_json() a job keeps in its `report` (beside `strategy`, `metrics` and `timings`).
REPORT_FIELDS = ("sanity", "decisions", "hyperparameters", "lr_range", "log", "preprocessing", "device", "peak_rss_mib")


def _mark_succeeded(mine: QuerySet[Job], result: FitResult) -> int:
    data = result.to_json()
    return mine.filter(status=Job.Status.RUNNING).update(
        status=Job.Status.SUCCEEDED,
        finished_at=timezone.now(),
        phase="done",
        progress=1.0,
        strategy=data["strategy"],
        metrics=data["metrics"],
        timings=result.timings,
        # Every choice the engine measured (decisions: candidates, scores on the training split, reason).
        report={key: data[key] for key in REPORT_FIELDS},
        checkpoint="",
    )


def _fail(job_id: int, message: str, mine: QuerySet[Job] | None = None) -> None:
    jobs = mine if mine is not None else Job.objects.filter(pk=job_id)
    jobs.filter(status=Job.Status.RUNNING).update(
        status=Job.Status.FAILED, finished_at=timezone.now(), error=message, phase="failed"
    )


class _Recorder:
    """The fit's progress callback: stores history rows, progress and the log; stops on cancel.

    The job's `report` carries, while it runs, the log and `progress`: the step in words, its items,
    the engine's ETA (seconds of planned work left at the measured rates) and the notes that say
    why the plan grew (the job page shows them beside the ETA)."""

    min_interval = 0.5  # seconds between progress writes (history rows, notes and log lines always written)

    def __init__(self, job_id: int, mine: QuerySet[Job] | None = None) -> None:
        self.job_id = job_id
        self.mine = mine if mine is not None else Job.objects.filter(pk=job_id)  # this attempt's row
        self.cancelled = threading.Event()
        self._last = 0.0
        self.lines: list[str] = []
        self.notes: list[dict[str, Any]] = []
        self.progress: dict[str, Any] = {}
        self.last_row_id: int | None = None  # the newest history row written

    def _report(self) -> dict[str, Any]:
        return {"log": self.lines, "progress": {**self.progress, "notes": self.notes}}

    def __call__(self, event: Progress) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
        label = getattr(event, "label", "") or ""
        self.progress = {
            "step": event.phase,
            "label": label,
            "done": event.done,
            "total": event.total,
            "eta_s": getattr(event, "eta_s", None),
        }
        note = getattr(event, "note", None)
        if note:
            self.notes.append({"phase": event.phase, "text": note, "fraction": event.fraction})
        if event.message is not None or note:  # the log, live: the job page shows it while training runs
            if event.message is not None:
                self.lines.append(event.message)
            self.mine.filter(status=Job.Status.RUNNING).update(report=json_safe(self._report()))
            return
        now = time.monotonic()
        if event.row is None and now - self._last < self.min_interval and event.done < event.total:
            return
        self._last = now
        alive = self.mine.filter(status=Job.Status.RUNNING).update(
            phase=event.phase[:30],
            progress=event.fraction,
            heartbeat_at=timezone.now(),
            report=json_safe(self._report()),
        )
        if not alive:  # cancelled, or another worker took it over: it writes no more rows
            self.cancelled.set()
            raise Cancelled()
        if event.row is not None:
            step = event.row.get("step", event.row.get("epoch", 0))
            row = JobHistory.objects.create(job_id=self.job_id, step=step, phase=event.phase, data=json_safe(event.row))
            self.last_row_id = row.pk
