"""Per-user quotas: a readable 4xx past each, and the dashboard shows where a user stands."""

from __future__ import annotations

import base64

import pytest

from apps.datasets.models import Dataset, Upload
from apps.training.models import Job
from tests.conftest import class_folders, make_zip

pytestmark = pytest.mark.integration

TUS = {"Tus-Resumable": "1.0.0"}


def _open_upload(api, length: int, name: str = "d.zip"):
    meta = f"filename {base64.b64encode(name.encode()).decode()}"
    return api.call("POST", "/uploads/", headers={**TUS, "Upload-Length": str(length), "Upload-Metadata": meta})


def test_uploads_in_progress_are_capped(api_for, settings):
    settings.GRAFT_QUOTA_OPEN_UPLOADS = 3
    api = api_for("alice")
    assert [_open_upload(api, 1000).status_code for _ in range(3)] == [201] * 3
    r = _open_upload(api, 1000)
    assert r.status_code == 429 and "3 uploads in progress" in r.json()["error"]
    assert Upload.objects.count() == 3
    assert _open_upload(api_for("bob"), 1000).status_code == 201  # another user is not affected


def test_storage_quota_counts_declared_uploads_and_refuses_past_it(api_for, settings, tmp_path):
    settings.GRAFT_QUOTA_BYTES = 10_000
    api = api_for("alice")
    assert _open_upload(api, 8_000).status_code == 201
    r = _open_upload(api, 4_000)
    assert r.status_code == 413 and "over your quota of 9.8 KiB" in r.json()["error"]
    data = make_zip(tmp_path / "d.zip", class_folders({"a": 6, "b": 6})).read_bytes()
    r = api.upload(data)  # the plain multipart upload obeys the same quota
    assert r.status_code == 413 and "quota" in r.json()["error"]
    assert not Dataset.objects.exists()


def test_jobs_waiting_or_running_are_capped(api_for, settings):
    settings.GRAFT_QUOTA_ACTIVE_JOBS = 2
    api = api_for("alice")
    owner = Dataset._meta.get_field("owner").related_model.objects.get(username="alice")
    dataset = Dataset.objects.create(owner=owner, name="d", status=Dataset.Status.READY)
    Job.objects.create(owner=owner, dataset=dataset, status=Job.Status.RUNNING)
    Job.objects.create(owner=owner, dataset=dataset, status=Job.Status.QUEUED)
    r = api.call("POST", "/jobs/", json={"dataset": dataset.pk})
    assert r.status_code == 429 and "2 training jobs or batch predictions waiting or running" in r.json()["error"]
    Job.objects.filter(status=Job.Status.RUNNING).update(status=Job.Status.SUCCEEDED)
    assert api.call("POST", "/jobs/", json={"dataset": dataset.pk}).status_code == 201


def test_a_full_storage_quota_refuses_training_too(api_for, settings):
    """Each job stores a model when it succeeds: with the storage full, it is not started."""
    api = api_for("alice")
    owner = Dataset._meta.get_field("owner").related_model.objects.get(username="alice")
    dataset = Dataset.objects.create(owner=owner, name="d", status=Dataset.Status.READY, archive_bytes=10_000)
    settings.GRAFT_QUOTA_BYTES = 10_000
    r = api.call("POST", "/jobs/", json={"dataset": dataset.pk})
    assert r.status_code == 413 and "Your storage is full" in r.json()["error"], r.text
    assert not Job.objects.exists()
    settings.GRAFT_QUOTA_BYTES = 20_000
    assert api.call("POST", "/jobs/", json={"dataset": dataset.pk}).status_code == 201


def test_the_dashboard_shows_usage_against_the_quota(client, make_user, settings):
    settings.GRAFT_QUOTA_BYTES = 1024**3
    user = make_user("alice")
    Dataset.objects.create(owner=user, name="d", status=Dataset.Status.READY, archive_bytes=256 * 1024**2)
    client.force_login(user)
    html = client.get("/").content.decode()
    assert 'id="storage-meter"' in html and 'value="0.25"' in html
    assert "256.0\xa0MB of 1.0\xa0GB" in html and "Datasets 1 of" in html


def test_a_finished_upload_of_a_deleted_dataset_is_not_an_upload_in_progress(api_for, settings, tmp_path):
    settings.GRAFT_QUOTA_OPEN_UPLOADS = 1
    api = api_for("alice")
    data = make_zip(tmp_path / "d.zip", class_folders({"a": 6, "b": 6})).read_bytes()
    url = _open_upload(api, len(data)).headers["Location"]
    headers = {**TUS, "Upload-Offset": "0", "Content-Type": "application/offset+octet-stream"}
    r = api.session.patch(url, data=data, headers=headers, timeout=60)
    assert r.status_code == 204, r.text
    assert api.call("DELETE", f"/datasets/{r.headers['Graft-Dataset']}/").status_code == 204
    assert not Upload.objects.exists()
    assert _open_upload(api, 1000).status_code == 201
