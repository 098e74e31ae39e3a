"""Background work of every kind (apps.common.work): ingestion and batch prediction follow
training's rules: claimed once, re-queued when their worker goes silent, failed with a sentence
after too many lost workers, fair between users on the gpu queue, and a replaced attempt changes
nothing of the one that replaced it."""

from __future__ import annotations

import csv
import io
import zipfile
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from apps.common import work
from apps.datasets.models import Dataset
from apps.datasets.services import INGESTION
from apps.serving.batches import BATCH, batch_run
from apps.serving.models import BatchPrediction
from apps.training.models import Job
from apps.training.services import TRAINING
from tests.apps.conftest import stored_files
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("own_storage")]


def _stale(rows) -> None:
    rows.update(heartbeat_at=timezone.now() - timedelta(hours=1))


def test_an_ingestion_is_claimed_once_and_requeued_when_its_worker_goes_silent(
    db, make_user, settings, django_capture_on_commit_callbacks
):
    dataset = Dataset.objects.create(owner=make_user(), name="d", archive="datasets/x/archive.zip")
    assert work.claim(INGESTION, dataset.pk, worker="w1") is not None
    assert work.claim(INGESTION, dataset.pk, worker="w2") is None  # a duplicate message: alive elsewhere
    _stale(Dataset.objects.filter(pk=dataset.pk))
    settings.GRAFT_JOB_MAX_ATTEMPTS = 3
    with django_capture_on_commit_callbacks() as sent:
        assert work.work_recover_stale().get("ingestion") == [dataset.pk]
    assert len(sent) == 1  # a new message for it
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.PROCESSING and dataset.heartbeat_at is None
    again = work.claim(INGESTION, dataset.pk, worker="w3")
    assert again is not None and again.attempts == 2 and again.worker == "w3"


def test_a_waiting_items_lost_message_is_sent_again_once_a_period(
    db, make_user, settings, django_capture_on_commit_callbacks
):
    """A message lost on its way (the broker down when it was sent, or restarted without it) would
    leave its item waiting for good: beat sends it again after GRAFT_RESEND_SECONDS, once a period."""
    dataset = Dataset.objects.create(owner=make_user(), name="d", archive="datasets/x/archive.zip")
    rows = Dataset.objects.filter(pk=dataset.pk)
    with django_capture_on_commit_callbacks() as sent:
        assert work.work_resend_waiting() == {}  # just queued: its message is on its way
    rows.update(queued_at=timezone.now() - timedelta(seconds=settings.GRAFT_RESEND_SECONDS + 1))
    with django_capture_on_commit_callbacks() as sent:
        assert work.work_resend_waiting() == {"ingestion": [dataset.pk]}
    assert len(sent) == 1
    with django_capture_on_commit_callbacks() as sent:
        assert work.work_resend_waiting() == {} and not sent  # once a period, not every beat
    # Claimed, it is not sent again, however long ago it was queued.
    assert work.claim(INGESTION, dataset.pk, worker="w1") is not None
    rows.update(queued_at=timezone.now() - timedelta(days=1))
    assert work.work_resend_waiting() == {}


def test_an_archive_that_keeps_killing_its_worker_fails_with_a_sentence(db, make_user, settings):
    """The issue: the ingestion worker SIGKILLed twice left the dataset 'processing' for good,
    with no attempt cap. Now the third lost worker ends it, with a reason, and its files go."""
    settings.GRAFT_JOB_MAX_ATTEMPTS = 3
    dataset = Dataset.objects.create(owner=make_user(), name="d")
    archive = default_storage.save(f"{dataset.storage_prefix}archive.zip", ContentFile(b"zip"))
    Dataset.objects.filter(pk=dataset.pk).update(archive=archive, attempts=3, heartbeat_at=timezone.now())
    _stale(Dataset.objects.filter(pk=dataset.pk))
    work.work_recover_stale()
    dataset.refresh_from_db()
    assert dataset.status == Dataset.Status.FAILED
    assert "stopped its worker 3 times" in dataset.error and "smaller archive" in dataset.error
    assert stored_files(dataset.storage_prefix) == set()


def test_a_lost_batch_is_requeued_and_its_slot_is_not_held_for_good(db, make_user, make_tiny_model):
    """The issue: a batch whose worker was SIGKILLed stayed 'running' for good and held its slot."""
    owner = make_user()
    batch = BatchPrediction.objects.create(owner=owner, model=make_tiny_model(owner), name="b")
    assert work.claim(BATCH, batch.pk) is not None
    _stale(BatchPrediction.objects.filter(pk=batch.pk))
    assert work.work_recover_stale().get("batch prediction") == [batch.pk]
    assert BatchPrediction.objects.get(pk=batch.pk).status == BatchPrediction.Status.QUEUED


