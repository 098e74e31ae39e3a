"""apps.common.storage on S3: every thread reads and deletes through the process's one client.

django-storages makes a boto3 resource for each thread that touches it (about 15 MiB each; a
fresh web process's first gallery page added 107 MiB, tests/benchmarks/bench_memory.py).
"""

from __future__ import annotations

import threading
import uuid
import zipfile
from collections.abc import Iterator

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import override_settings

from apps.common import storage
from apps.common.storage import delete_prefix, open_if_stored, open_seekable, open_stream, s3_client
from tests.conftest import IN_CI, make_zip


@pytest.fixture
def s3_storage(settings) -> Iterator[None]:
    """The default storage on a bucket of its own at the test S3 server (SeaweedFS takes any key)."""
    from tests.settings import S3_ENDPOINT, S3_REACHABLE

    if not S3_REACHABLE:
        why = f"needs an S3 server at {S3_ENDPOINT}"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    options = {
        "bucket_name": f"graft-storage-test-{uuid.uuid4().hex[:12]}",
        "endpoint_url": S3_ENDPOINT,
        "region_name": "us-east-1",
        "access_key": "graft",
        "secret_key": "graft-secret",
        "addressing_style": "path",
        "signature_version": "s3v4",
    }
    backend = {"BACKEND": "storages.backends.s3.S3Storage", "OPTIONS": options}
    with override_settings(STORAGES={**settings.STORAGES, "default": backend}):
        client = s3_client()
        assert client is not None
        client.create_bucket(Bucket=options["bucket_name"])
        try:
            yield
        finally:
            for listed in client.list_objects(Bucket=options["bucket_name"]).get("Contents", []):
                client.delete_object(Bucket=options["bucket_name"], Key=listed["Key"])
            client.delete_bucket(Bucket=options["bucket_name"])


def _threads_at_once(work, n: int = 2) -> list:
    """`work()` in `n` threads that start together; what each returned."""
    barrier, results = threading.Barrier(n), [None] * n

    def run(i: int) -> None:
        barrier.wait()
        results[i] = work()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return results


def test_threads_share_one_s3_client(s3_storage, monkeypatch):
    default_storage.save("a/one.bin", ContentFile(b"one" * 1000))
    made: list[object] = []
    new_client = storage._new_client

    def counted(backend: object) -> object:
        made.append(new_client(backend))
        return made[-1]

    monkeypatch.setattr(storage, "_new_client", counted)
    monkeypatch.setattr(storage, "_client", None)  # a fresh process: the two threads race to make it

    def read() -> tuple[bytes, object, object]:
        with open_stream("a/one.bin") as fh:
            body = fh.read()
        own = getattr(default_storage._connections, "connection", None)  # django-storages' per-thread resource
        return body, s3_client(), own

    results = _threads_at_once(read)
    assert [body for body, _, _ in results] == [b"one" * 1000] * 2
    assert len(made) == 1 and all(client is made[0] for _, client, _ in results)
    assert [own for _, _, own in results] == [None, None]  # neither thread made a resource of its own


def test_reads_and_deletes_on_the_shared_client(s3_storage, tmp_path):
    members = {"a/x.txt": b"x" * 5000, "b/y.txt": b"y"}
    default_storage.save("d/1/archive.zip", ContentFile(make_zip(tmp_path / "z.zip", members).read_bytes()))
    default_storage.save("d/1/other.bin", ContentFile(b"o"))
    default_storage.save("d/10/kept.bin", ContentFile(b"k"))

    with open_seekable("d/1/archive.zip", buffer_size=1024) as fh, zipfile.ZipFile(fh) as zf:
        assert zf.read("a/x.txt") == members["a/x.txt"]
    assert open_if_stored("d/1/missing.bin") is None

    delete_prefix("d/1/")
    assert open_if_stored("d/1/other.bin") is None and open_if_stored("d/1/archive.zip") is None
    assert open_stream("d/10/kept.bin").read() == b"k"  # a sibling prefix is not under d/1/
    storage.delete_quietly("d/10/kept.bin")
    storage.delete_quietly("d/10/kept.bin")  # gone already: nothing to say
    assert open_if_stored("d/10/kept.bin") is None
