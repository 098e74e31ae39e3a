"""Training jobs: create, claim, run, cancel, recover.

A job is claimed with a conditional UPDATE, so a duplicate delivery does
nothing; a worker heartbeat marks it alive, so a job whose worker died is
detected (`Job.is_stale`) and re-queued by `job_recover_stale`.
"""

from __future__ import annotations

import logging
import math
import shutil
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import close_old_connections, connection, transaction
from django.db.models import F
from django.utils import timezone

from apps.common.errors import UserError
from apps.common.storage import local_copy
from apps.datasets.models import Dataset
from apps.datasets.selectors import dataset_index
from apps.training.models import Job, JobHistory
from ml.errors import Cancelled, MLError

log = logging.getLogger(__name__)


def json_safe(value):
    """NaN and infinities (a CV score with one image per class, a diverged loss) become null:
    JSON has no such numbers, and PostgreSQL and SQLite both refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class RetryLater(Exception):
    """The job looks alive elsewhere; check again once a heartbeat would have gone stale."""


# FitConfig fields a user may set through the API (everything else keeps the engine's default).
USER_OPTIONS = ("strategy", "backbone", "seed", "budget", "max_epochs", "hflip", "lr_find")


def job_create(*, owner: AbstractBaseUser, dataset: Dataset, **options) -> Job:
    from ml.fit import FitConfig

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
    with transaction.atomic():
        job = Job.objects.create(
            owner=owner,
            dataset=dataset,
            config={k: getattr(config, k) for k in USER_OPTIONS},
        )
        transaction.on_commit(lambda: _enqueue(job.pk))
    return job


def _enqueue(job_id: int) -> None:
    from apps.training.tasks import train_job

    train_job.delay(job_id)


def job_cancel(*, job: Job) -> Job:
    updated = Job.objects.filter(pk=job.pk, status__in=[Job.Status.QUEUED, Job.Status.RUNNING]).update(
        status=Job.Status.CANCELLED, finished_at=timezone.now(), phase="cancelled"
    )
    job.refresh_from_db()
    if not updated and job.status != Job.Status.CANCELLED:
        raise UserError(f"Job {job.pk} already {job.status}; there is nothing to cancel.", status_code=409)
    return job


def job_claim(*, job_id: int, redelivered: bool = False) -> Job | None:
    """Take the job for this worker, or return None if it is not ours to run."""
    now = timezone.now()
    claim = dict(
        status=Job.Status.RUNNING,
        started_at=now,
        heartbeat_at=now,
        attempts=F("attempts") + 1,
        phase="starting",
        progress=0.0,
        error="",
    )
    if Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).update(**claim):
        return Job.objects.get(pk=job_id)
    stale_before = now - timedelta(seconds=settings.GRAFT_JOB_STALE_SECONDS)
    if Job.objects.filter(pk=job_id, status=Job.Status.RUNNING, heartbeat_at__lt=stale_before).update(**claim):
        log.warning("job %s: previous worker went silent; restarting it", job_id)
        JobHistory.objects.filter(job_id=job_id).delete()
        return Job.objects.get(pk=job_id)
    if redelivered and Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).exists():
        raise RetryLater
    return None


def job_recover_stale() -> list[int]:
    """Re-queue running jobs whose worker stopped heart-beating. Returns their ids."""
    stale_before = timezone.now() - timedelta(seconds=settings.GRAFT_JOB_STALE_SECONDS)
    recovered = []
    for job in Job.objects.filter(status=Job.Status.RUNNING, heartbeat_at__lt=stale_before):
        if Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, heartbeat_at=job.heartbeat_at).update(
            status=Job.Status.QUEUED, phase="requeued after a lost worker"
        ):
            recovered.append(job.pk)
            transaction.on_commit(lambda pk=job.pk: _enqueue(pk))
    return recovered


def job_run(*, job: Job) -> None:
    """Fit the claimed job and record the outcome. Never raises for job-level failures."""
    from ml.fit import FitConfig, fit

    workdir = settings.GRAFT_WORK_DIR / "jobs" / str(job.pk)
    shutil.rmtree(workdir, ignore_errors=True)
    recorder = _Recorder(job.pk)
    try:
        dataset = job.dataset
        if dataset is None or dataset.status != Dataset.Status.READY:
            raise MLError("The dataset of this job was deleted or is not ready.")
        index = dataset_index(dataset=dataset)
        with _Heartbeat(job.pk, recorder.cancelled), local_copy(dataset.archive) as archive:
            result = fit(archive, workdir, FitConfig(**job.config), index=index, progress=recorder)
        _succeed(job, result)
    except Cancelled:
        log.info("job %s cancelled", job.pk)
    except MLError as exc:
        _fail(job.pk, exc.message)
    except Exception as exc:
        log.exception("job %s failed", job.pk)
        _fail(job.pk, f"Training failed: {exc.__class__.__name__}: {exc}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _succeed(job: Job, result) -> None:
    from apps.serving.services import model_create

    with transaction.atomic():
        updated = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(
            status=Job.Status.SUCCEEDED,
            finished_at=timezone.now(),
            phase="done",
            progress=1.0,
            strategy=json_safe(result.strategy),
            metrics=json_safe(result.metrics),
            timings=result.timings,
            report=json_safe(
                {
                    "sanity": result.sanity,
                    # Every choice the engine measured (candidates, scores on the training split, reason).
                    "decisions": result.decisions,
                    "hyperparameters": result.hyperparameters,
                    "lr_range": result.lr_range,
                    "log": result.log,
                    "preprocessing": result.preprocessing,
                    "device": result.device,
                    "peak_rss_mib": result.peak_rss_mib,
                }
            ),
        )
        if updated:  # not cancelled in the meantime
            model_create(job=job, bundle_path=result.artifacts["bundle"], result=result)


def _fail(job_id: int, message: str) -> None:
    Job.objects.filter(pk=job_id, status=Job.Status.RUNNING).update(
        status=Job.Status.FAILED, finished_at=timezone.now(), error=message, phase="failed"
    )


class _Recorder:
    """The fit's progress callback: stores history rows and progress; stops on cancel."""

    min_interval = 0.5  # seconds between progress writes (history rows always written)

    def __init__(self, job_id: int) -> None:
        self.job_id = job_id
        self.cancelled = threading.Event()
        self._last = 0.0
        self.lines: list[str] = []

    def __call__(self, event) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
        if event.message is not None:  # the log, live: the job page shows it while training runs
            self.lines.append(event.message)
            Job.objects.filter(pk=self.job_id, status=Job.Status.RUNNING).update(report={"log": self.lines})
            return
        if event.row is not None:
            step = event.row.get("step", event.row.get("epoch", 0))
            JobHistory.objects.create(job_id=self.job_id, step=step, phase=event.phase, data=json_safe(event.row))
        now = time.monotonic()
        if event.row is None and now - self._last < self.min_interval and event.done < event.total:
            return
        self._last = now
        alive = Job.objects.filter(pk=self.job_id, status=Job.Status.RUNNING).update(
            phase=event.phase, progress=event.fraction, heartbeat_at=timezone.now()
        )
        if not alive:
            self.cancelled.set()
            raise Cancelled()


class _Heartbeat:
    """Background thread proving the worker is alive while long steps run without progress."""

    def __init__(self, job_id: int, cancelled: threading.Event) -> None:
        self.job_id = job_id
        self.cancelled = cancelled
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        try:
            while not self._stop.wait(settings.GRAFT_HEARTBEAT_SECONDS):
                close_old_connections()
                alive = Job.objects.filter(pk=self.job_id, status=Job.Status.RUNNING).update(
                    heartbeat_at=timezone.now()
                )
                if not alive:
                    self.cancelled.set()
        except Exception:  # noqa: BLE001 - a missed heartbeat only makes the job look stale
            log.exception("heartbeat for job %s failed", self.job_id)
        finally:
            connection.close()
