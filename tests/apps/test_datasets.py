"""Uploads over HTTP, ingested by the real worker: good archives become ready, bad ones fail
clearly, and nothing is left in storage outside a dataset's own folder."""

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest
from django.conf import settings

from apps.datasets.models import Dataset
from tests.apps.conftest import stored_files
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _zip_bytes(tmp_path: Path, members: dict[str, bytes]) -> bytes:
    return make_zip(tmp_path / "upload.zip", members).read_bytes()


def _upload_and_wait(api, data: bytes, filename: str = "upload.zip") -> dict:
    r = api.upload(data, filename)
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "processing"
    return api.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=120)


def test_good_upload_becomes_ready_with_report(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    members = class_folders({"cats": 6, "dogs": 5}, prefix="pets/")
    members["pets/dogs/broken.jpg"] = b"\xff\xd8\xff garbage"
    members["pets/cats/again.png"] = members["pets/cats/img_0.png"]
    body = _upload_and_wait(api, _zip_bytes(tmp_path, members))
    assert body["status"] == "ready", body
    assert body["num_images"] == 11
    # Every image's split is written down at ingestion: the stratified split a fit makes (20 %).
    assert body["classes"] == [
        {"name": "cats", "count": 6, "train": 5, "val": 1},
        {"name": "dogs", "count": 5, "train": 4, "val": 1},
    ]
    codes = {w["code"]: w for w in body["warnings"]}
    assert any("pets/dogs/broken.jpg" in f for f in codes["unreadable"]["files"])
    assert codes["duplicate"]["files"]
    prefix = Dataset.objects.get(pk=body["id"]).storage_prefix
    stored = stored_files(prefix)
    assert {f"{prefix}archive.zip", f"{prefix}manifest.json"} <= stored
    # One stored thumbnail per image the page shows (11 readable, distinct images here), and one
    # per image for the review gallery; the finders' results follow (a background task).
    assert len([f for f in stored if f.startswith(f"{prefix}thumbs/")]) == 11
    assert len([f for f in stored if f.startswith(f"{prefix}images/")]) == 11
    assert all(
        f.split("/")[2] in ("archive.zip", "manifest.json", "thumbs", "images", "findings", "embeddings.npz")
        for f in stored
    ), stored


def _symlink_zip(tmp_path: Path) -> bytes:
    path = make_zip(tmp_path / "s.zip", class_folders({"a": 5, "b": 5}))
    with zipfile.ZipFile(path, "a") as zf:
        info = zipfile.ZipInfo("a/evil.png")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../../../etc/passwd")
    return path.read_bytes()


def _bomb_zip(tmp_path: Path) -> bytes:
    path = tmp_path / "bomb.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in class_folders({"a": 5, "b": 5}).items():
            zf.writestr(name, data)
        zf.writestr("a/evil.png", b"\0" * (100 * 1024**2))
    return path.read_bytes()


BAD_ARCHIVES = {
    "traversal": (
        lambda t: _zip_bytes(t, class_folders({"a": 5, "b": 5}) | {"a/../../evil.png": image_bytes()}),
        "a/../../evil.png",
    ),
    "absolute": (
        lambda t: _zip_bytes(t, class_folders({"a": 5, "b": 5}) | {"/tmp/evil.png": image_bytes()}),
        "/tmp/evil.png",
    ),
    "symlink": (_symlink_zip, "a/evil.png"),
    "zip bomb": (_bomb_zip, "zip bomb"),
    "empty archive": (lambda t: _zip_bytes(t, {"__MACOSX/._x": b""}), "empty"),
    "one class": (lambda t: _zip_bytes(t, class_folders({"cats": 9})), "only one: 'cats'"),
    "tiny class": (lambda t: _zip_bytes(t, class_folders({"cats": 9, "dogs": 3})), "'dogs' has 3"),
    "all corrupt": (lambda t: _zip_bytes(t, {"a/1.jpg": b"x", "b/2.png": b"y"}), "no readable images"),
}


@pytest.mark.parametrize("case", list(BAD_ARCHIVES))
def test_bad_archives_fail_with_a_clear_error_and_leave_nothing(celery_worker_process, api_for, tmp_path, case):
    build, needle = BAD_ARCHIVES[case]
    api = api_for("alice")
    before = stored_files()
    body = _upload_and_wait(api, build(tmp_path))
    assert body["status"] == "failed"
    assert needle in body["error"], body["error"]
    # The failed upload's archive is gone, nothing was extracted anywhere. (Datasets of earlier tests
    # may still gain their finders' results meanwhile: a background task, under their own folders.)
    earlier = {f.split("/")[1] for f in before if f.startswith("datasets/")}
    new = {f for f in stored_files() - before if not (f.startswith("datasets/") and f.split("/")[1] in earlier)}
    assert new == set(), new
    assert not list(Path(settings.DATA_DIR).rglob("evil*")) and not Path("/tmp/evil.png").exists()


def test_non_zip_upload_is_rejected_at_once(live_server, api_for):
    api = api_for("alice")
    before = stored_files()
    r = api.upload(b"GIF89a not a zip", "photos.zip")
    assert r.status_code == 400 and "'photos.zip' is not a zip archive" in r.json()["error"]
    r = api.upload(b"", "empty.zip")
    assert r.status_code == 400 and "empty" in r.json()["error"]
    r = api.call("POST", "/datasets/", data={"name": "x"})
    assert r.status_code == 400 and "'file'" in r.json()["error"]
    assert Dataset.objects.count() == 0 and stored_files() == before


def test_over_size_upload_is_413(live_server, api_for, settings, tmp_path):
    settings.GRAFT_MAX_UPLOAD_BYTES = 100_000
    api = api_for("alice")
    before = stored_files()
    r = api.upload(b"PK" + b"\0" * 300_000, "big.zip")
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert Dataset.objects.count() == 0 and stored_files() == before


def test_the_same_content_uploaded_twice_points_to_the_first(celery_worker_process, api_for, tmp_path):
    api = api_for("alice")
    members = class_folders({"cats": 5, "dogs": 5})
    first = _upload_and_wait(api, _zip_bytes(tmp_path, members))
    # The same images and labels, packed differently (another wrapping folder, another order).
    again = _upload_and_wait(api, _zip_bytes(tmp_path, {f"copy/{k}": v for k, v in reversed(members.items())}))
    same = [w for w in again["warnings"] if w["code"] == "same_as_dataset"]
    assert same and same[0]["dataset"] == first["id"] and "same images and labels" in same[0]["message"]
    assert not [w for w in first["warnings"] if w["code"] == "same_as_dataset"]
    from django.contrib.auth.models import User
    from django.test import Client

    page = Client()
    page.force_login(User.objects.get(username="alice"))
    html = page.get(f"/datasets/{again['id']}/").content.decode()
    assert f'href="/datasets/{first["id"]}/"' in html and "Delete this copy" in html
    # Another user's identical upload is not pointed at Alice's.
    bob = _upload_and_wait(api_for("bob"), _zip_bytes(tmp_path, members))
    assert not [w for w in bob["warnings"] if w["code"] == "same_as_dataset"]
