"""Backup → wipe → restore: the same model answers the same predictions, and nothing is lost.

Real PostgreSQL, the real HTTP API (live_server), the storage API; the management commands as an
operator runs them (`manage.py backup OUT`, `manage.py restore IN [--force]`).
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.core.management.base import CommandError
from django.utils import timezone

from apps.common.storage import open_stream, save_stream
from apps.datasets.models import Dataset
from apps.ops.archive import MANIFEST, row_counts
from apps.training.models import Job
from tests.apps.conftest import stored_files
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery"


def run(command: str, *args: str) -> dict:
    """Run a management command; its last line of output is the JSON summary."""
    out = io.StringIO()
    call_command(command, *args, stdout=out, verbosity=0)
    return json.loads(out.getvalue().strip().splitlines()[-1])


def stored_digests() -> dict[str, str]:
    digests = {}
    for name in stored_files():
        with open_stream(name) as fh:
            digests[name] = hashlib.sha256(fh.read()).hexdigest()
    return digests


def forget_loaded_models() -> None:
    """This process's serving cache and unpacked bundles (host-local, not in a backup), as after a restart."""
    from apps.serving import cache

    with cache._lock:
        for entry in cache._loaded.values():
            entry.predictor.close()
        cache._loaded.clear()
    shutil.rmtree(settings.GRAFT_WORK_DIR / "serving", ignore_errors=True)


def predict(api, model_id: int, images: list[bytes]) -> list[list[dict]]:
    files = [("image", (f"{i}.png", data, "image/png")) for i, data in enumerate(images)]
    r = api.call("POST", f"/models/{model_id}/predict/", files=files, data={"k": "2"})
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def wipe() -> None:
    call_command("flush", interactive=False, verbosity=0)
    for name in stored_files():
        default_storage.delete(name)
    forget_loaded_models()


