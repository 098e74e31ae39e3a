"""Quotas under concurrency: 20 requests at once at every cap, on PostgreSQL, through the live
server's threads. None ends above its cap: the check and the row it admits are one transaction
under the owner's lock (apps.accounts.quotas.owner_locked).

Nothing here runs the work it queues (the messages are not sent), so every admitted item stays
queued and counts against the cap until the end of the test, whatever worker is running.
"""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from apps.datasets.models import Dataset, Upload
from apps.serving.models import BatchPrediction
from apps.training.models import Job
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("own_storage")]

N = 20


@pytest.fixture(autouse=True)
def nothing_runs(monkeypatch):
    import apps.datasets.services
    import apps.serving.batches
    import apps.training.services

    for module in (apps.datasets.services, apps.training.services, apps.serving.batches):
        name = "_enqueue_ingest" if module is apps.datasets.services else "_enqueue"
        monkeypatch.setattr(module, name, lambda pk: None)


def burst(send) -> Counter:
    """`send(i)` from N threads released together; the status codes counted."""
    gate = threading.Barrier(N)

    def one(i: int) -> int:
        gate.wait()
        return send(i).status_code

    with ThreadPoolExecutor(N) as pool:
        return Counter(pool.map(one, range(N)))


def client(api) -> requests.Session:
    """A session per thread would be fairer to the server; requests' Session is thread-safe
    enough for independent requests, but its pool is sized for 10: make it 20."""
    adapter = requests.adapters.HTTPAdapter(pool_connections=N, pool_maxsize=N)
    api.session.mount("http://", adapter)
    return api.session


def test_open_uploads_hold_their_cap(api_for, settings):
    settings.GRAFT_QUOTA_OPEN_UPLOADS = 5
    api = api_for("alice")
    s = client(api)
    codes = burst(
        lambda i: s.post(
            f"{api.base}/uploads/", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "1000"}, timeout=60
        )
    )
    assert codes == Counter({201: 5, 429: N - 5}), codes
    assert Upload.objects.count() == 5


def test_datasets_hold_their_cap(api_for, settings, tmp_path):
    settings.GRAFT_QUOTA_DATASETS = 3
    api = api_for("alice")
    s = client(api)
    data = make_zip(tmp_path / "d.zip", class_folders({"a": 5, "b": 5})).read_bytes()
    codes = burst(lambda i: s.post(f"{api.base}/datasets/", files={"file": (f"d{i}.zip", data)}, timeout=60))
    assert codes == Counter({201: 3, 403: N - 3}), codes
    assert Dataset.objects.count() == 3


def test_bytes_hold_their_quota(api_for, settings, tmp_path):
    data = make_zip(tmp_path / "d.zip", class_folders({"a": 5, "b": 5})).read_bytes()
    settings.GRAFT_QUOTA_BYTES = 4 * len(data) + 100  # room for four
    api = api_for("alice")
    s = client(api)
    codes = burst(lambda i: s.post(f"{api.base}/datasets/", files={"file": (f"d{i}.zip", data)}, timeout=60))
    assert codes == Counter({201: 4, 413: N - 4}), codes
    assert sum(Dataset.objects.values_list("archive_bytes", flat=True)) <= settings.GRAFT_QUOTA_BYTES


def test_active_jobs_and_batches_hold_their_cap_together(
    api_for, settings, make_tiny_model, django_user_model, tmp_path
):
    settings.GRAFT_QUOTA_ACTIVE_JOBS = 4
    api = api_for("alice")
    s = client(api)
    alice = django_user_model.objects.get(username="alice")
    dataset = Dataset.objects.create(owner=alice, name="d", status=Dataset.Status.READY, num_images=10)
    model = make_tiny_model(alice)
    picture = make_zip(tmp_path / "p.zip", {"x.png": image_bytes()}).read_bytes()

    def send(i: int) -> requests.Response:
        if i % 2:  # jobs and batches share the cap
            return s.post(f"{api.base}/jobs/", json={"dataset": dataset.pk}, timeout=60)
        return s.post(f"{api.base}/models/{model.pk}/batch/", files={"file": ("p.zip", picture)}, timeout=60)

    codes = burst(send)
    assert codes[429] == N - 4 and codes[201] + codes[202] == 4, codes
    assert Job.objects.count() + BatchPrediction.objects.count() == 4


def test_batches_alone_hold_their_cap(api_for, settings, make_tiny_model, django_user_model, tmp_path):
    """The issue's case: 12 posts at once with one batch already waiting (cap 4): 3 more, not 12."""
    settings.GRAFT_QUOTA_ACTIVE_JOBS = 4
    api = api_for("alice")
    s = client(api)
    model = make_tiny_model(django_user_model.objects.get(username="alice"))
    picture = make_zip(tmp_path / "p.zip", {"x.png": image_bytes()}).read_bytes()
    first = s.post(f"{api.base}/models/{model.pk}/batch/", files={"file": ("p.zip", picture)}, timeout=60)
    assert first.status_code == 202, first.text
    codes = burst(
        lambda i: s.post(f"{api.base}/models/{model.pk}/batch/", files={"file": ("p.zip", picture)}, timeout=60)
    )
    assert codes == Counter({202: 3, 429: N - 3}), codes
    assert BatchPrediction.objects.count() == 4
