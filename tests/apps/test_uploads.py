"""Resumable uploads (tus): an interrupted upload resumes from where it stopped."""

from __future__ import annotations

import base64
import time

import pytest

from apps.datasets.models import Upload
from tests.apps.conftest import stored_files
from tests.conftest import class_folders, make_zip

pytestmark = pytest.mark.integration

TUS = {"Tus-Resumable": "1.0.0"}


def _meta(**kw: str) -> str:
    return ",".join(f"{k} {base64.b64encode(v.encode()).decode()}" for k, v in kw.items())


def _patch(api, url: str, offset: int, data: bytes):
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    return api.session.patch(url, data=data, headers=headers, timeout=60)


def test_upload_resumes_after_an_interruption_and_becomes_a_dataset(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    data = make_zip(tmp_path / "d.zip", class_folders({"cats": 6, "dogs": 6})).read_bytes()
    r = api.call("OPTIONS", "/uploads/")
    assert r.status_code == 204 and "creation" in r.headers["Tus-Extension"]
    r = api.call(
        "POST",
        "/uploads/",
        headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": _meta(filename="pets.zip", name="Pets")},
    )
    assert r.status_code == 201, r.text
    url = r.headers["Location"]

    half = len(data) // 2
    assert _patch(api, url, 0, data[:half]).headers["Upload-Offset"] == str(half)
    # The connection "dropped": the client asks where to resume.
    head = api.session.head(url, headers=TUS, timeout=30)
    assert head.status_code == 200 and head.headers["Upload-Offset"] == str(half)
    r = _patch(api, url, 0, data)  # a stale offset is refused, not appended twice
    assert r.status_code == 409 and str(half) in r.json()["error"]

    # Someone else cannot see or finish it.
    assert api_for("bob").session.head(url, headers=TUS, timeout=30).status_code == 404

    r = _patch(api, url, half, data[half:])
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data))
    dataset = api.wait(f"/datasets/{r.headers['Graft-Dataset']}/", ("ready", "failed"), timeout=120)
    assert dataset["status"] == "ready" and dataset["name"] == "Pets"
    assert {c["name"] for c in dataset["classes"]} == {"cats", "dogs"}
    # The parts became the dataset's archive (only this upload's: other tests leave unfinished ones).
    assert stored_files(Upload.objects.get().storage_prefix) == set()
    # A client that lost that last response asks again, and learns the same dataset.
    head = api.session.head(url, headers=TUS, timeout=30)
    assert head.headers["Graft-Dataset"] == r.headers["Graft-Dataset"]
    assert Upload.objects.get().dataset_id == int(r.headers["Graft-Dataset"])


def test_bad_uploads_are_refused_with_a_sentence(api_for):
    api = api_for("alice")
    r = api.call(
        "POST", "/uploads/", headers={**TUS, "Upload-Length": "10", "Upload-Metadata": _meta(filename="cats.tar")}
    )
    assert r.status_code == 400 and "not a .zip" in r.json()["error"]
    r = api.call("POST", "/uploads/", headers={**TUS, "Upload-Length": str(10**15)})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    r = api.call("POST", "/uploads/", headers=TUS)
    assert r.status_code == 400 and "Upload-Length" in r.json()["error"]

    # A finished upload that is not a zip: a readable error, and nothing left behind.
    junk = b"this is not a zip file at all"
    url = api.call(
        "POST",
        "/uploads/",
        headers={**TUS, "Upload-Length": str(len(junk)), "Upload-Metadata": _meta(filename="x.zip")},
    ).headers["Location"]
    r = _patch(api, url, 0, junk)
    assert r.status_code == 400 and "not a zip archive" in r.json()["error"]
    assert not Upload.objects.exists()
    assert api.call("GET", "/datasets/").json()["results"] == []


def _create(api, data: bytes) -> str:
    r = api.call("POST", "/uploads/", headers={**TUS, "Upload-Length": str(len(data))})
    assert r.status_code == 201, r.text
    return r.headers["Location"]


def test_a_second_writer_is_refused_while_the_first_holds_the_upload(api_for, tmp_path):
    """One PATCH at a time, whichever web host each lands on: the lease lives in the database."""
    from datetime import timedelta
    from uuid import uuid4

    from django.utils import timezone

    api = api_for("alice")
    data = make_zip(tmp_path / "d.zip", class_folders({"cats": 6, "dogs": 6})).read_bytes()
    url = _create(api, data)
    upload = Upload.objects.get()
    # Another request (on any host) is writing it now.
    Upload.objects.filter(pk=upload.pk).update(writer=uuid4(), writer_until=timezone.now() + timedelta(seconds=30))
    r = _patch(api, url, 0, data[:100])
    assert r.status_code == 423 and "retry" in r.json()["error"]
    assert api.session.head(url, headers=TUS, timeout=30).headers["Upload-Offset"] == "0"
    # That writer died: once its lease runs out, the upload is free again.
    Upload.objects.filter(pk=upload.pk).update(writer_until=timezone.now() - timedelta(seconds=1))
    r = _patch(api, url, 0, data[:100])
    assert r.status_code == 204 and r.headers["Upload-Offset"] == "100"
    assert Upload.objects.get().writer is None  # released at the end of the PATCH


