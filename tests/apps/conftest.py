"""Integration fixtures: the real PostgreSQL test database, Redis, and a real Celery worker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from django.conf import settings

from tests.conftest import IN_CI, ROOT

pytestmark = pytest.mark.integration


def _require_services() -> None:
    if settings.INTEGRATION:
        return
    why = "integration tests need PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379"
    pytest.fail(why) if IN_CI else pytest.skip(why)


@pytest.fixture(scope="session")
def celery_worker_process(django_db_setup, django_db_blocker) -> Iterator[subprocess.Popen]:
    """A real `celery worker` process, consuming both queues, on the test database."""
    _require_services()
    from apps.celery import app

    with django_db_blocker.unblock():
        app.control.purge()
    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = Path(settings.DATA_DIR) / "worker.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "apps", "worker", "-Q", "gpu,celery", "-c", "2", "-l", "INFO"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while "ready." not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"celery worker did not start:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.3)
    yield proc
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()
    with django_db_blocker.unblock():
        _wait_for_other_sessions_to_close(db["NAME"])


def _wait_for_other_sessions_to_close(name: str, timeout: float = 15) -> list[tuple]:
    """The worker's backends end a moment after it exits; the test DB can only be dropped then.
    Returns the sessions still open at the timeout (state, last query), if any."""
    from django.db import connection

    deadline = time.monotonic() + timeout
    while True:
        with connection.cursor() as cur:
            cur.execute(
                "SELECT state, left(query, 200) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
                [name],
            )
            left = cur.fetchall()
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


@pytest.fixture(scope="session", autouse=True)
def no_database_sessions_left(django_db_setup, django_db_blocker) -> Iterator[None]:
    """At the end of the run, every other session on the test database has closed (a server thread
    kept alive by a client, a writer thread): otherwise the database cannot be dropped. Names them."""
    yield
    if not settings.INTEGRATION:
        return
    with django_db_blocker.unblock():
        left = _wait_for_other_sessions_to_close(settings.DATABASES["default"]["NAME"], timeout=10)
    if left:
        warnings.warn(f"database sessions still open at the end of the run: {left}", stacklevel=1)


@pytest.fixture
def own_storage(settings, tmp_path):
    """The test's own local storage: the files it leaves do not reach the tests after it (a test's
    rows are rolled back or flushed; its stored files would stay)."""
    settings.MEDIA_ROOT = tmp_path / "media"


def stored_files(prefix: str = "") -> set[str]:
    """Every stored file under `prefix`, through the storage API (local files or S3)."""
    from django.core.files.storage import default_storage

    def walk(folder: str) -> set[str]:
        try:
            dirs, files = default_storage.listdir(folder)
        except FileNotFoundError:
            return set()
        return {folder + f for f in files}.union(*(walk(f"{folder}{d}/") for d in dirs))

    return walk(prefix)


class Api:
    """A program talking to Graft over HTTP with a token, as in the README."""

    def __init__(self, base: str, token: str | None = None) -> None:
        self.base = base.rstrip("/") + "/api/v1"
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Token {token}"

    def close(self) -> None:
        """Close the kept-alive connections now. `Session.close()` alone does not: urllib3 2.8's pool
        manager drops its pools and leaves their connections to the pools' finalizers, which wait while
        any of their responses is still referenced (one was, at the end of a test of projects). An open
        connection keeps its live-server thread, and that thread's database session, alive; the test
        database could then not be dropped at the end of the run."""
        for adapter in self.session.adapters.values():  # requests' HTTPAdapters, one per scheme
            pools = adapter.poolmanager.pools
            for key in pools.keys():
                pools[key].close()
        self.session.close()

    def call(self, method: str, path: str, **kw) -> requests.Response:
        return self.session.request(method, self.base + path, timeout=120, **kw)

    def upload(self, path_or_bytes, filename: str = "data.zip", name: str = "") -> requests.Response:
        data = path_or_bytes.read_bytes() if isinstance(path_or_bytes, Path) else path_or_bytes
        return self.call("POST", "/datasets/", files={"file": (filename, data)}, data={"name": name})

    def wait(self, path: str, done: tuple[str, ...], timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            body = self.call("GET", path).json()
            if body.get("status") in done:
                return body
            time.sleep(0.5)
        raise AssertionError(f"{path} did not reach {done}: {body}")


@pytest.fixture
def make_user(django_user_model):
    def make(username: str = "alice", password: str = "correct horse battery"):
        return django_user_model.objects.create_user(username=username, password=password)

    return make


@pytest.fixture
def api_for(live_server, make_user):
    """api_for('alice') -> an Api client authenticated with a token obtained over HTTP."""

    made: list[Api] = []

    def make(username: str = "alice") -> Api:
        password = "correct horse battery"
        make_user(username, password)
        r = requests.post(
            f"{live_server.url}/api/v1/auth/token/", json={"username": username, "password": password}, timeout=30
        )
        assert r.status_code == 200, r.text
        made.append(Api(live_server.url, r.json()["token"]))
        return made[-1]

    yield make
    for api in made:
        api.close()


@pytest.fixture
def make_tiny_model(tmp_path):
    """make_tiny_model(owner) -> a TrainedModel (cat/dog) whose bundle, a tiny network, is in storage."""
    import torch
    from torch import nn

    from apps.serving.models import TrainedModel
    from apps.serving.services import bundle_store
    from ml.backbones import Preprocessing
    from ml.bundle import write_bundle

    def make(owner, name: str = "pets", seed: int = 0) -> TrainedModel:
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
        prep = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3)
        out = tmp_path / f"bundle-{name}-{seed}"
        archive = write_bundle(out, model=net, classes=["cat", "dog"], preprocessing=prep, metrics={}, card={})
        stored = bundle_store(str(archive))
        return TrainedModel.objects.create(
            owner=owner,
            name=name,
            storage_prefix=stored.prefix,
            bundle=stored.name,
            bundle_bytes=stored.size,
            bundle_sha256=stored.sha256,
            classes=["cat", "dog"],
        )

    return make
