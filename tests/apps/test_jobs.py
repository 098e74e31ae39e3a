"""Job lifecycle rules: claiming is exclusive, cancel wins over the worker, stale jobs are recovered."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from apps.datasets.models import Dataset
from apps.training.models import Job
from apps.training.services import RetryLater, job_claim, job_recover_stale
from tests.apps.api_schema import schema_errors

pytestmark = pytest.mark.integration


@pytest.fixture
def job(db, make_user):
    user = make_user()
    dataset = Dataset.objects.create(owner=user, name="d", status=Dataset.Status.READY)
    return Job.objects.create(owner=user, dataset=dataset, config={"strategy": "auto"})


def test_a_job_is_claimed_once(job):
    assert job_claim(job_id=job.pk) is not None
    assert job_claim(job_id=job.pk) is None  # duplicate delivery: no-op
    job.refresh_from_db()
    assert job.status == Job.Status.RUNNING and job.attempts == 1


def test_redelivery_of_a_live_job_waits_and_a_stale_one_restarts(job):
    job_claim(job_id=job.pk)
    with pytest.raises(RetryLater):
        job_claim(job_id=job.pk, redelivered=True)
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    assert Job.objects.get(pk=job.pk).is_stale
    assert job_claim(job_id=job.pk, redelivered=True) is not None
    assert Job.objects.get(pk=job.pk).attempts == 2


def test_one_users_backlog_does_not_starve_another(db, make_user):
    """Tickets are served in order, but each runs the fairest queued job: Bob's one job, queued
    after three of Alice's, runs second on a single worker, and with two workers a newcomer's job goes
    to the second one while the first user's backlog waits."""
    alice, bob = make_user("alice"), make_user("bob")

    def submit(user, n):
        dataset = Dataset.objects.create(owner=user, name="d", status=Dataset.Status.READY)
        return [Job.objects.create(owner=user, dataset=dataset).pk for _ in range(n)]

    tickets = submit(alice, 3) + submit(bob, 1)  # the order the messages reach the queue
    ran = []
    for ticket in tickets:  # one worker: each job finishes before the next ticket is taken
        job = job_claim(job_id=ticket)
        ran.append(job.owner.username)
        Job.objects.filter(pk=job.pk).update(status=Job.Status.SUCCEEDED, finished_at=timezone.now())
    assert ran == ["alice", "bob", "alice", "alice"]

    carol, dave = make_user("carol"), make_user("dave")
    c1, c2, d1 = submit(carol, 2) + submit(dave, 1)
    first = job_claim(job_id=c1)
    second = job_claim(job_id=c2)  # two workers: Carol already has one running
    assert (first.pk, second.pk) == (c1, d1)
    assert job_claim(job_id=d1).pk == c2 and job_claim(job_id=d1) is None  # every job ran once


def test_stale_running_jobs_are_requeued(job, django_capture_on_commit_callbacks):
    job_claim(job_id=job.pk)
    assert job_recover_stale() == []
    Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))
    with django_capture_on_commit_callbacks() as callbacks:
        assert job_recover_stale() == [job.pk]
    assert Job.objects.get(pk=job.pk).status == Job.Status.QUEUED and len(callbacks) == 1


@pytest.mark.django_db(transaction=True)
def test_cancel_a_queued_job_over_http(celery_worker_process, api_for, tmp_path):
    from tests.conftest import class_folders, make_zip

    api = api_for("alice")
    r = api.upload(make_zip(tmp_path / "d.zip", class_folders({"a": 6, "b": 6})).read_bytes())
    dataset = api.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=120)
    job = api.call("POST", "/jobs/", json={"dataset": dataset["id"]}).json()
    r = api.call("POST", f"/jobs/{job['id']}/cancel/")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    r = api.call("POST", f"/jobs/{job['id']}/cancel/")
    assert r.status_code == 200  # cancelling twice is harmless
    done = api.wait(f"/jobs/{job['id']}/", ("cancelled",))
    assert done["model"] is None
    r = api.call("POST", "/jobs/", json={"dataset": dataset["id"], "strategy": "magic"})
    assert r.status_code == 400 and "strategy" in r.json()["error"]


def test_training_options_are_validated_and_kept(db, make_user):
    from apps.common.errors import UserError
    from apps.training.services import job_create

    user = make_user()
    dataset = Dataset.objects.create(owner=user, name="d", status=Dataset.Status.READY)
    job = job_create(owner=user, dataset=dataset, strategy="full", budget=600.0, hflip=False, max_epochs=5)
    assert job.config["strategy"] == "full" and job.config["hflip"] is False
    assert job.config["budget"] == 600.0 and job.config["max_epochs"] == 5
    assert job.config["backbone"] == "efficientnet_lite1"  # the default, recorded
    with pytest.raises(UserError, match="budget"):
        job_create(owner=user, dataset=dataset, budget=-1.0)
    with pytest.raises(UserError, match="Unknown option"):
        job_create(owner=user, dataset=dataset, learning_rate=1.0)
    assert Job.objects.count() == 1  # rejected options leave no job behind


