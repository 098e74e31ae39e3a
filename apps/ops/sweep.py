"""The sweeper: stored objects no row owns, S3 multipart uploads a crashed host left, and this
host's unpacked bundles of models that are gone or unused.

Every writer stores its file first and creates (or updates) the row that owns it after, so a
crash in between leaves a file nobody owns. Those are removed here once they are older than
GRAFT_SWEEP_GRACE_HOURS: a younger file may belong to a request or a task still on its way to its
row. `manage.py sweep` runs it (beat too, hourly) and reports what it removed.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, TypedDict

from django.conf import settings
from django.core.files.storage import default_storage
from django.utils import timezone

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stored:
    name: str  # the storage name (relative to the storage's root)
    size: int
    modified: datetime


class Removed(TypedDict):
    name: str
    bytes: int
    why: str


@dataclass
class SweepReport:
    removed: list[Removed] = field(default_factory=list)
    removed_bytes: int = 0
    kept_young: int = 0  # unowned, but inside the grace period
    multipart_aborted: int = 0
    scratch_removed: list[str] = field(default_factory=list)
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def stored_objects() -> Iterator[Stored]:
    """Every object in storage, with its size and time, on either backend."""
    bucket = getattr(default_storage, "bucket", None)
    if bucket is not None:
        location = getattr(default_storage, "location", "")
        prefix = f"{location.strip('/')}/" if location else ""
        for obj in bucket.objects.filter(Prefix=prefix):
            if not obj.key.endswith("/"):
                yield Stored(obj.key[len(prefix) :], obj.size, obj.last_modified)
        return
    root = Path(settings.MEDIA_ROOT)
    for folder, _, files in os.walk(root):
        for name in files:
            path = Path(folder) / name
            try:
                st = path.stat()
            except FileNotFoundError:  # removed meanwhile
                continue
            modified = datetime.fromtimestamp(st.st_mtime, tz=timezone.get_current_timezone())
            yield Stored(path.relative_to(root).as_posix(), st.st_size, modified)


def _owned() -> tuple[tuple[str, ...], tuple[str, ...], set[str]]:
    """What rows own: (whole folders, folders inside those that are owned file by file, files)."""
    from apps.datasets.models import Dataset, Upload
    from apps.serving.batches import batch_thumb_name
    from apps.serving.models import BatchPrediction, PredictionRecord, TrainedModel
    from apps.training.models import Job

    whole = set(Dataset.objects.values_list("storage_prefix", flat=True))
    models = list(TrainedModel.objects.values_list("storage_prefix", "bundle"))
    whole.update(prefix for prefix, _ in models)
    # Kept prediction images are owned by their records; bundles by their model, which names one: a
    # bundle the int8 step replaced stays for the grace period (a request may have read the row just
    # before), then goes.
    by_file = {f"{prefix}{part}" for prefix, _ in models for part in ("inputs/", "bundle")}
    files = set(PredictionRecord.objects.exclude(image="").values_list("image", flat=True))
    files.update(bundle for _, bundle in models)
    for batch in BatchPrediction.objects.only(
        "storage_prefix", "attempts", "archive", "results_csv", "results_json", "thumbnails"
    ):
        files.update(n for n in (batch.archive, batch.results_csv, batch.results_json) if n)
        files.update(batch_thumb_name(batch, f) for f in batch.thumbnails)  # those of the attempt that ended it
    for pk, parts in Upload.objects.values_list("pk", "parts"):
        whole.add(f"uploads/{pk.hex}/")  # a part being written is not listed yet
        files.update(parts)
    # A running job's checkpoint is stored before the row names it; a finished job owns none; a job
    # re-queued after its worker was lost keeps the one it names, for the worker that goes on from it.
    whole.update(f"jobs/{pk}/" for pk in Job.objects.filter(status=Job.Status.RUNNING).values_list("pk", flat=True))
    files.update(Job.objects.exclude(checkpoint="").values_list("checkpoint", flat=True))
    return tuple(sorted(whole)), tuple(sorted(by_file)), files


def _why_unowned(name: str) -> str:
    top = name.split("/", 1)[0]
    return {
        "datasets": "dataset deleted or never created",
        "models": "model deleted, never created, a bundle it replaced, or a prediction image no record names",
        "batches": "batch deleted, or written by an attempt that did not finish it",
        "jobs": "checkpoint of a job that is not running",
        "uploads": "upload finished, abandoned or expired",
    }.get(top, "no row owns it")


def sweep_storage(report: SweepReport, *, grace: timedelta) -> None:
    from apps.serving.models import TrainedModel

    whole, by_file, files = _owned()
    # The rows are read first: an object stored after that is younger than the grace period.
    cutoff = timezone.now() - grace
    # A bundle the int8 step replaced gets its grace from the replacement, not from its own age.
    replaced = tuple(
        f"{prefix}bundle"
        for prefix in TrainedModel.objects.filter(int8_at__gt=cutoff).values_list("storage_prefix", flat=True)
    )
    for obj in stored_objects():
        if obj.name in files or (obj.name.startswith(whole) and not obj.name.startswith(by_file)):
            continue
        if obj.modified > cutoff or obj.name.startswith(replaced):
            report.kept_young += 1
            continue
        report.removed.append({"name": obj.name, "bytes": obj.size, "why": _why_unowned(obj.name)})
        report.removed_bytes += obj.size
        if not report.dry_run:
            default_storage.delete(obj.name)


def abort_stale_multipart(report: SweepReport, *, grace: timedelta) -> None:
    """S3 multipart uploads begun before the grace period and never completed (their host crashed
    mid-write): their parts are stored and billed, but no object shows them."""
    bucket = getattr(default_storage, "bucket", None)
    if bucket is None:
        return
    cutoff = timezone.now() - grace
    for upload in bucket.multipart_uploads.all():
        if upload.initiated < cutoff:
            report.multipart_aborted += 1
            if not report.dry_run:
                upload.abort()


SCRATCH_GRACE_S = 24 * 3600  # a gathered version lives as long as one job or finders run


def _sweep_gathered_versions(report: SweepReport) -> None:
    """Zips a worker gathered a dataset version into (apps.datasets.versions.version_archive) and
    could not remove: it was killed. A day old, no job or finders run still reads them."""
    import time

    for entry in sorted(Path(settings.GRAFT_WORK_DIR).glob("version-*.zip")):
        if time.time() - entry.stat().st_mtime < SCRATCH_GRACE_S:
            continue
        report.scratch_removed.append(entry.name)
        if not report.dry_run:
            entry.unlink(missing_ok=True)


def sweep_scratch(report: SweepReport) -> None:
    """This host's unpacked bundles (GRAFT_WORK_DIR/serving/<model id>-<sha>) of models deleted
    since (a live model's stays: a process may be loading it now), and dataset versions gathered
    into one zip by a worker that was killed before it removed it."""
    from apps.serving.models import TrainedModel

    _sweep_gathered_versions(report)
    folder = Path(settings.GRAFT_WORK_DIR) / "serving"
    if not folder.is_dir():
        return
    live = {f"{pk}-{sha[:16]}" for pk, sha in TrainedModel.objects.values_list("pk", "bundle_sha256")}
    for entry in sorted(folder.iterdir()):
        if entry.name in live or entry.name.startswith("."):
            continue
        report.scratch_removed.append(entry.name)
        if not report.dry_run:
            shutil.rmtree(entry, ignore_errors=True) if entry.is_dir() else entry.unlink(missing_ok=True)


def sweep(
    *, grace: timedelta | None = None, dry_run: bool = False, storage: bool = True, scratch: bool = True
) -> SweepReport:
    grace = timedelta(hours=settings.GRAFT_SWEEP_GRACE_HOURS) if grace is None else grace
    report = SweepReport(dry_run=dry_run)
    if storage:
        sweep_storage(report, grace=grace)
        abort_stale_multipart(report, grace=grace)
    if scratch:
        sweep_scratch(report)
    if report.removed or report.multipart_aborted or report.scratch_removed:
        log.info(
            "sweep: %s stored objects (%s bytes), %s multipart uploads, %s unpacked bundles%s",
            len(report.removed),
            report.removed_bytes,
            report.multipart_aborted,
            len(report.scratch_removed),
            " (dry run)" if dry_run else "",
        )
    return report
