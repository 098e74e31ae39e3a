"""Many machines: web hosts and GPU workers that share nothing but PostgreSQL, the broker and an S3 bucket.

Every process here is a real one (gunicorn, `celery worker`), with its own GRAFT_DATA_DIR and
no shared directory; storage is a real S3 server (SeaweedFS, started by scripts/test.sh).
"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pytest
import requests
from django.conf import settings

from apps.training.models import Job, JobHistory
from tests.conftest import IN_CI, ROOT, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKER = "redis://127.0.0.1:6379/14"  # not the suite's own worker's: these processes see only this cluster
STALE, HEARTBEAT, MAX_ATTEMPTS = 8, 2, 2
PASSWORD = "correct horse battery"
TUS = {"Tus-Resumable": "1.0.0"}


@dataclass
class Host:
    name: str
    proc: subprocess.Popen
    data_dir: Path
    log: Path
    url: str = ""

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


class Cluster:
    """Starts and stops the hosts of one deployment; each is a process group of its own."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.root, self.bucket = root, bucket
        self.hosts: list[Host] = []

    def env(self, data_dir: Path) -> dict[str, str]:
        db = settings.DATABASES["default"]
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
            "CELERY_BROKER_URL": BROKER,
            "GRAFT_DATA_DIR": str(data_dir),
            "AWS_STORAGE_BUCKET_NAME": self.bucket,
            "AWS_S3_ENDPOINT_URL": settings.S3_ENDPOINT,
            "AWS_ACCESS_KEY_ID": "graft",
            "AWS_SECRET_ACCESS_KEY": "graft-secret",
            "AWS_S3_REGION_NAME": "us-east-1",
            "GRAFT_JOB_STALE_SECONDS": str(STALE),
            "GRAFT_HEARTBEAT_SECONDS": str(HEARTBEAT),
            "GRAFT_JOB_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "PYTHONUNBUFFERED": "1",
        }

    def _start(self, name: str, argv: list[str]) -> Host:
        data_dir = self.root / name
        data_dir.mkdir(parents=True)
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=self.env(data_dir),
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        host = Host(name, proc, data_dir, log)
        self.hosts.append(host)
        return host

    def web(self, name: str) -> Host:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        gunicorn = [sys.executable, "-m", "gunicorn", "apps.wsgi:application", "-b", f"127.0.0.1:{port}"]
        host = self._start(name, [*gunicorn, "-w", "1", "--threads", "4", "--timeout", "300", "--preload"])
        host.url = f"http://127.0.0.1:{port}"
        self._wait(host, lambda: _ready(host.url))
        return host

    def worker(self, name: str, queue: str = "gpu", beat: bool = False) -> Host:
        argv = [sys.executable, "-m", "celery", "-A", "apps", "worker", "-Q", queue, "-c", "1", "-n", f"{name}@%h"]
        host = self._start(name, [*argv, "-l", "INFO", *(["-B"] if beat else [])])
        self._wait(host, lambda: "ready." in host.log_text())
        return host

    def _wait(self, host: Host, ready, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if host.proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{host.name} did not start:\n{host.log_text()[-3000:]}")
            time.sleep(0.3)

    def kill(self, host: Host) -> None:
        """The machine is gone: SIGKILL, no chance to clean up."""
        os.killpg(host.proc.pid, signal.SIGKILL)
        host.proc.wait(10)

    def stop(self) -> None:
        for host in self.hosts:
            if host.proc.poll() is None:
                os.killpg(host.proc.pid, signal.SIGTERM)
        for host in self.hosts:
            try:
                host.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(host.proc.pid, signal.SIGKILL)


def _ready(url: str) -> bool:
    try:  # the first request imports the app (torch and all): give it time
        return requests.get(f"{url}/health/ready/", timeout=30).status_code == 200
    except requests.RequestException:
        return False


def _s3():
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=settings.S3_ENDPOINT,
        aws_access_key_id="graft",
        aws_secret_access_key="graft-secret",
        region_name="us-east-1",
    )


