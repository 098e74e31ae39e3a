"""Restore a backup (apps.ops.backup) into this deployment, replacing what it holds.

The database is replaced in one transaction: wiped, loaded, its row counts checked against the
manifest, and the work that was in flight when the backup was made settled. If any of that fails,
the database is as it was and storage is untouched. Then storage is wiped and every object is
written back and read back, each checked against its SHA-256.

Work in flight at backup time cannot go on: its broker messages and its worker's scratch files
were not in the backup. So training jobs and batch predictions that were queued or running, and
datasets still being processed, are marked failed with a sentence saying so; their owners start
them again (nothing they had is lost: datasets, models and finished results are all restored).
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
import tempfile
import time
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from django.core.management import call_command
from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone
from tqdm import tqdm

from apps.common.storage import delete_prefix, open_stream, save_stream
from apps.ops.archive import (
    DATABASE,
    FORMAT,
    MANIFEST,
    STORAGE,
    VERSION,
    HashingReader,
    StoredEntry,
    delete_stored,
    migration_state,
    row_counts,
    sha256_of,
    stored_objects,
    user_rows,
)
from apps.ops.backup import BackupError

if TYPE_CHECKING:
    from apps.datasets.models import Dataset
    from apps.serving.models import BatchPrediction
    from apps.training.models import Job

IN_FLIGHT = (
    "{what} was {state} when the backup this server was restored from was made, and work in "
    "progress is not part of a backup. {again}"
)


def backup_restore(*, path: Path, force: bool = False, progress: bool = True) -> dict[str, Any]:
    """Replace this deployment's database and storage with the backup at `path`; returns the summary."""
    started = time.monotonic()
    try:
        tar = tarfile.open(path, "r:")
    except (OSError, tarfile.TarError) as exc:
        raise BackupError(f"{path} cannot be read as a Graft backup: {exc}") from None
    with tar:
        manifest = _read_manifest(tar, path)
        _check_migrations(manifest["database"]["migrations"])
        in_use, stored = user_rows(), stored_objects()
        if (in_use or stored) and not force:
            raise BackupError(
                f"This deployment is not empty ({sum(in_use.values())} rows in {len(in_use)} tables, "
                f"{len(stored)} stored objects). A restore replaces all of it: run again with --force."
            )
        with transaction.atomic():
            if in_use:
                call_command("flush", interactive=False, verbosity=0)
            _load_database(tar, manifest)
            settled, checkpoints = _settle_in_flight()
        delete_stored(stored)
        objects = _restore_objects(tar, manifest["storage"]["objects"], progress)
    for prefix in checkpoints:
        delete_prefix(prefix)  # the checkpoints of jobs that will not resume
    return {
        "restored_from": str(path),
        "backup_created_at": manifest["created_at"],
        "database": {"rows": sum(manifest["database"]["rows"].values()), "replaced_rows": sum(in_use.values())},
        "storage": {**objects, "replaced_objects": len(stored)},
        "in_flight_failed": settled,
        "seconds": round(time.monotonic() - started, 1),
    }


