"""Batch prediction requests: a malformed one gets a readable 4xx and stores nothing.

(The whole path, zip in and CSV out on the real worker, is in test_end_to_end.py.)
"""

from __future__ import annotations

import io
import zipfile

import pytest

from apps.datasets.models import Dataset
from apps.serving.models import BatchPrediction, TrainedModel
from tests.apps.conftest import stored_files
from tests.conftest import image_bytes

pytestmark = pytest.mark.integration


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def alice(api_for, own_storage):
    """(With storage of its own: these tests count what is stored, and other tests' batches stay.)"""
    return api_for("alice")


@pytest.fixture
def model(alice, django_user_model):
    owner = django_user_model.objects.get(username="alice")
    return TrainedModel.objects.create(owner=owner, name="m", bundle="x", bundle_sha256="0" * 64, classes=["a", "b"])


@pytest.mark.parametrize(
    "files,data,status,needle",
    [
        (None, {}, 400, "either a zip of images"),
        ({"file": ("notes.txt", b"just text")}, {}, 400, "'notes.txt' is not a zip archive"),
        ({"file": ("empty.zip", b"")}, {}, 400, "empty"),
        ({"file": ("docs.zip", _zip({"a/readme.txt": b"x"}))}, {}, 400, "holds no images"),
        ({"file": ("evil.zip", _zip({"../x.png": image_bytes()}))}, {}, 400, "Unsafe archive"),
        ({"file": ("p.zip", _zip({"x.png": image_bytes()}))}, {"k": "0"}, 400, "'k' must be between 1 and 20"),
        ({"file": ("p.zip", _zip({"x.png": image_bytes()}))}, {"k": "many"}, 400, "valid integer"),
    ],
)
def test_a_malformed_batch_is_refused_and_nothing_is_stored(alice, model, files, data, status, needle):
    r = alice.call("POST", f"/models/{model.pk}/batch/", files=files, data=data)
    assert r.status_code == status and needle in r.text, r.text
    assert not BatchPrediction.objects.exists() and stored_files("batches/") == set()


def test_a_batch_over_a_dataset_must_be_ready_and_yours(alice, model, api_for, django_user_model):
    owner = django_user_model.objects.get(username="alice")
    processing = Dataset.objects.create(owner=owner, name="d", status=Dataset.Status.PROCESSING)
    r = alice.call("POST", f"/models/{model.pk}/batch/", json={"dataset": processing.pk})
    assert r.status_code == 409 and "not ready" in r.json()["error"]
    api_for("bob")
    bobs = Dataset.objects.create(
        owner=django_user_model.objects.get(username="bob"), name="b", status=Dataset.Status.READY
    )
    assert alice.call("POST", f"/models/{model.pk}/batch/", json={"dataset": bobs.pk}).status_code == 404


def test_a_queued_batch_has_no_results_yet_and_counts_as_a_waiting_job(alice, model, settings):
    settings.GRAFT_QUOTA_ACTIVE_JOBS = 1
    r = alice.call("POST", f"/models/{model.pk}/batch/", files={"file": ("p.zip", _zip({"x.png": image_bytes()}))})
    assert r.status_code == 202 and r.json()["results"] is None, r.text
    batch = r.json()
    assert stored_files("batches/") == {f"{BatchPrediction.objects.get().storage_prefix}input.zip"}
    r = alice.call("GET", f"/batches/{batch['id']}/predictions.csv")
    assert r.status_code == 409 and "queued" in r.json()["error"]
    r = alice.call("POST", f"/models/{model.pk}/batch/", files={"file": ("p.zip", _zip({"x.png": image_bytes()}))})
    assert r.status_code == 429 and "batch predictions waiting or running" in r.json()["error"]
    # A batch no longer wanted is deleted while it waits: its input goes and its slot frees up.
    assert alice.call("DELETE", f"/batches/{batch['id']}/").status_code == 204
    assert stored_files("batches/") == set() and not BatchPrediction.objects.exists()
    r = alice.call("POST", f"/models/{model.pk}/batch/", files={"file": ("p.zip", _zip({"x.png": image_bytes()}))})
    assert r.status_code == 202, r.text