def _create_bucket(bucket: str, timeout: float = 60) -> None:
    """A server just started opens its port before its volumes are ready: try until it takes it."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    deadline = time.monotonic() + timeout
    while True:
        try:
            _s3().create_bucket(Bucket=bucket)
            return
        except (ClientError, EndpointConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def _keys(bucket: str) -> list[str]:
    pages = _s3().get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _flush_broker() -> None:
    import redis

    redis.Redis.from_url(BROKER).flushdb()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, django_db_setup, django_db_blocker):
    if not (settings.INTEGRATION and settings.S3_REACHABLE):
        why = f"the many-hosts tests need PostgreSQL, Redis and S3 at {settings.S3_ENDPOINT}"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    bucket = f"graft-test-{uuid.uuid4().hex[:12]}"
    _create_bucket(bucket)
    _flush_broker()
    c = Cluster(tmp_path_factory.mktemp("hosts"), bucket)
    try:
        c.ingest = c.worker("ingest", queue="celery", beat=True)  # ingestion, and beat re-queues lost jobs
        c.web_a, c.web_b = c.web("web-a"), c.web("web-b")
        yield c
    finally:
        c.stop()
        _flush_broker()
        for key in _keys(bucket):
            _s3().delete_object(Bucket=bucket, Key=key)
        _s3().delete_bucket(Bucket=bucket)
        from tests.apps.conftest import _wait_for_other_sessions_to_close

        with django_db_blocker.unblock():
            _wait_for_other_sessions_to_close(settings.DATABASES["default"]["NAME"])


def _learnable_zip(tmp_path: Path, per_class: int = 24) -> bytes:
    """Two classes a model can tell apart (red and blue squares, each with its own noise)."""
    members = {}
    for i in range(per_class):
        members[f"red/r{i}.png"] = image_bytes(color=(200, 40, 40), seed=2 * i)
        members[f"blue/b{i}.png"] = image_bytes(color=(40, 40, 200), seed=2 * i + 1)
    return make_zip(tmp_path / "colours.zip", members).read_bytes()


def _session(url: str, make_user, username: str) -> requests.Session:
    make_user(username, PASSWORD)
    r = requests.post(f"{url}/api/v1/auth/token/", json={"username": username, "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    s = requests.Session()
    s.headers["Authorization"] = f"Token {r.json()['token']}"
    return s


def _wait(s: requests.Session, url: str, done: tuple[str, ...], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = s.get(url, timeout=30).json()
        if body.get("status") in done:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{url} did not reach {done}: {body}")


def _wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _holder(cluster: Cluster, job_id: int) -> Host:
    """The host of the worker that claimed the job (its node name is on the job)."""
    node = Job.objects.get(pk=job_id).worker
    return next(h for h in cluster.hosts if node.startswith(f"{h.name}@"))


def _files_outside_scratch(host: Host) -> list[str]:
    return [
        str(p.relative_to(host.data_dir))
        for p in host.data_dir.rglob("*")
        if p.is_file() and p.relative_to(host.data_dir).parts[0] != "work"
    ]


def test_upload_train_and_serve_across_hosts_with_a_worker_killed_mid_finetune(cluster, make_user, tmp_path):
    a, b = cluster.web_a, cluster.web_b
    gpu1, gpu2 = cluster.worker("gpu-1"), cluster.worker("gpu-2")
    alice = _session(a.url, make_user, "alice")
    data = _learnable_zip(tmp_path)

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
    dataset = _wait(alice, f"{b.url}/api/v1/datasets/{r.headers['Graft-Dataset']}/", ("ready", "failed"), 300)
    assert dataset["status"] == "ready" and dataset["num_images"] == 48, dataset

    # A fine-tune; its worker dies (SIGKILL) once it has written a checkpoint.
    r = alice.post(
        f"{a.url}/api/v1/jobs/", json={"dataset": dataset["id"], "strategy": "partial", "max_epochs": 5}, timeout=30
    )
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    _wait_for(lambda: Job.objects.get(pk=job_id).checkpoint, 300, "the first checkpoint")
    holder = _holder(cluster, job_id)
    cluster.kill(holder)
    killed_at = time.time()
    job = Job.objects.get(pk=job_id)
    epoch = int(re.search(r"checkpoint-(\d+)-", job.checkpoint).group(1))
    before = list(JobHistory.objects.filter(job_id=job_id, phase="fit").values_list("data", flat=True))
    trained_before = [(r["lr_multiplier"], r["epoch"]) for r in before if r.get("epoch") and "lr_multiplier" in r]

    # Beat sees the silent heartbeat and re-queues it; the other worker goes on from the checkpoint.
    body = _wait(alice, f"{b.url}/api/v1/jobs/{job_id}/", ("succeeded", "failed", "cancelled"), 600)
    assert body["status"] == "succeeded", body.get("error")
    survivor = gpu2 if holder is gpu1 else gpu1
    job = Job.objects.get(pk=job_id)
    assert job.attempts == 2 and job.checkpoint == "" and job.worker.startswith(f"{survivor.name}@")
    log = "\n".join(body["report"]["log"])
    assert "resuming from a checkpoint" in log and f"resumed after epoch {epoch}" in log, log
    rows = JobHistory.objects.filter(job_id=job_id, phase="fit").order_by("id")
    epochs = [(r.data["lr_multiplier"], r.data["epoch"]) for r in rows if "lr_multiplier" in r.data]
    assert not [e for e, n in Counter(epochs).items() if n > 1], epochs  # no epoch was trained twice
    checkpointed_try = trained_before[-1][0]  # the learning rate the killed worker was training at
    resumed = [r for r in rows if r.created_at.timestamp() > killed_at and "lr_multiplier" in r.data]
    assert resumed and all(r.data["epoch"] > epoch for r in resumed if r.data["lr_multiplier"] == checkpointed_try)
    assert set(trained_before) <= set(epochs)
    lost = resumed[0].created_at.timestamp() - killed_at
    print(f'{{"kill_to_resumed_epoch_s": {lost:.1f}, "checkpoint_epoch": {epoch}}}')

    # Download and predict through the other web host.
    model_id = body["model"]
    r = alice.get(f"{b.url}/api/v1/models/{model_id}/download/", timeout=60)
    assert r.status_code == 200 and zipfile.ZipFile(io.BytesIO(r.content)).testzip() is None
    r = alice.post(
        f"{b.url}/api/v1/models/{model_id}/predict/",
        files={"image": ("x.png", image_bytes(color=(200, 40, 40), seed=999))},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    assert r.json()["predictions"][0][0]["label"] in {"red", "blue"}

    # Nothing but scratch on any host; the bucket holds the dataset, its thumbnails and the bundle.
    for host in (a, b, gpu1, gpu2):
        assert _files_outside_scratch(host) == [], host.name
    keys = _keys(cluster.bucket)
    prefix = next(k for k in keys if k.endswith("/archive.zip")).rsplit("/", 1)[0]
    assert f"{prefix}/manifest.json" in keys
    assert len([k for k in keys if k.startswith(f"{prefix}/thumbs/")]) == 24  # 12 shown per class
    assert any(k.startswith("models/") and k.endswith("/bundle.zip") for k in keys)
    assert not [k for k in keys if k.startswith(("jobs/", "uploads/"))], keys


def test_a_job_whose_workers_keep_dying_fails_with_a_reason(cluster, make_user, tmp_path):
    a = cluster.web_a
    bob = _session(a.url, make_user, "bob")
    r = bob.post(f"{a.url}/api/v1/datasets/", files={"file": ("c.zip", _learnable_zip(tmp_path))}, timeout=60)
    assert r.status_code == 201, r.text
    dataset = _wait(bob, f"{a.url}/api/v1/datasets/{r.json()['id']}/", ("ready", "failed"), 300)
    cluster.worker("gpu-3")  # beside the survivor of the test before
    r = bob.post(f"{a.url}/api/v1/jobs/", json={"dataset": dataset["id"], "strategy": "partial"}, timeout=30)
    job_id = r.json()["id"]
    for attempt in range(1, MAX_ATTEMPTS + 1):
        _wait_for(
            lambda n=attempt: Job.objects.filter(pk=job_id, status="running", attempts=n).exists(),
            120,
            f"attempt {attempt}",
        )
        cluster.kill(_holder(cluster, job_id))
    body = _wait(bob, f"{a.url}/api/v1/jobs/{job_id}/", ("succeeded", "failed", "cancelled"), 120)
    assert body["status"] == "failed"
    assert f"stopped {MAX_ATTEMPTS} times" in body["error"], body["error"]
    assert not [k for k in _keys(cluster.bucket) if k.startswith(f"jobs/{job_id}/")]
