"""Deletes keep their promises: a dataset in use is refused with a sentence, models and jobs can be
deleted over HTTP, storage is freed and the usage meter follows, a deleted model answers 404; and
the sweeper removes what no row owns (a crash between storing a file and creating its row)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.management import call_command
from django.utils import timezone

from apps.datasets.models import Dataset
from apps.serving.batches import batch_thumb_name
from apps.serving.models import BatchPrediction, PredictionRecord, TrainedModel
from apps.training.models import Job
from tests.apps.conftest import stored_files
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("own_storage")]


@pytest.fixture
def alice(api_for):
    return api_for("alice")


@pytest.fixture
def owner(alice, django_user_model):
    return django_user_model.objects.get(username="alice")


def _ready_dataset(owner) -> Dataset:
    dataset = Dataset.objects.create(owner=owner, name="flowers", status=Dataset.Status.READY, archive_bytes=3)
    dataset.archive = default_storage.save(f"{dataset.storage_prefix}archive.zip", ContentFile(b"zip"))
    dataset.save()
    return dataset


def test_a_dataset_in_use_is_not_deleted_and_says_why(alice, owner, make_tiny_model):
    """The issue: DELETE answered 204 while a job trained on it, and the job then failed."""
    dataset = _ready_dataset(owner)
    job = Job.objects.create(owner=owner, dataset=dataset, status=Job.Status.RUNNING)
    r = alice.call("DELETE", f"/datasets/{dataset.pk}/")
    assert r.status_code == 409
    assert r.json()["error"] == (
        "Dataset 'flowers' is in use by 1 training job waiting or running; cancel it or wait for it to "
        "finish, then delete the dataset."
    )
    batch = BatchPrediction.objects.create(owner=owner, model=make_tiny_model(owner), dataset=dataset, name="b")
    r = alice.call("DELETE", f"/datasets/{dataset.pk}/")
    assert r.status_code == 409 and "1 training job and 1 batch prediction" in r.json()["error"]
    assert stored_files(dataset.storage_prefix) == {dataset.archive}
    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED)
    BatchPrediction.objects.filter(pk=batch.pk).update(status=BatchPrediction.Status.SUCCEEDED)
    assert alice.call("DELETE", f"/datasets/{dataset.pk}/").status_code == 204
    assert stored_files(dataset.storage_prefix) == set()
    assert Job.objects.get(pk=job.pk).dataset is None  # the job and its model stay


def test_a_model_is_deleted_with_its_files_and_its_endpoint_answers_404(alice, owner, make_tiny_model):
    """The issue: no way to delete a model, though the quota message told users to."""
    from apps.accounts.quotas import usage

    model = make_tiny_model(owner)
    picture = {"image": ("x.png", image_bytes())}
    assert alice.call("POST", f"/models/{model.pk}/predict/", files=picture).status_code == 200
    batch = BatchPrediction.objects.create(owner=owner, model=model, name="b", results_bytes=10)
    batch_file = default_storage.save(f"{batch.storage_prefix}attempt-1/predictions.csv", ContentFile(b"x" * 10))
    PredictionRecord.objects.create(model=model, created_at=timezone.now(), latency_ms=1, label="cat", score=1)
    before = usage(owner).bytes_stored
    assert before == model.bundle_bytes + 10

    assert alice.call("DELETE", f"/models/{model.pk}/").status_code == 204
    assert usage(owner).bytes_stored == 0
    assert stored_files(model.storage_prefix) == set() and not default_storage.exists(batch_file)
    assert not BatchPrediction.objects.exists() and not PredictionRecord.objects.exists()
    r = alice.call("POST", f"/models/{model.pk}/predict/", files=picture)
    assert r.status_code == 404 and "error" in r.json()
    assert alice.call("DELETE", f"/models/{model.pk}/").status_code == 404


def test_a_job_is_deleted_once_it_has_ended_and_its_model_stays(alice, owner, make_tiny_model):
    dataset = _ready_dataset(owner)
    job = Job.objects.create(owner=owner, dataset=dataset, status=Job.Status.RUNNING)
    r = alice.call("DELETE", f"/jobs/{job.pk}/")
    assert (
        r.status_code == 409 and r.json()["error"] == f"Job {job.pk} is still running; cancel it first, then delete it."
    )
    model = make_tiny_model(owner)
    TrainedModel.objects.filter(pk=model.pk).update(job=job)
    Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED)
    assert alice.call("DELETE", f"/jobs/{job.pk}/").status_code == 204
    assert alice.call("GET", f"/jobs/{job.pk}/").status_code == 404
    body = alice.call("GET", f"/models/{model.pk}/").json()
    assert body["id"] == model.pk and body["job"] is None


def _age(name: str, hours: float) -> None:
    path = Path(default_storage.path(name))
    old = time.time() - hours * 3600
    os.utime(path, (old, old))


def test_the_sweeper_removes_what_no_row_owns_after_the_grace_period(
    db, make_user, make_tiny_model, capsys, settings, tmp_path
):
    """The issue: a crash between storing a file and creating its row left the file for ever."""
    settings.GRAFT_WORK_DIR = tmp_path / "work"
    owner = make_user()
    dataset = _ready_dataset(owner)
    model = make_tiny_model(owner)
    batch = BatchPrediction.objects.create(owner=owner, model=model, name="b", status=BatchPrediction.Status.SUCCEEDED)
    batch.attempts = 2
    batch.results_csv = default_storage.save(f"{batch.storage_prefix}attempt-2/predictions.csv", ContentFile(b"a"))
    batch.thumbnails = ["photos/doubtful.jpg"]  # its least confident image's thumbnail is the batch's too
    default_storage.save(batch_thumb_name(batch, "photos/doubtful.jpg"), ContentFile(b"t"))
    batch.save()
    kept_image = default_storage.save(f"{model.storage_prefix}inputs/kept.jpg", ContentFile(b"i"))
    PredictionRecord.objects.create(
        model=model, created_at=timezone.now(), latency_ms=1, label="cat", score=1, image=kept_image
    )
    # A job re-queued after its worker was lost, waiting for one (its host down over a weekend): the
    # checkpoint it names is the next worker's start.
    waiting = Job.objects.create(owner=owner, dataset=dataset, status=Job.Status.QUEUED, attempts=1)
    waiting.checkpoint = default_storage.save(f"jobs/{waiting.pk}/checkpoint-2-abc.pt", ContentFile(b"resume"))
    waiting.save()
    owned = stored_files()
    orphans = {
        default_storage.save("datasets/0123456789abcdef/archive.zip", ContentFile(b"crashed before its row")),
        default_storage.save("models/0123456789abcdef/bundle.zip", ContentFile(b"crashed before its row")),
        default_storage.save(f"{batch.storage_prefix}attempt-1/predictions.csv", ContentFile(b"replaced attempt")),
        default_storage.save(f"{model.storage_prefix}inputs/trimmed.jpg", ContentFile(b"record trimmed")),
        default_storage.save("jobs/999/checkpoint-3-abc.pt", ContentFile(b"job over")),
        default_storage.save("uploads/0123456789abcdef/part-0", ContentFile(b"expired upload")),
    }
    young = default_storage.save("datasets/fedcba9876543210/archive.zip", ContentFile(b"on its way to a row"))
    for name in owned | orphans:
        _age(name, settings.GRAFT_SWEEP_GRACE_HOURS + 1)
    # An unpacked bundle of a deleted model on this host, and one of a live model.
    scratch = Path(settings.GRAFT_WORK_DIR) / "serving"
    (scratch / "999999-0123456789abcdef").mkdir(parents=True, exist_ok=True)
    (scratch / f"{model.pk}-{model.bundle_sha256[:16]}").mkdir(parents=True, exist_ok=True)
    # A dataset version a killed worker gathered into one zip, a day ago; and one gathered now.
    gathered_old = Path(settings.GRAFT_WORK_DIR) / "version-7-deadbeef.zip"
    gathered_now = Path(settings.GRAFT_WORK_DIR) / "version-8-cafef00d.zip"
    for path in (gathered_old, gathered_now):
        path.write_bytes(b"PK")
    os.utime(gathered_old, (time.time() - 25 * 3600,) * 2)

    call_command("sweep")
    report = json.loads(capsys.readouterr().out)
    assert {r["name"] for r in report["removed"]} == orphans
    assert report["kept_young"] == 1
    assert report["scratch_removed"] == ["version-7-deadbeef.zip", "999999-0123456789abcdef"]
    assert not gathered_old.exists() and gathered_now.exists()
    gathered_now.unlink()
    assert stored_files() == owned | {young}
    assert (scratch / f"{model.pk}-{model.bundle_sha256[:16]}").is_dir()

    call_command("sweep", "--grace-hours", "0")
    report = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in report["removed"]] == [young] and report["scratch_removed"] == []
    assert stored_files() == owned
    assert dataset.archive in owned


def test_the_sweeper_aborts_multipart_uploads_a_crashed_host_left(settings, tmp_path):
    """A host that dies in the middle of a large upload leaves its parts stored (and billed) in an
    S3 multipart upload that no object shows: the sweeper aborts those older than the grace period."""
    from datetime import timedelta

    import boto3

    from apps.ops.sweep import SweepReport, abort_stale_multipart
    from tests.conftest import IN_CI
    from tests.settings import S3_ENDPOINT, S3_REACHABLE

    if not S3_REACHABLE:
        why = f"needs an S3 server at {S3_ENDPOINT}"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    keys = {"aws_access_key_id": "graft", "aws_secret_access_key": "graft-test-s3-key-8c1f2e"}
    client = boto3.client("s3", endpoint_url=S3_ENDPOINT, region_name="us-east-1", **keys)
    bucket = f"graft-sweep-{tmp_path.name[-8:].lower().replace('_', '-')}"
    client.create_bucket(Bucket=bucket)
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": bucket,
                "endpoint_url": S3_ENDPOINT,
                "region_name": "us-east-1",
                "access_key": keys["aws_access_key_id"],
                "secret_key": keys["aws_secret_access_key"],
                "addressing_style": "path",
            },
        },
    }
    try:
        crashed = client.create_multipart_upload(Bucket=bucket, Key="datasets/abc/archive.zip")["UploadId"]
        client.upload_part(
            Bucket=bucket, Key="datasets/abc/archive.zip", UploadId=crashed, PartNumber=1, Body=b"x" * 1024
        )
        report = SweepReport()
        abort_stale_multipart(report, grace=timedelta(hours=1))  # begun just now: may still be running
        assert report.multipart_aborted == 0
        abort_stale_multipart(report, grace=timedelta(0))
        assert report.multipart_aborted == 1
        assert client.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    finally:
        for upload in client.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            client.abort_multipart_upload(Bucket=bucket, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=bucket)
