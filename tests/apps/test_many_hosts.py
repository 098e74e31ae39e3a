"""Many machines: web hosts and GPU workers that share nothing but PostgreSQL, the broker and an S3 bucket.

Every process here is a real one (gunicorn, `celery worker`), with its own GRAFT_DATA_DIR and
no shared directory; storage is a real S3 server (SeaweedFS, started by scripts/test.sh).
"""

from __future__ import annotations

import io
import json
import re
import time
import zipfile
from collections import Counter
from urllib.parse import urlparse

import pytest

from apps.serving.models import TrainedModel
from apps.training.models import Job, JobHistory
from tests.apps.cluster import (
    MAX_ATTEMPTS,
    TUS,
    files_outside_scratch,
    holder,
    keys,
    learnable_zip,
    running_cluster,
    session,
    wait,
    wait_for,
)
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, django_db_setup, django_db_blocker):
    with running_cluster(tmp_path_factory.mktemp("hosts"), django_db_blocker) as c:
        yield c


def test_upload_train_and_serve_across_hosts_with_a_worker_killed_mid_finetune(cluster, make_user, tmp_path):
    a, b = cluster.web_a, cluster.web_b
    # The workers make each model's int8 variant after its job, as deployed (the suite's own worker does not).
    gpu1, gpu2 = cluster.worker("gpu-1", env={"GRAFT_INT8": "1"}), cluster.worker("gpu-2", env={"GRAFT_INT8": "1"})
    alice = session(a.url, make_user, "alice")
    data = learnable_zip(tmp_path)

    # A resumable upload whose chunks alternate between the two web hosts.
    r = alice.post(f"{a.url}/api/v1/uploads/", headers={**TUS, "Upload-Length": str(len(data))}, timeout=30)
    assert r.status_code == 201, r.text
    path = urlparse(r.headers["Location"]).path
    cuts = [len(data) * i // 5 for i in range(6)]
    for i, (start, end) in enumerate(zip(cuts, cuts[1:], strict=False)):
        host = (a, b)[i % 2]
        headers = {**TUS, "Upload-Offset": str(start), "Content-Type": "application/offset+octet-stream"}
        r = alice.patch(f"{host.url}{path}", data=data[start:end], headers=headers, timeout=60)
        assert r.status_code == 204 and r.headers["Upload-Offset"] == str(end), (host.name, r.text)
    dataset = wait(alice, f"{b.url}/api/v1/datasets/{r.headers['Graft-Dataset']}/", ("ready", "failed"), 300)
    assert dataset["status"] == "ready" and dataset["num_images"] == 48, dataset

    # A fine-tune; its worker dies (SIGKILL) once it has written a checkpoint.
    r = alice.post(
        f"{a.url}/api/v1/jobs/", json={"dataset": dataset["id"], "strategy": "partial", "max_epochs": 5}, timeout=30
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    wait_for(lambda: Job.objects.get(pk=job_id).checkpoint, 300, "the first checkpoint")
    claimed_by = holder(cluster, job_id)
    cluster.kill(claimed_by)
    killed_at = time.time()
    job = Job.objects.get(pk=job_id)
    epoch = int(re.search(r"checkpoint-(\d+)-", job.checkpoint).group(1))
    before = list(JobHistory.objects.filter(job_id=job_id).values_list("data", flat=True))
    trained_before = [(r["lr_multiplier"], r["epoch"]) for r in before if r.get("epoch") and "lr_multiplier" in r]

    # Beat sees the silent heartbeat and re-queues it; the other worker goes on from the checkpoint.
    body = wait(alice, f"{b.url}/api/v1/jobs/{job_id}/", ("succeeded", "failed", "cancelled"), 600)
    assert body["status"] == "succeeded", body.get("error")
    survivor = gpu2 if claimed_by is gpu1 else gpu1
    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2 and job.checkpoint == "" and job.worker.startswith(f"{survivor.name}@")
    log = "\n".join(body["report"]["log"])
    assert "resuming from a checkpoint" in log and f"resumed after epoch {epoch}" in log, log
    rows = JobHistory.objects.filter(job_id=job_id).order_by("id")
    epochs = [(r.data["lr_multiplier"], r.data["epoch"]) for r in rows if "lr_multiplier" in r.data]
    assert not [e for e, n in Counter(epochs).items() if n > 1], epochs  # no epoch was trained twice
    checkpointed_try = trained_before[-1][0]  # the learning rate the killed worker was training at
    resumed = [r for r in rows if r.created_at.timestamp() > killed_at and "lr_multiplier" in r.data]
    assert resumed and all(r.data["epoch"] > epoch for r in resumed if r.data["lr_multiplier"] == checkpointed_try)
    assert set(trained_before) <= set(epochs)
    lost = resumed[0].created_at.timestamp() - killed_at
    print(f'{{"kill_to_resumed_epoch_s": {lost:.1f}, "checkpoint_epoch": {epoch}}}')

    # A worker makes the model's int8 variant next; the bundle it stores in the bucket carries it
    # where it was kept, and its card has the figures either way.
    model_id = body["model"]
    model = wait_for(
        lambda: (
            (m := alice.get(f"{a.url}/api/v1/models/{model_id}/", timeout=30).json())["int8_status"]
            not in ("pending", "running")
            and m
        ),
        300,
        "the int8 step",
    )
    assert model["int8_status"] in ("kept", "refused"), model["int8"]
    assert model["int8"]["check_images"] > 0 and model["int8"]["val_accuracy_int8"] is not None

    # Download and predict through the other web host.
    r = alice.get(f"{b.url}/api/v1/models/{model_id}/download/", timeout=60)
    bundle = zipfile.ZipFile(io.BytesIO(r.content))
    assert r.status_code == 200 and bundle.testzip() is None
    assert ("model.int8.onnx" in bundle.namelist()) == (model["int8_status"] == "kept")
    assert json.loads(bundle.read("graft.json"))["int8"]["kept"] == (model["int8_status"] == "kept")
    r = alice.post(
        f"{b.url}/api/v1/models/{model_id}/predict/",
        files={"image": ("x.png", image_bytes(color=(200, 40, 40), seed=999))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0][0]["label"] in {"red", "blue"}
    assert r.json()["model"]["precision"] == ("int8" if model["int8_status"] == "kept" else "fp32")

    # The web hosts uploaded, queued the job, served the download and the prediction without torch.
    for host in (a, b):
        assert torch_mapped(host) == [], host.name

    # Nothing but scratch on any host; the bucket holds the dataset, its thumbnails and the bundle.
    for host in (a, b, gpu1, gpu2):
        assert files_outside_scratch(host) == [], host.name
    stored = keys(cluster.bucket)
    prefix = next(k for k in stored if k.endswith("/archive.zip")).rsplit("/", 1)[0]
    assert f"{prefix}/manifest.json" in stored
    assert len([k for k in stored if k.startswith(f"{prefix}/thumbs/")]) == 24  # 12 shown per class
    bundles = [k for k in stored if k.startswith("models/") and "/bundle" in k and k.endswith(".zip")]
    # The int8 step's bundle replaced the job's, which stays for the sweeper's grace period (a download
    # that read the model just before still finds it), and no row names it.
    served = TrainedModel.objects.get(pk=model_id).bundle
    assert len(bundles) == 2 and served in bundles and served.rsplit("/", 1)[1].startswith("bundle-"), bundles
    assert not [k for k in stored if k.startswith(("jobs/", "uploads/"))], stored


def test_a_job_whose_workers_keep_dying_fails_with_a_reason(cluster, make_user, tmp_path):
    a = cluster.web_a
    bob = session(a.url, make_user, "bob")
    r = bob.post(f"{a.url}/api/v1/datasets/", files={"file": ("c.zip", learnable_zip(tmp_path))}, timeout=60)
    assert r.status_code == 201, r.text
    dataset = wait(bob, f"{a.url}/api/v1/datasets/{r.json()['id']}/", ("ready", "failed"), 300)
    cluster.worker("gpu-3")  # beside the survivor of the test before
    r = bob.post(f"{a.url}/api/v1/jobs/", json={"dataset": dataset["id"], "strategy": "partial"}, timeout=30)
    job_id = r.json()["id"]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        wait_for(
            lambda n=attempt: Job.objects.filter(pk=job_id, status="running", attempts=n).exists(),
            120,
            f"attempt {attempt}",
        )
        cluster.kill(holder(cluster, job_id))
    body = wait(bob, f"{a.url}/api/v1/jobs/{job_id}/", ("succeeded", "failed", "cancelled"), 120)
    assert body["status"] == "failed"
    assert f"stopped {MAX_ATTEMPTS} times" in body["error"], body["error"]
    assert not [k for k in keys(cluster.bucket) if k.startswith(f"jobs/{job_id}/")]


def torch_mapped(host) -> list[str]:
    """The processes of `host` (gunicorn's master and workers) that have torch's library mapped."""
    from pathlib import Path

    pids = [host.proc.pid]
    pids += [int(p) for p in Path(f"/proc/{host.proc.pid}/task/{host.proc.pid}/children").read_text().split()]
    return [str(pid) for pid in pids if "libtorch" in Path(f"/proc/{pid}/maps").read_text()]