def _read_manifest(tar: tarfile.TarFile, path: Path) -> dict[str, Any]:
    try:
        member = tar.extractfile(MANIFEST)
        manifest = json.load(member) if member else None
    except (KeyError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError(f"{path} is not a Graft backup (no {MANIFEST} of format {FORMAT!r} in it).")
    if manifest.get("version") != VERSION:
        raise BackupError(f"{path} is a version {manifest.get('version')} backup; this Graft reads version {VERSION}.")
    return manifest


def _member(tar: tarfile.TarFile, name: str) -> IO[bytes]:
    try:
        reader = tar.extractfile(name)
    except KeyError:
        reader = None
    if reader is None:
        raise BackupError(f"The backup's manifest lists {name}, but the backup does not hold it.")
    return reader


def _check_migrations(backup: dict[str, list[str]]) -> None:
    """A backup loads into the schema it was made from: the same migrations applied."""
    here = migration_state()
    if here == backup:
        return
    apps = sorted(set(here) | set(backup))
    diff = ", ".join(
        f"{app}: backup {(backup.get(app) or ['none'])[-1]}, database {(here.get(app) or ['none'])[-1]}"
        for app in apps
        if backup.get(app) != here.get(app)
    )
    raise BackupError(
        f"The backup was made at another migration state than this database's ({diff}). Restore it with "
        "the Graft version that made it (after `manage.py migrate`), then upgrade as usual."
    )


def _load_database(tar: tarfile.TarFile, manifest: dict[str, Any]) -> None:
    expected = manifest["database"]
    with tempfile.TemporaryDirectory(prefix="graft-restore-") as scratch:
        dump = Path(scratch) / DATABASE  # loaddata reads the format and the compression off the name
        hashing = HashingReader(_member(tar, DATABASE))
        with dump.open("wb") as fh:
            shutil.copyfileobj(hashing, fh, 1024 * 1024)
        if hashing.sha256 != expected["sha256"]:
            raise BackupError(f"{DATABASE} in the backup is damaged (its SHA-256 is not the manifest's).")
        call_command("loaddata", str(dump), verbosity=0, stdout=io.StringIO())
    counts = row_counts()
    wrong = {label: (n, counts.get(label, 0)) for label, n in expected["rows"].items() if counts.get(label, 0) != n}
    if wrong:
        detail = ", ".join(f"{label}: {n} in the backup, {got} loaded" for label, (n, got) in sorted(wrong.items()))
        raise BackupError(f"The database did not load whole ({detail}); nothing was changed.")


def _settle_in_flight() -> tuple[dict[str, list[int]], list[str]]:
    """Fail what was queued or running at backup time, with a sentence its owner reads (see the module).
    Returns the ids failed, by kind, and the checkpoint prefixes of the jobs failed (to delete)."""
    from apps.datasets.models import Dataset
    from apps.serving.models import BatchPrediction
    from apps.training.models import Job

    now = timezone.now()
    jobs = Job.objects.filter(status__in=[Job.Status.QUEUED, Job.Status.RUNNING])
    checkpoints = [job.storage_prefix for job in jobs]
    job_ids = _fail(jobs, "This training job", "Start it again.", phase="failed", finished_at=now, checkpoint="")
    datasets = Dataset.objects.filter(status=Dataset.Status.PROCESSING)
    dataset_ids = _fail(datasets, "This dataset", "Upload it again.")
    batches = BatchPrediction.objects.filter(status__in=[BatchPrediction.Status.QUEUED, BatchPrediction.Status.RUNNING])
    batch_ids = _fail(batches, "This batch prediction", "Submit it again.", finished_at=now)
    return {"jobs": job_ids, "datasets": dataset_ids, "batches": batch_ids}, checkpoints


def _fail(
    rows: QuerySet[Job] | QuerySet[Dataset] | QuerySet[BatchPrediction], what: str, again: str, **fields: object
) -> list[int]:
    """Mark `rows` (each model's own "failed" status) failed, saying why; returns their ids."""
    ids = []
    for pk, state in rows.order_by("pk").values_list("pk", "status"):
        error = IN_FLIGHT.format(what=what, state="being processed" if state == "processing" else state, again=again)
        rows.filter(pk=pk).update(status="failed", error=error, **fields)
        ids.append(pk)
    return ids


def _restore_objects(tar: tarfile.TarFile, objects: list[StoredEntry], progress: bool) -> dict[str, int]:
    """Write every object back to storage, then read it back: each must match its SHA-256."""
    damaged: list[str] = []
    total = sum(o["size"] for o in objects)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, mininterval=1) as bar:
        for obj in objects:
            name, expected = obj["name"], obj["sha256"]
            hashing = HashingReader(_member(tar, STORAGE + name), bar.update)
            saved = save_stream(name, hashing)
            if saved != name:
                raise BackupError(f"Storage saved {name} as {saved}; restore needs storage that keeps names.")
            if hashing.sha256 != expected:
                damaged.append(f"{name} (damaged in the backup)")
                continue
            with open_stream(name) as stored:
                if sha256_of(stored) != (expected, obj["size"]):
                    damaged.append(f"{name} (storage returned other bytes)")
    if damaged:
        shown = "; ".join(damaged[:10]) + ("; ..." if len(damaged) > 10 else "")
        raise BackupError(f"{len(damaged)} of {len(objects)} stored objects failed their SHA-256 check: {shown}")
    return {"objects": len(objects), "bytes": total, "verified": len(objects)}
