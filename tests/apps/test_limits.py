"""Request bodies are bounded before anything reads them: a body over its path's limit gets
413 at once, whoever sends it (no sign-in, a session, a token), without the server waiting for it."""

from __future__ import annotations

import json
import socket
from urllib.parse import urlparse

import pytest

from apps.common.limits import BodyTooLarge, _CappedStream

pytestmark = pytest.mark.integration

HUNDRED_MB = 100 * 1024**2


def _announce(url: str, path: str, length: int, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """Send only the headers of a POST announcing `length` bytes, then read the answer.

    A server that reads the body first would wait for bytes that never come (the test times out)."""
    u = urlparse(url)
    lines = [f"POST {path} HTTP/1.1", f"Host: {u.netloc}", f"Content-Length: {length}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:] if ": " in line)
    return status, fields, body


def test_an_unauthenticated_100_mb_post_is_refused_before_its_body_is_read(live_server):
    status, _, body = _announce(
        live_server.url, "/api/v1/auth/token/", HUNDRED_MB, {"Content-Type": "multipart/form-data; boundary=x"}
    )
    assert status == 413
    assert "limit of 1.0 MiB" in json.loads(body)["error"]


def test_a_signed_in_browser_post_over_the_limit_gets_413_not_a_csrf_403(live_server, client, make_user):
    make_user("alice")
    client.login(username="alice", password="correct horse battery")
    cookie = f"sessionid={client.cookies['sessionid'].value}"
    status, _, body = _announce(
        live_server.url,
        "/api/v1/models/1/predict/",
        HUNDRED_MB,
        {"Cookie": cookie, "Content-Type": "multipart/form-data; boundary=x"},
    )
    assert status == 413 and "limit" in json.loads(body)["error"]
    status, _, body = _announce(live_server.url, "/accounts/login/", HUNDRED_MB, {"Cookie": cookie})
    assert status == 413 and b"limit" in body


def test_bodies_within_their_path_limit_still_work(api_for):
    api = api_for("alice")  # the token request itself is a small JSON body
    r = api.call("POST", "/jobs/", json={"dataset": 12345})
    assert r.status_code in (400, 404)  # read and answered, not refused for size
    # A 3 MB phone photo at a project's stable prediction URL, and a zip of images to add as a
    # version: read and answered (no such project or dataset here), not refused at 1 MiB.
    photo = ("photo.jpg", b"\xff" * 3_000_000, "image/jpeg")
    assert api.call("POST", "/projects/12345/predict/", files={"image": photo}).status_code == 404
    more = ("more.zip", b"PK" + b"\0" * 3_000_000, "application/zip")
    assert api.call("POST", "/datasets/12345/versions/", files={"file": more}).status_code == 404


def test_a_body_without_a_length_stops_at_the_limit():
    import io

    stream = _CappedStream(io.BytesIO(b"x" * 100), limit=64)
    assert stream.read(60) == b"x" * 60
    with pytest.raises(BodyTooLarge):
        stream.read(10)
