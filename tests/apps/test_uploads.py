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
    assert stored_files("uploads/") == set()  # the parts became the dataset's archive
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