def test_a_finished_job_shows_its_decisions_over_the_api(job, client, tmp_path):
    from apps.training.services import _succeed
    from ml.preprocessing import Preprocessing
    from ml.report import FitResult, Metrics
    from ml.selection import Candidate, Decision
    from ml.strategy import Plan

    decision = Decision(
        "representation",
        "top @ 224 px",
        (Candidate("top @ 224 px", 0.9, 1.0), Candidate("blocks.3 @ 64 px", float("nan"), 0.5, {"size": (64, 64)})),
        "the plain probe stays",
        metric="5-fold CV accuracy on 12 training images",
    )
    bundle = tmp_path / "bundle.zip"
    bundle.write_bytes(b"not really a zip")
    result = FitResult(
        classes=["a", "b"],
        strategy=Plan("linear", "small-similar", 6.0, 0.8, "few images like ImageNet", {"score": 0.8}),
        metrics=Metrics(1.0, 0.1, 1.0, 2, [], [[1, 0], [0, 1]], {"top1": 1.0}, 0.0, []),
        timings={},
        artifacts={"bundle": str(bundle)},
        preprocessing=Preprocessing(224, 256, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),
        device="cpu",
        decisions=[decision],
        peak_rss_mib={"features": 812.5},
    )
    claimed = job_claim(job_id=job.pk)
    _succeed(claimed, result, Job.objects.filter(pk=claimed.pk, attempts=claimed.attempts))
    client.force_login(job.owner)
    body = client.get(f"/api/v1/jobs/{job.pk}/").json()
    assert schema_errors(body, "JobOutput") == []
    report = body["report"]
    (shown,) = report["decisions"]
    assert shown["chosen"] == "top @ 224 px" and shown["candidates"][0]["score"] == 0.9
    assert shown["candidates"][1]["score"] is None  # NaN has no JSON spelling
    assert shown["candidates"][1]["detail"] == {"size": [64, 64]}
    assert report["peak_rss_mib"] == {"features": 812.5}


def test_a_replaced_worker_can_no_longer_touch_the_job(job):
    """Worker A went silent and B took the job over (attempt 2): whatever A still does matches nothing."""
    from apps.training.services import JobCheckpoints, _fail, _Recorder
    from ml.errors import Cancelled
    from ml.run import Progress

    Job.objects.filter(pk=job.pk).update(status="running", attempts=2, checkpoint="jobs/1/checkpoint-3-b.pt")
    stale_attempt = Job.objects.filter(pk=job.pk, attempts=1)
    recorder = _Recorder(job.pk, stale_attempt)
    with pytest.raises(Cancelled):
        recorder(Progress("fit", 1, 2, 0.5))
    with pytest.raises(Cancelled):
        JobCheckpoints(job, recorder).save({"state": {"epoch": 4}, "weights": {}})
    _fail(job.pk, "A's failure", stale_attempt)
    job.refresh_from_db()
    assert job.status == "running" and job.error == "" and job.checkpoint == "jobs/1/checkpoint-3-b.pt"


@pytest.mark.parametrize("why", ["another configuration", "another fine-tune"])
def test_a_resumed_job_that_cannot_use_its_checkpoint_shows_each_epoch_once(job, client, why):
    """Attempt 1 sent its probe's rows and fine-tune epochs 0-3, checkpointed after epoch 2, and its
    worker was lost. Attempt 2 finds the checkpoint but cannot go on from it: its inputs differ (say,
    a worker on another device), or its fine-tune measures differently now. It sends those rows
    again, and the job's history shows each of them once."""
    from types import SimpleNamespace

    from apps.training.services import JobCheckpoints, _Recorder
    from ml.fit import _Tries
    from ml.run import Run

    def setup(held_out: int) -> SimpleNamespace:  # what a checkpoint's fingerprint reads of a fine-tune's setup
        return SimpleNamespace(
            stage="blocks.5",
            rep=SimpleNamespace(prep=SimpleNamespace(input_size=224)),
            config=SimpleNamespace(depth="partial", batch_size=32),
            flip=True,
            augmentation=SimpleNamespace(to_json=lambda: {"after": "light"}),
            hold_idx=range(held_out),
        )

    def attempt(key: str, held_out: int, lost_after_checkpoint: bool) -> None:
        claimed = job_claim(job_id=job.pk, redelivered=True)
        recorder = _Recorder(job.pk, Job.objects.filter(pk=job.pk, attempts=claimed.attempts))
        run = Run(recorder)
        run.resume_from(JobCheckpoints(claimed, recorder), key)
        for step in range(3):  # the probe's C path: not sent again while replaying
            run.report("fit", step, 10, {"phase": "probe", "step": step, "cv_accuracy": 0.8})
        tries = _Tries(run, None, setup(held_out), None, None, {})
        saved = tries._saved()  # as fit does before its fine-tune
        assert saved is None  # whichever attempt this is, the fine-tune starts at epoch 0
        for epoch in range(4):
            run.report("fit", 3 + epoch, 10, {"phase": "finetune", "epoch": epoch, "val_accuracy": 0.9})
            if lost_after_checkpoint and epoch == 2:
                run.checkpoint({"state": {"epoch": 2}, "setup": tries._fingerprint(), "ladder": {}})
        if lost_after_checkpoint:  # its worker goes silent: the next claim takes the job over
            Job.objects.filter(pk=job.pk).update(heartbeat_at=timezone.now() - timedelta(hours=1))

    attempt("inputs-1", held_out=20, lost_after_checkpoint=True)
    if why == "another configuration":
        attempt("inputs-2", held_out=20, lost_after_checkpoint=False)
    else:
        attempt("inputs-1", held_out=24, lost_after_checkpoint=False)

    client.force_login(job.owner)
    body = client.get(f"/api/v1/jobs/{job.pk}/").json()
    assert body["attempts"] == 2
    shown = [(row["phase"], row.get("step", row.get("epoch"))) for row in body["history"]]
    assert shown == [("probe", 0), ("probe", 1), ("probe", 2)] + [("finetune", e) for e in range(4)]