def test_a_dropped_connection_keeps_every_byte_that_arrived(live_server, api_for, tmp_path):
    import socket
    from urllib.parse import urlparse

    api = api_for("alice")
    data = make_zip(tmp_path / "d.zip", class_folders({"cats": 6, "dogs": 6})).read_bytes()
    url = urlparse(_create(api, data))
    sent = len(data) // 3
    head = (
        f"PATCH {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: {api.session.headers['Authorization']}\r\nTus-Resumable: 1.0.0\r\n"
        f"Upload-Offset: 0\r\nContent-Type: application/offset+octet-stream\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port)) as s:
        s.sendall(head.encode() + data[:sent])  # then the connection drops mid-body
    offset = None
    for _ in range(50):  # the server notices the drop when its read comes up short
        offset = int(api.session.head(url.geturl(), headers=TUS, timeout=30).headers["Upload-Offset"])
        if offset == sent:
            break
        time.sleep(0.1)
    assert offset == sent
    r = _patch(api, url.geturl(), sent, data[sent:])
    assert r.status_code == 204 and r.headers["Upload-Offset"] == str(len(data))


class _Body:
    """A request body of `length` bytes arriving in pieces of 1000; `on_read(n)` runs before the n-th read."""

    def __init__(self, length: int, on_read=lambda n: None) -> None:
        self.left, self.reads, self.on_read = length, 0, on_read

    def read(self, size: int) -> bytes:
        self.reads += 1
        self.on_read(self.reads)
        piece = b"x" * min(size, 1000, self.left)
        self.left -= len(piece)
        return piece


def test_a_patch_that_loses_the_upload_midway_leaves_no_partial_part(db, make_user, monkeypatch):
    """This PATCH stalled past its lease between two pieces of its body, and another request took
    the upload over: it is answered 409, and none of its bytes stay in storage."""
    from datetime import timedelta

    from django.utils import timezone

    from apps.common.errors import UserError
    from apps.datasets import tus

    monkeypatch.setattr(tus, "RENEW_EVERY", 0.0)  # the stall outlasted it anyway
    upload = tus.upload_create(owner=make_user(), length=3000)

    def stall_then_lose_the_upload(n: int) -> None:
        if n == 2:
            Upload.objects.filter(pk=upload.pk).update(writer_until=timezone.now() - timedelta(seconds=1))
            tus._Lease(upload, 0).take()  # the other request

    with pytest.raises(UserError) as refused:
        tus.upload_append(upload=upload, offset=0, stream=_Body(3000, stall_then_lose_the_upload), declared=3000)
    assert refused.value.status_code == 409
    assert stored_files(upload.storage_prefix) == set()
    upload.refresh_from_db()
    assert upload.offset == 0 and upload.parts == []


def test_a_delete_that_loses_the_race_to_a_patch_deletes_none_of_the_parts(db, make_user):
    """A tus DELETE finds the upload idle, but a PATCH takes it just before the DELETE statement
    runs: the DELETE is refused (423, retry), the upload keeps every stored part, and a later
    DELETE removes them all."""
    from django.db import connection

    from apps.common.errors import UserError
    from apps.datasets import tus

    upload = tus.upload_create(owner=make_user(), length=3000)
    tus.upload_append(upload=upload, offset=0, stream=_Body(1000), declared=1000)
    stored = stored_files(upload.storage_prefix)
    assert len(stored) == 1

    patched = []

    def a_patch_comes_first(execute, sql, params, many, context):
        if sql.startswith('DELETE FROM "datasets_upload"') and not patched:
            patched.append(tus._Lease(upload, 1000).take())  # another request, committed before it
        return execute(sql, params, many, context)

    with connection.execute_wrapper(a_patch_comes_first), pytest.raises(UserError) as refused:
        tus.upload_delete(upload=Upload.objects.get(pk=upload.pk), unless_writing=True)
    assert patched and refused.value.status_code == 423
    assert stored_files(upload.storage_prefix) == stored
    assert Upload.objects.get(pk=upload.pk).parts == sorted(stored)

    patched[0].release()
    tus.upload_delete(upload=Upload.objects.get(pk=upload.pk), unless_writing=True)
    assert not Upload.objects.filter(pk=upload.pk).exists()
    assert stored_files(upload.storage_prefix) == set()


def test_expiry_removes_idle_uploads_but_not_one_being_written(db, make_user, settings):
    """An upload idle past GRAFT_UPLOAD_EXPIRY_HOURS is removed with its parts; one that a PATCH
    has just started writing again is not abandoned, and keeps its parts."""
    from datetime import timedelta

    from django.utils import timezone

    from apps.datasets import tus

    idle, resumed = (tus.upload_create(owner=make_user(name), length=3000) for name in ("alice", "bob"))
    for upload in (idle, resumed):
        tus.upload_append(upload=upload, offset=0, stream=_Body(1000), declared=1000)
    long_ago = timezone.now() - timedelta(hours=settings.GRAFT_UPLOAD_EXPIRY_HOURS + 1)
    Upload.objects.filter(pk__in=[idle.pk, resumed.pk]).update(updated_at=long_ago)
    lease = tus._Lease(Upload.objects.get(pk=resumed.pk), 1000).take()  # its owner came back

    assert tus.upload_expire() == 1
    assert not Upload.objects.filter(pk=idle.pk).exists() and stored_files(idle.storage_prefix) == set()
    assert Upload.objects.filter(pk=resumed.pk).exists() and len(stored_files(resumed.storage_prefix)) == 1
    lease.release()
