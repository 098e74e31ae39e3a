"""Fault injection: real worker processes SIGKILLed at named points of each kind of background work
(ingestion, training, batch prediction), a worker's database connection cut, the object store
stopped in the middle of a write. Selected with `pytest -k fault`.

Each scenario runs in a deployment of real processes (tests/apps/cluster.py: gunicorn, Celery
workers, PostgreSQL, Redis, SeaweedFS). A worker started with GRAFT_FAULT_PAUSE stops at that point
(apps.common.faults) so the fault lands at the same place every run; a second worker with beat is
the rest of the deployment. After each fault:
- the item reaches its terminal state, re-claimed within stale + one beat (+ slack for a worker's
  first poll);
- no request to the API answers 500 meanwhile;
- the usage meter equals the bytes stored for what it counts;
- the sweeper (grace 0) removes only what the dead attempt left, and a second sweep finds nothing.
Each prints a JSON line (fault, point, outcome, seconds to re-claim and to finish) for the record.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
from django.conf import settings
from django.db import connection

from apps.datasets.models import Dataset, DatasetVersion
from apps.serving.models import BatchPrediction
from apps.training.models import Job
from tests.apps.api_schema import schema_errors
from tests.apps.cluster import STALE, Cluster, Host, keys, learnable_zip, running_cluster, s3, wait_for
from tests.conftest import ROOT, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SEED = int(os.environ.get("GRAFT_FAULT_SEED", "19"))
BROKER = "redis://127.0.0.1:6379/12"  # this module's hosts alone (the many-hosts tests use 14, the suite 15)
BEAT = STALE / 2  # the recover task's period (apps.settings: stale / 2)
SLACK = 6.0  # a beat that has just run, and the new message's first poll


class ObjectStore:
    """This module's own SeaweedFS (S3), on ports of its own, so that a test may stop it and
    start it again on the same data without touching the suite's server on :8333."""

    PORTS = {"master": 19833, "volume": 18580, "filer": 18798, "s3": 18833}

    def __init__(self, root: Path) -> None:
        self.root = root
        self.endpoint = f"http://127.0.0.1:{self.PORTS['s3']}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        weed = ROOT / ".venv" / "bin" / "weed"
        if not weed.exists():
            pytest.fail("SeaweedFS's weed binary is missing (requirements-dev.txt installs it)")
        p = self.PORTS
        argv = [
            str(weed), "server", "-s3", f"-dir={self.root}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-volume.port={p['volume']}", f"-filer.port={p['filer']}",
            f"-s3.port={p['s3']}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-master.volumeSizeLimitMB=64", "-volume.max=0",
        ]  # fmt: skip
        log = (self.root.parent / "weed.log").open("a")
        self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self._wait_until_writable()

    def _wait_until_writable(self, timeout: float = 90) -> None:
        """A server just started opens its port before its volumes take writes: until one lands."""
        from botocore.exceptions import BotoCoreError, ClientError

        client, deadline = s3(self.endpoint), time.monotonic() + timeout
        while True:
            try:
                try:
                    client.create_bucket(Bucket="graft-faults-probe")
                except ClientError as exc:  # there from the last start (a restart keeps the data)
                    if exc.response["Error"]["Code"] not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise
                client.put_object(Bucket="graft-faults-probe", Key="probe", Body=b"x")
                return
            except (BotoCoreError, ClientError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        """Gone at once, as a crashed or partitioned server (its graceful stop can hang)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def object_store(tmp_path_factory):
    store = ObjectStore(tmp_path_factory.mktemp("weed") / "data")
    store.root.mkdir()
    store.start()
    yield store
    store.stop()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, django_db_setup, django_db_blocker, object_store):
    root = tmp_path_factory.mktemp("faults")
    with running_cluster(
        root, django_db_blocker, ingest=False, web=1, endpoint=object_store.endpoint, broker=BROKER
    ) as c:
        yield c


@pytest.fixture(autouse=True)
def empty_bucket(cluster):
    """The database is emptied after every test; the bucket with it, or the next test's sweep
    would find this one's files (rightly) owned by no row."""
    yield
    client = s3(cluster.endpoint)
    for key in keys(cluster.bucket, cluster.endpoint):
        client.delete_object(Bucket=cluster.bucket, Key=key)


@pytest.fixture
def alice(cluster):
    """A user with a token (each test's own: the database is emptied after every test)."""
    from django.contrib.auth.models import User

    User.objects.create_user("fault-alice", password="correct horse battery")
    r = requests.post(
        f"{cluster.web_a.url}/api/v1/auth/token/",
        json={"username": "fault-alice", "password": "correct horse battery"},
        timeout=30,
    )
    s = requests.Session()
    s.headers["Authorization"] = f"Token {r.json()['token']}"
    yield s
    s.close()


@dataclass
class Watch:
    """Polls the API while a scenario recovers: every answer's status, to find any 500."""

    s: requests.Session
    base: str
    statuses: list[int] = field(default_factory=list)

    def get(self, path: str) -> dict:
        r = self.s.get(f"{self.base}/api/v1{path}", timeout=60)
        self.statuses.append(r.status_code)
        return r.json()

    def until(self, path: str, done: tuple[str, ...], timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.get(path)
            self.get("/" + path.strip("/").split("/")[0] + "/")  # and the list it is in
            if body.get("status") in done:
                return body
            time.sleep(0.5)
        raise AssertionError(f"{path} did not reach {done}: {body}")


def paused_worker(cluster: Cluster, name: str, queue: str, point: str, tmp_path: Path) -> Host:
    return cluster.worker(name, queue=queue, env={"GRAFT_FAULT_PAUSE": point, "GRAFT_FAULT_DIR": str(tmp_path)})


def reached(tmp_path: Path, point: str, timeout: float = 300) -> None:
    wait_for(lambda: (tmp_path / f"{point}.reached").exists(), timeout, f"the worker to reach {point}")


def release(tmp_path: Path, point: str) -> None:
    (tmp_path / f"{point}.release").write_text("go")


def stop(*hosts: Host | None) -> None:
    """A worker's warm shutdown, as an operator's stop: SIGTERM to its main process, which lets the
    task in hand finish (a SIGTERM to the whole group kills the pool's child mid-task: a job that
    had just succeeded left its checkpoint for the sweeper). SIGKILL after a minute."""
    for host in hosts:
        if host is None or host.proc.poll() is not None:
            continue
        os.kill(host.proc.pid, signal.SIGTERM)
        try:
            host.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(host.proc.pid, signal.SIGKILL)
            host.proc.wait(10)


def manage(cluster: Cluster, *args: str) -> str:
    env = cluster.env(cluster.root / "manage", "manage")
    out = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def sizes(cluster: Cluster) -> dict[str, int]:
    pages = s3(cluster.endpoint).get_paginator("list_objects_v2").paginate(Bucket=cluster.bucket)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def meter_matches_storage(cluster: Cluster, username: str) -> None:
    """What the usage meter charges is there, at the size it charges."""
    from django.contrib.auth.models import User

    from apps.accounts.quotas import usage
    from apps.serving.models import TrainedModel

    user = User.objects.get(username=username)
    stored = sizes(cluster)
    charged = 0
    for d in Dataset.objects.filter(owner=user).exclude(status=Dataset.Status.FAILED):
        assert stored.get(d.archive) == d.archive_bytes, (d.archive, d.archive_bytes)
        charged += d.archive_bytes
    for m in TrainedModel.objects.filter(owner=user):
        assert stored.get(m.bundle) == m.bundle_bytes, m.bundle
        charged += m.bundle_bytes
    for b in BatchPrediction.objects.filter(owner=user):
        from apps.serving.batches import batch_thumb_name

        files = [n for n in (b.results_csv, b.results_json) if n]
        files += [batch_thumb_name(b, f) for f in b.thumbnails]  # the least confident images' thumbnails
        assert sum(stored[n] for n in files) == b.results_bytes, (files, b.results_bytes)
        if b.archive and b.dataset_id is None:
            assert stored.get(b.archive) == b.archive_bytes
        charged += b.results_bytes + (b.archive_bytes if b.dataset_id is None else 0)
    for v in DatasetVersion.objects.filter(dataset__owner=user, archive_bytes__gt=0).exclude(status="failed"):
        assert stored.get(v.archive) == v.archive_bytes, (v.archive, v.archive_bytes)  # images added later
        charged += v.archive_bytes
    assert usage(user).bytes_stored == charged


def swept_clean(cluster: Cluster, allowed: Callable[[str], bool]) -> list[str]:
    """Sweeps (grace 0): what it removes must be the dead attempt's leftovers, and a second sweep
    finds nothing. Returns the names removed."""
    first = json.loads(manage(cluster, "sweep", "--grace-hours", "0"))
    removed = [r["name"] for r in first["removed"]]
    assert all(allowed(n) for n in removed), removed
    again = json.loads(manage(cluster, "sweep", "--grace-hours", "0"))
    assert again["removed"] == [] and again["multipart_aborted"] == 0, again
    return removed


def record(fault: str, point: str, outcome: str, reclaim_s: float | None, done_s: float) -> None:
    line = {"fault": fault, "point": point, "outcome": outcome, "reclaimed_s": reclaim_s, "terminal_s": done_s}
    print(json.dumps({k: round(v, 1) if isinstance(v, float) else v for k, v in line.items()}))


def upload(s: requests.Session, base: str, data: bytes, name: str) -> int:
    r = s.post(f"{base}/api/v1/datasets/", files={"file": (f"{name}.zip", data)}, data={"name": name}, timeout=60)
    assert r.status_code == 201, r.text
    return r.json()["id"]


@pytest.fixture
def ready_dataset(cluster, alice, tmp_path_factory) -> int:
    """A dataset to train and predict on, ingested by a worker that then goes."""
    ingest = cluster.worker("ingest-setup", queue="celery")
    try:
        pk = upload(alice, cluster.web_a.url, learnable_zip(tmp_path_factory.mktemp("d")), "colours")
        Watch(alice, cluster.web_a.url).until(f"/datasets/{pk}/", ("ready", "failed"))
        return pk
    finally:
        stop(ingest)


def sigkill_scenario(cluster, alice, tmp_path, *, fault_point: str, queue: str, submit, row, done, expect):
    """submit() -> the item's API path; row() -> its database row."""
    victim = paused_worker(cluster, f"victim-{fault_point}", queue, fault_point, tmp_path)
    rescuer = None
    try:
        path = submit()
        reached(tmp_path, fault_point)
        rescuer = cluster.worker(f"rescuer-{fault_point}", queue=f"{queue},celery", beat=True)
        item = row()
        assert item.attempts == 1
        last_beat = item.heartbeat_at
        cluster.kill(victim)  # the machine is gone: no cleanup, no goodbye
        killed = time.monotonic()
        watch = Watch(alice, cluster.web_a.url)
        try:
            wait_for(lambda: row().attempts == 2, STALE + BEAT + SLACK + 30, "the item to be claimed again")
        except AssertionError:
            again = row()
            raise AssertionError(
                f"not claimed again: status {again.status}, attempts {again.attempts}, heartbeat "
                f"{again.heartbeat_at} (last seen {last_beat}), error {again.error!r}"
            ) from None
        again = row()
        reclaim = (again.started_at - last_beat).total_seconds()
        body = watch.until(path, done, timeout=600)
        finished = time.monotonic() - killed
        assert 500 not in watch.statuses and all(code < 500 for code in watch.statuses), watch.statuses
        assert body["status"] == expect, body
        assert reclaim <= STALE + BEAT + SLACK, f"re-claimed {reclaim:.1f} s after its last heartbeat"
        return body, reclaim, finished
    finally:
        stop(victim, rescuer)


def test_fault_sigkill_ingestion(cluster, alice, tmp_path):
    rng = random.Random(SEED)
    for n, point in enumerate(["ingestion.claimed", "ingestion.thumbnails", "ingestion.manifest"]):
        members = {f"c{c}/i{i}.png": image_bytes(seed=rng.randrange(10**9)) for c in range(2) for i in range(6)}
        data = make_zip(tmp_path / f"{n}.zip", members).read_bytes()
        ids: list[int] = []

        def submit(data=data, n=n, ids=ids) -> str:
            ids.append(upload(alice, cluster.web_a.url, data, f"fault-ingest-{n}"))
            return f"/datasets/{ids[0]}/"

        body, reclaim, finished = sigkill_scenario(
            cluster,
            alice,
            tmp_path,
            fault_point=point,
            queue="celery",
            submit=submit,
            row=lambda ids=ids: Dataset.objects.get(pk=ids[0]),
            done=("ready", "failed"),
            expect="ready",
        )
        assert body["num_images"] == 12
        record("SIGKILL", point, "ready", reclaim, finished)
    meter_matches_storage(cluster, "fault-alice")
    swept_clean(cluster, allowed=lambda name: False)  # a replaced ingestion rewrote the same files


def test_fault_sigkill_batch_and_database_cut(cluster, alice, trained_model, tmp_path):
    model_id = trained_model
    rng = random.Random(SEED + 1)
    for n, point in enumerate(["batch.claimed", "batch.progress", "batch.stored"]):
        members = {f"b{i}.png": image_bytes(seed=rng.randrange(10**9)) for i in range(40)}
        data = make_zip(tmp_path / f"b{n}.zip", members).read_bytes()
        ids: list[int] = []

        def submit(data=data, ids=ids) -> str:
            r = alice.post(
                f"{cluster.web_a.url}/api/v1/models/{model_id}/batch/", files={"file": ("b.zip", data)}, timeout=60
            )
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
            return f"/batches/{ids[0]}/"

        body, reclaim, finished = sigkill_scenario(
            cluster,
            alice,
            tmp_path,
            fault_point=point,
            queue="gpu",
            submit=submit,
            row=lambda ids=ids: BatchPrediction.objects.get(pk=ids[0]),
            done=("succeeded", "failed"),
            expect="succeeded",
        )
        r = alice.get(f"{cluster.web_a.url}/api/v1/batches/{ids[0]}/predictions.csv", timeout=60)
        assert r.status_code == 200 and len(r.text.strip().splitlines()) == 41
        record("SIGKILL", point, "succeeded", reclaim, finished)
    meter_matches_storage(cluster, "fault-alice")
    # The batch killed after storing its results left them under its attempt's own names.
    swept_clean(cluster, allowed=lambda name: name.startswith("batches/") and "/attempt-1/" in name)

    # pg_terminate_backend on a working batch's sessions: it is handed back, not failed.
    point, where = "batch.progress", tmp_path / "db"
    where.mkdir()
    victim = paused_worker(cluster, "victim-db", "gpu", point, where)
    rescuer = None
    try:
        data = make_zip(tmp_path / "db.zip", {f"x{i}.png": image_bytes(seed=500 + i) for i in range(20)}).read_bytes()
        r = alice.post(
            f"{cluster.web_a.url}/api/v1/models/{model_id}/batch/", files={"file": ("x.zip", data)}, timeout=60
        )
        assert r.status_code == 202, r.text
        pk = r.json()["id"]
        reached(where, point)
        rescuer = cluster.worker("rescuer-db", queue="gpu,celery", beat=True)
        with connection.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = %s AND application_name = %s",
                [settings.DATABASES["default"]["NAME"], "victim-db"],
            )
            assert cur.fetchone()[0] >= 1
        cut = time.monotonic()
        release(where, point)
        watch = Watch(alice, cluster.web_a.url)
        body = watch.until(f"/batches/{pk}/", ("succeeded", "failed"), 300)
        assert body["status"] == "succeeded", body
        assert all(code < 500 for code in watch.statuses), watch.statuses
        record("pg_terminate_backend", point, "succeeded", None, time.monotonic() - cut)
    finally:
        stop(victim, rescuer)
    meter_matches_storage(cluster, "fault-alice")
    swept_clean(cluster, allowed=lambda name: False)


@pytest.fixture
def trained_model(cluster, alice, ready_dataset) -> int:
    """A model trained on the ready dataset (a plain probe), by a worker that then goes."""
    worker = cluster.worker("gpu-setup", queue="gpu")
    try:
        r = alice.post(
            f"{cluster.web_a.url}/api/v1/jobs/", json={"dataset": ready_dataset, "strategy": "linear"}, timeout=30
        )
        assert r.status_code == 201, r.text
        body = Watch(alice, cluster.web_a.url).until(f"/jobs/{r.json()['id']}/", ("succeeded", "failed"), 600)
        assert body["status"] == "succeeded", body
        return body["model"]
    finally:
        stop(worker)


def test_fault_sigkill_training(cluster, alice, ready_dataset, tmp_path):
    for point in ["training.claimed", "training.checkpoint", "training.bundle"]:
        ids: list[int] = []

        def submit(ids=ids) -> str:
            r = alice.post(
                f"{cluster.web_a.url}/api/v1/jobs/",
                json={"dataset": ready_dataset, "strategy": "partial", "max_epochs": 3},
                timeout=30,
            )
            assert r.status_code == 201, r.text
            ids.append(r.json()["id"])
            return f"/jobs/{ids[0]}/"

        body, reclaim, finished = sigkill_scenario(
            cluster,
            alice,
            tmp_path,
            fault_point=point,
            queue="gpu",
            submit=submit,
            row=lambda ids=ids: Job.objects.get(pk=ids[0]),
            done=("succeeded", "failed", "cancelled"),
            expect="succeeded",
        )
        assert body["model"] is not None and body["attempts"] == 2
        assert schema_errors(body, "JobOutput") == []  # a fine-tune's epochs too, resumed or not
        if point == "training.checkpoint":
            assert "resuming from a checkpoint" in "\n".join(body["report"]["log"])
        record("SIGKILL", point, "succeeded", reclaim, finished)
    meter_matches_storage(cluster, "fault-alice")
    # The job killed after storing its bundle, before the model row: that bundle is nobody's.
    assert not [k for k in keys(cluster.bucket, cluster.endpoint) if k.startswith("jobs/")]
    swept_clean(cluster, allowed=lambda name: name.startswith("models/") and name.endswith("/bundle.zip"))


def test_fault_sigkill_int8(cluster, alice, trained_model, tmp_path):
    """The worker making a model's int8 version dies mid-step: beat fails the step with a sentence
    (not run again by itself: a model that kills its worker would loop), the model serves in fp32
    throughout, and asked again it is made."""
    model_id, point = trained_model, "int8.running"
    base = f"{cluster.web_a.url}/api/v1/models/{model_id}"
    victim = paused_worker(cluster, "victim-int8", "gpu", point, tmp_path)
    rescuer = None
    try:
        r = alice.post(f"{base}/int8/", timeout=30)
        assert r.status_code == 202 and r.json()["int8_status"] == "pending", r.text
        reached(tmp_path, point)
        watch = Watch(alice, cluster.web_a.url)
        assert watch.get(f"/models/{model_id}/")["int8_status"] == "running"
        r = alice.post(f"{base}/int8/", timeout=30)  # asked again while it runs: left to finish
        assert r.status_code == 202 and r.json()["int8_status"] == "running", r.text
        rescuer = cluster.worker("rescuer-int8", queue="gpu,celery", beat=True)
        cluster.kill(victim)
        killed = time.monotonic()
        while (body := watch.get(f"/models/{model_id}/"))["int8_status"] == "running":
            assert time.monotonic() - killed < STALE + BEAT + SLACK + 30, "the silent step was not failed"
            r = alice.post(f"{base}/predict/", files={"image": ("x.png", image_bytes(seed=3))}, timeout=60)
            watch.statuses.append(r.status_code)
            assert r.status_code == 200 and r.json()["model"]["precision"] == "fp32", r.text
            time.sleep(1)
        failed_after = time.monotonic() - killed
        assert body["int8_status"] == "failed" and "stopped before it finished" in body["int8"]["error"], body

        r = alice.post(f"{base}/int8/", timeout=30)
        assert r.status_code == 202 and r.json()["int8_status"] == "pending", r.text
        deadline = time.monotonic() + 300
        while (body := watch.get(f"/models/{model_id}/"))["int8_status"] in ("pending", "running"):
            assert time.monotonic() < deadline, body
            time.sleep(1)
        assert body["int8_status"] in ("kept", "refused"), body
        assert all(code < 500 for code in watch.statuses), watch.statuses
        r = alice.post(f"{base}/predict/", files={"image": ("x.png", image_bytes(seed=3))}, timeout=60)
        assert r.status_code == 200 and r.json()["model"]["precision"] == ("int8" if body["int8"]["kept"] else "fp32")
        r = alice.post(f"{base}/int8/", timeout=30)  # made: not made twice
        assert r.status_code == 409 and "made already" in r.json()["error"], r.text
        record("SIGKILL", point, f"failed in {failed_after:.0f} s, then {body['int8_status']}", None, failed_after)
    finally:
        stop(victim, rescuer)
    meter_matches_storage(cluster, "fault-alice")
    # The bundle the step replaced is nobody's now; it stays for the sweeper's grace period, then goes.
    removed = swept_clean(cluster, allowed=lambda name: name.startswith("models/") and "/bundle" in name)
    assert len(removed) == 1, removed


def test_fault_object_store_stopped_mid_write(cluster, alice, object_store, tmp_path):
    """SeaweedFS gone while an ingestion writes its thumbnails, and back a little later (a restart
    takes it ~20 s to answer): the dataset is handed back, tried again after a back-off that doubles
    (here 8, 16, 32 s), and ready once storage answers again."""
    point = "ingestion.claimed"  # the archive is fetched; every thumbnail write is still to come
    victim = cluster.worker(
        "victim-s3",
        queue="celery",
        env={"GRAFT_FAULT_PAUSE": point, "GRAFT_FAULT_DIR": str(tmp_path), "GRAFT_JOB_MAX_ATTEMPTS": "4"},
    )
    rescuer = None
    try:
        members = {f"c{c}/i{i}.png": image_bytes(seed=900 + 10 * c + i) for c in range(2) for i in range(6)}
        pk = upload(alice, cluster.web_a.url, make_zip(tmp_path / "s3.zip", members).read_bytes(), "fault-s3")
        reached(tmp_path, point)
        rescuer = cluster.worker("rescuer-s3", queue="celery", beat=True, env={"GRAFT_JOB_MAX_ATTEMPTS": "4"})
        object_store.stop()
        stopped = time.monotonic()
        release(tmp_path, point)
        watch = Watch(alice, cluster.web_a.url)

        def handed_back() -> bool:
            row = Dataset.objects.get(pk=pk)
            watch.get(f"/datasets/{pk}/")
            return row.status == Dataset.Status.PROCESSING and row.heartbeat_at is None and row.attempts == 1

        wait_for(handed_back, 120, "the ingestion to hand the dataset back")
        object_store.start()
        body = watch.until(f"/datasets/{pk}/", ("ready", "failed"), 300)
        assert body["status"] == "ready" and body["num_images"] == 12, body
        assert all(code < 500 for code in watch.statuses), watch.statuses
        assert Dataset.objects.get(pk=pk).attempts >= 2
        record("object store stopped", point, "ready", None, time.monotonic() - stopped)
    finally:
        stop(victim, rescuer)
    meter_matches_storage(cluster, "fault-alice")
    swept_clean(cluster, allowed=lambda name: False)