def test_backup_wipe_restore_answers_the_same(api_for, live_server, make_tiny_model, settings, tmp_path):
    settings.GRAFT_SERVE_RUNTIME = "torchscript"  # the same runtime before and after: equal scores
    forget_loaded_models()
    api = api_for("alice")
    from django.contrib.auth.models import User

    alice = User.objects.get(username="alice")
    dataset = Dataset.objects.create(owner=alice, name="pets", status=Dataset.Status.READY, num_images=12)
    archive = make_zip(tmp_path / "pets.zip", class_folders({"cat": 6, "dog": 6}))
    with archive.open("rb") as fh:
        dataset.archive = save_stream(f"{dataset.storage_prefix}archive.zip", fh)
    dataset.save()
    finished = Job.objects.create(owner=alice, dataset=dataset, status=Job.Status.SUCCEEDED)
    model = make_tiny_model(alice)
    model.job = finished
    model.save()
    # Work in flight at backup time: a running job with a checkpoint, and a queued one.
    running = Job.objects.create(
        owner=alice, dataset=dataset, status=Job.Status.RUNNING, attempts=1, heartbeat_at=timezone.now()
    )
    running.checkpoint = save_stream(f"{running.storage_prefix}epoch-3.pt", io.BytesIO(b"checkpoint" * 1000))
    running.save()
    queued = Job.objects.create(owner=alice, dataset=dataset)

    images = [
        image_bytes(color=c, size=(48, 40), seed=s) for s, c in enumerate([(200, 30, 30), (20, 90, 220), (5, 5, 5)])
    ]
    before = predict(api, model.pk, images)
    files_before = stored_digests()
    rows_before = row_counts()
    assert {dataset.archive, model.bundle, running.checkpoint} <= set(files_before)

    out = tmp_path / "graft.tar"
    made = run("backup", str(out))
    assert out.stat().st_mode & 0o077 == 0  # password hashes inside: only its owner reads it
    assert made["storage"] == {"objects": len(files_before), "bytes": made["storage"]["bytes"], "vanished": []}
    assert made["database"]["rows"] == sum(rows_before.values())
    with tarfile.open(out) as tar:  # any tar reads it; the manifest names every object with its SHA-256
        manifest = json.load(tar.extractfile(MANIFEST))
    assert {o["name"]: o["sha256"] for o in manifest["storage"]["objects"]} == files_before
    assert manifest["database"]["rows"] == rows_before

    wipe()
    assert stored_files() == set() and not User.objects.exists()
    assert api.call("POST", f"/models/{model.pk}/predict/", files=[("image", images[0])]).status_code in (401, 403)

    restored = run("restore", str(out))
    assert restored["storage"]["verified"] == len(files_before)
    assert restored["in_flight_failed"] == {"jobs": sorted([running.pk, queued.pk]), "datasets": [], "batches": []}

    # The same model id answers the same predictions, through the same token.
    assert predict(api, model.pk, images) == before
    # Every row is back, and every stored byte but the checkpoint of the job that will not resume.
    assert row_counts() == rows_before
    # The user signs in with their password.
    r = requests.post(
        f"{live_server.url}/api/v1/auth/token/", json={"username": "alice", "password": PASSWORD}, timeout=30
    )
    assert r.status_code == 200, r.text
    assert stored_digests() == {n: d for n, d in files_before.items() if n != running.checkpoint}
    assert Dataset.objects.get(pk=dataset.pk).archive == dataset.archive
    for job in Job.objects.filter(pk__in=[running.pk, queued.pk]):
        assert job.status == Job.Status.FAILED and job.checkpoint == ""
        assert "restored from" in job.error and "Start it again" in job.error
    assert Job.objects.get(pk=finished.pk).status == Job.Status.SUCCEEDED

    # The deployment now holds data: a restore over it needs --force, and then replaces it whole.
    with pytest.raises(CommandError, match="--force"):
        call_command("restore", str(out), verbosity=0)
    rows_now = sum(row_counts().values())
    again = run("restore", str(out), "--force")
    assert again["database"]["replaced_rows"] == rows_now and row_counts() == rows_before
    forget_loaded_models()
    assert predict(api, model.pk, images) == before

    # A backup damaged in one byte of the bundle is caught, and named.
    damaged = _flip_a_byte(out, tmp_path / "damaged.tar", "storage/" + model.bundle)
    with pytest.raises(CommandError, match=r"1 of \d+ stored objects failed their SHA-256 check: .*bundle\.zip"):
        call_command("restore", str(damaged), "--force", verbosity=0)


def test_restore_refuses_another_migration_state_and_changes_nothing(make_user, make_tiny_model, tmp_path):
    alice = make_user("alice")
    model = make_tiny_model(alice)
    out = tmp_path / "graft.tar"
    run("backup", str(out))
    newer = _rewrite_manifest(
        out, tmp_path / "newer.tar", lambda m: m["database"]["migrations"]["serving"].append("9999_future")
    )
    with pytest.raises(CommandError, match="serving: backup 9999_future"):
        call_command("restore", str(newer), "--force", verbosity=0)
    assert row_counts()["serving.trainedmodel"] == 1 and model.bundle in stored_files()  # untouched
    with pytest.raises(CommandError, match="already exists"):
        call_command("backup", str(out), verbosity=0)


def _flip_a_byte(src: Path, dst: Path, member: str) -> Path:
    shutil.copy(src, dst)
    with tarfile.open(dst) as tar:
        offset = tar.getmember(member).offset_data
    with dst.open("r+b") as fh:
        fh.seek(offset + 10)
        byte = fh.read(1)
        fh.seek(offset + 10)
        fh.write(bytes([byte[0] ^ 0xFF]))
    return dst


def _rewrite_manifest(src: Path, dst: Path, change) -> Path:
    with tarfile.open(src) as old, tarfile.open(dst, "w", format=tarfile.PAX_FORMAT) as new:
        for info in old.getmembers():
            if info.name == MANIFEST:
                manifest = json.load(old.extractfile(info))
                change(manifest)
                data = json.dumps(manifest).encode()
                info.size = len(data)
                new.addfile(info, io.BytesIO(data))
            else:
                new.addfile(info, old.extractfile(info))
    return dst
