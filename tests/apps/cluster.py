"""A deployment in processes, for the many-hosts and fault-injection tests: web hosts and workers
that share nothing but PostgreSQL, the broker and an S3 bucket.

Every process here is a real one (gunicorn, `celery worker`), with its own GRAFT_DATA_DIR and
no shared directory; storage is a real S3 server (SeaweedFS, started by scripts/test.sh).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from django.conf import settings

from apps.training.models import Job
from tests.conftest import IN_CI, ROOT, image_bytes, make_zip

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

    def __init__(self, root: Path, bucket: str, endpoint: str | None = None, broker: str = BROKER) -> None:
        self.root, self.bucket, self.broker = root, bucket, broker
        self.endpoint = endpoint or settings.S3_ENDPOINT
        self.hosts: list[Host] = []

    def env(self, data_dir: Path, name: str = "") -> dict[str, str]:
        db = settings.DATABASES["default"]
        # Each host's database sessions carry its name (pg_stat_activity.application_name).
        return {
            **os.environ,
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}?application_name={name}",
            "CELERY_BROKER_URL": self.broker,
            "GRAFT_DATA_DIR": str(data_dir),
            "AWS_STORAGE_BUCKET_NAME": self.bucket,
            "AWS_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "graft",
            "AWS_SECRET_ACCESS_KEY": "graft-test-s3-key-8c1f2e",
            "AWS_S3_REGION_NAME": "us-east-1",
            "GRAFT_JOB_STALE_SECONDS": str(STALE),
            "GRAFT_HEARTBEAT_SECONDS": str(HEARTBEAT),
            "GRAFT_JOB_MAX_ATTEMPTS": str(MAX_ATTEMPTS),
            "PYTHONUNBUFFERED": "1",
        }

    def _start(self, name: str, argv: list[str], extra_env: dict[str, str] | None = None) -> Host:
        data_dir = self.root / name
        data_dir.mkdir(parents=True)
        log = self.root / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            cwd=ROOT,
            env={**self.env(data_dir, name), **(extra_env or {})},
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
        self._wait(host, lambda: ready(host.url))
        return host

    def _unique(self, name: str) -> str:
        """`name`, or `name-2`, `name-3`... when a host of that name was started before."""
        taken = {h.name for h in self.hosts}
        return next(n for n in [name, *(f"{name}-{i}" for i in range(2, 1000))] if n not in taken)

    def worker(self, name: str, queue: str = "gpu", beat: bool = False, env: dict[str, str] | None = None) -> Host:
        name = self._unique(name)
        argv = [sys.executable, "-m", "celery", "-A", "apps", "worker", "-Q", queue, "-c", "1", "-n", f"{name}@%h"]
        schedule = ["--schedule", str(self.root / f"{name}-beat")] if beat else []
        host = self._start(name, [*argv, "-l", "INFO", *(["-B", *schedule] if beat else [])], env)
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


def ready(url: str) -> bool:
    try:  # the first request imports the app (torch and all): give it time
        return requests.get(f"{url}/health/ready/", timeout=30).status_code == 200
    except requests.RequestException:
        return False


def s3(endpoint: str | None = None):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint or settings.S3_ENDPOINT,
        aws_access_key_id="graft",
        aws_secret_access_key="graft-test-s3-key-8c1f2e",
        region_name="us-east-1",
    )


def create_bucket(bucket: str, timeout: float = 60, endpoint: str | None = None) -> None:
    """A server just started opens its port before its volumes are ready: try until it takes it."""
    from botocore.exceptions import ClientError, EndpointConnectionError

    deadline = time.monotonic() + timeout
    while True:
        try:
            s3(endpoint).create_bucket(Bucket=bucket)
            return
        except (ClientError, EndpointConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def keys(bucket: str, endpoint: str | None = None) -> list[str]:
    pages = s3(endpoint).get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def flush_broker(broker: str = BROKER) -> None:
    import redis

    redis.Redis.from_url(broker).flushdb()


@contextmanager
def running_cluster(
    root: Path,
    django_db_blocker,
    *,
    ingest: bool = True,
    web: int = 2,
    endpoint: str | None = None,
    broker: str = BROKER,
) -> Iterator[Cluster]:
    """A fresh bucket and broker, `web` web hosts and (with `ingest`) an ingestion worker with beat;
    everything stopped and emptied afterwards."""
    if not (settings.INTEGRATION and settings.S3_REACHABLE):
        why = f"these tests need PostgreSQL, Redis and S3 at {settings.S3_ENDPOINT}"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    bucket = f"graft-test-{uuid.uuid4().hex[:12]}"
    create_bucket(bucket, endpoint=endpoint)
    flush_broker(broker)
    c = Cluster(root, bucket, endpoint, broker)
    try:
        if ingest:
            c.ingest = c.worker("ingest", queue="celery", beat=True)  # ingestion, and beat re-queues lost work
        webs = [c.web(f"web-{chr(ord('a') + i)}") for i in range(web)]
        c.web_a, c.web_b = webs[0], webs[-1]
        yield c
    finally:
        c.stop()
        flush_broker(broker)
        for key in keys(bucket, endpoint):
            s3(endpoint).delete_object(Bucket=bucket, Key=key)
        s3(endpoint).delete_bucket(Bucket=bucket)
        from tests.apps.conftest import _wait_for_other_sessions_to_close

        with django_db_blocker.unblock():
            _wait_for_other_sessions_to_close(settings.DATABASES["default"]["NAME"])


def learnable_zip(tmp_path: Path, per_class: int = 24) -> bytes:
    """Two classes a model can tell apart (red and blue squares, each with its own noise)."""
    members = {}
    for i in range(per_class):
        members[f"red/r{i}.png"] = image_bytes(color=(200, 40, 40), seed=2 * i)
        members[f"blue/b{i}.png"] = image_bytes(color=(40, 40, 200), seed=2 * i + 1)
    return make_zip(tmp_path / "colours.zip", members).read_bytes()


def session(url: str, make_user, username: str) -> requests.Session:
    make_user(username, PASSWORD)
    r = requests.post(f"{url}/api/v1/auth/token/", json={"username": username, "password": PASSWORD}, timeout=30)
    assert r.status_code == 200, r.text
    s = requests.Session()
    s.headers["Authorization"] = f"Token {r.json()['token']}"
    return s


def wait(s: requests.Session, url: str, done: tuple[str, ...], timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = s.get(url, timeout=30).json()
        if body.get("status") in done:
            return body
        time.sleep(0.5)
    raise AssertionError(f"{url} did not reach {done}: {body}")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def holder(cluster: Cluster, job_id: int) -> Host:
    """The host of the worker that claimed the job (its node name is on the job)."""
    node = Job.objects.get(pk=job_id).worker
    return next(h for h in cluster.hosts if node.startswith(f"{h.name}@"))


def files_outside_scratch(host: Host) -> list[str]:
    return [
        str(p.relative_to(host.data_dir))
        for p in host.data_dir.rglob("*")
        if p.is_file() and p.relative_to(host.data_dir).parts[0] != "work"
    ]