def test_jobs_and_batches_share_the_gpu_queues_fair_share(db, make_user, make_tiny_model):
    """Alice queued three batches before Bob's one job: one worker runs Alice, Bob, Alice, Alice
    (before, a batch ticket ran its own batch, whoever else was waiting)."""
    alice, bob = make_user("alice"), make_user("bob")
    model = make_tiny_model(alice)
    for _ in range(3):
        BatchPrediction.objects.create(owner=alice, model=model, name="b")
    dataset = Dataset.objects.create(owner=bob, name="d", status=Dataset.Status.READY)
    Job.objects.create(owner=bob, dataset=dataset)
    ran = []
    while (picked := work.claim_fairest([TRAINING, BATCH])) is not None:
        kind, item = picked
        ran.append((kind.name, item.owner.username))
        kind.rows().filter(pk=item.pk).update(status=kind.failed, finished_at=timezone.now())
    assert ran == [
        ("batch prediction", "alice"),
        ("training", "bob"),
        ("batch prediction", "alice"),
        ("batch prediction", "alice"),
    ]


def _images_zip(names: list[str]) -> ContentFile:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i, name in enumerate(names):
            zf.writestr(name, image_bytes(seed=i))
    return ContentFile(buf.getvalue())


def test_a_replaced_attempt_leaves_the_winners_results_alone(db, make_user, make_tiny_model):
    """The issue: a batch that ran twice deleted the winner's results while the row said succeeded."""
    owner = make_user()
    batch = BatchPrediction.objects.create(owner=owner, model=make_tiny_model(owner), name="b")
    batch.archive = default_storage.save(f"{batch.storage_prefix}input.zip", _images_zip(["a.png", "b.png"]))
    batch.save()
    first = work.claim(BATCH, batch.pk)  # this worker goes silent...
    _stale(BatchPrediction.objects.filter(pk=batch.pk))
    second = work.claim(BATCH, batch.pk)  # ...and another takes the batch over and finishes it
    assert second is not None and second.attempts == 2
    batch_run(batch=second)
    won = BatchPrediction.objects.get(pk=batch.pk)
    assert won.status == BatchPrediction.Status.SUCCEEDED
    kept = {won.results_csv, won.results_json}
    batch_run(batch=first)  # the silent worker wakes up and runs to its end
    after = BatchPrediction.objects.get(pk=batch.pk)
    assert after.status == BatchPrediction.Status.SUCCEEDED and {after.results_csv, after.results_json} == kept
    assert kept <= stored_files(batch.storage_prefix)
    assert not [n for n in stored_files(batch.storage_prefix) if "/attempt-1/" in n]  # it removed its own


def test_batch_results_are_charged_before_they_are_written(db, make_user, make_tiny_model):
    from apps.accounts.quotas import usage
    from apps.serving.batches import batch_create

    owner = make_user()
    model = make_tiny_model(owner)
    before = usage(owner).bytes_stored
    dataset = Dataset.objects.create(owner=owner, name="d", status=Dataset.Status.READY, num_images=1000)
    batch = batch_create(owner=owner, model=model, dataset=dataset, k=5)
    assert batch.results_bytes > 1000 * 5 * 2 * len("0.123456")  # at least its scores, in both files
    assert usage(owner).bytes_stored == before + batch.results_bytes


def test_a_batch_csv_cell_that_would_start_a_formula_is_quoted(db, make_user, make_tiny_model):
    """The issue: file names reached a spreadsheet as they were (=HYPERLINK(...) runs there)."""
    owner = make_user()
    names = ['=HYPERLINK("http://evil.example","x").png', "+sum.png", "-neg.png", "@at.png", "plain.png"]
    batch = BatchPrediction.objects.create(owner=owner, model=make_tiny_model(owner), name="b")
    batch.archive = default_storage.save(f"{batch.storage_prefix}input.zip", _images_zip(names))
    batch.save()
    batch_run(batch=work.claim(BATCH, batch.pk))
    done = BatchPrediction.objects.get(pk=batch.pk)
    assert done.status == BatchPrediction.Status.SUCCEEDED, done.error
    with default_storage.open(done.results_csv) as fh:
        rows = list(csv.reader(io.TextIOWrapper(fh, encoding="utf-8")))
    files = sorted(row[0] for row in rows[1:])
    assert files == sorted(["'" + n for n in names[:4]] + ["plain.png"])
    assert all(not cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row)
