"""Every malformed request gets a readable 4xx from one set of rules, never a 500."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from apps.datasets.models import Dataset, Upload
from apps.training.models import Job
from apps.training.services import job_run

pytestmark = pytest.mark.integration

TUS = {"Tus-Resumable": "1.0.0"}


@pytest.fixture
def ready_dataset(db, make_user):
    user = make_user("alice")
    return Dataset.objects.create(owner=user, name="d", status=Dataset.Status.READY)


@pytest.mark.parametrize(
    "option,value,needle",
    [
        ("seed", 2**64, "seed must be between 0 and 4294967295"),
        ("seed", -1, "seed must be between"),
        ("max_epochs", 10**23, "max_epochs must be between 1 and 200"),
        ("max_epochs", 0, "max_epochs must be between"),
        ("budget", 1e300, "budget must be between 1 and"),
    ],
)
def test_job_options_out_of_range_are_refused_by_the_api_with_the_engines_words(api_for, option, value, needle):
    api = api_for("alice")
    dataset = Dataset.objects.create(
        owner=Dataset._meta.get_field("owner").related_model.objects.get(username="alice"),
        name="d",
        status=Dataset.Status.READY,
    )
    r = api.call("POST", "/jobs/", json={"dataset": dataset.pk, option: value})
    assert r.status_code == 400 and needle in r.json()["error"], r.text
    assert not Job.objects.exists()


def test_the_web_form_applies_the_same_rules(client, ready_dataset):
    client.login(username="alice", password="correct horse battery")
    r = client.post(f"/datasets/{ready_dataset.pk}/train/", {"strategy": "auto", "budget": "1e23"})
    assert r.status_code == 400 and b"budget must be between 1 and" in r.content
    assert not Job.objects.exists()


def test_too_many_files_in_one_api_request_is_a_json_400(api_for):
    api = api_for("alice")
    files = [("file", (f"f{i}.zip", b"x")) for i in range(65)]
    r = api.call("POST", "/datasets/", files=files)
    assert r.status_code == 400
    assert "files" in r.json()["error"].lower()


def test_an_unexpected_training_failure_tells_the_user_without_internals(ready_dataset):
    ready_dataset.manifest = default_storage.save(f"{ready_dataset.storage_prefix}manifest.json", ContentFile(b"{"))
    ready_dataset.save()
    job = Job.objects.create(owner=ready_dataset.owner, dataset=ready_dataset, status=Job.Status.RUNNING)
    job_run(job=job)
    job.refresh_from_db()
    assert job.status == "failed"
    assert job.error.startswith("Training failed unexpectedly (incident ") and "the operators" in job.error
    assert "Error" not in job.error and "/" not in job.error  # no exception class, no server path


def test_a_tus_delete_racing_a_write_waits_its_turn(api_for):
    api = api_for("alice")
    r = api.call("POST", "/uploads/", headers={**TUS, "Upload-Length": "100"})
    url = r.headers["Location"]
    upload = Upload.objects.get()
    Upload.objects.filter(pk=upload.pk).update(writer=uuid.uuid4(), writer_until=timezone.now() + timedelta(seconds=30))
    r = api.session.delete(url, headers=TUS, timeout=30)
    assert r.status_code == 423 and "being written" in r.json()["error"]
    assert Upload.objects.filter(pk=upload.pk).exists()
    Upload.objects.filter(pk=upload.pk).update(writer=None, writer_until=None)
    assert api.session.delete(url, headers=TUS, timeout=30).status_code == 204
    assert not Upload.objects.exists()


def test_lists_are_paged_and_lean(api_for, settings):
    """Long names, many warnings, history: none of it in a list, which comes a page at a time."""
    api = api_for("alice")
    owner = Dataset._meta.get_field("owner").related_model.objects.get(username="alice")
    warning = {"code": "skipped", "message": "x", "files": ["f" * 200] * 100}
    Dataset.objects.bulk_create(
        Dataset(owner=owner, name=f"d{i}", storage_prefix=f"datasets/{i}/", warnings=[warning] * 5) for i in range(120)
    )
    r = api.call("GET", "/datasets/")
    body = r.json()
    assert len(body["results"]) == 50 and body["next"] and body["previous"] is None
    assert "warnings" not in body["results"][0] and body["results"][0]["name"] == "d119"  # newest first
    assert len(r.content) < 20_000
    seen = [d["name"] for d in body["results"]]
    while body["next"]:
        body = api.session.get(body["next"], timeout=30).json()
        seen += [d["name"] for d in body["results"]]
    assert len(seen) == 120 == len(set(seen))
    assert len(api.call("GET", "/datasets/?page_size=500").json()["results"]) == 120  # capped at 200 a page


def test_ids_and_page_numbers_that_are_no_numbers_a_column_holds_are_4xx(api_for):
    """ "²" passes str.isdigit() and int() refuses it; 5,000 digits int() refuses too; 20 digits fit no
    column. Each is a 400 or a 404, never a 500."""
    from django.contrib.auth.models import User

    api = api_for("alice")
    project = Dataset.objects.create(owner=User.objects.get(username="alice"), name="p", status=Dataset.Status.READY)
    for bad in ("²", "9" * 5000, "9" * 20, "-1", "1.5"):
        for method, path, kwargs in [
            ("GET", "/models/compare/", {"params": {"a": bad, "b": "1"}}),
            ("GET", f"/projects/{project.pk}/label-queue/", {"params": {"page": bad}}),
            ("GET", f"/projects/{project.pk}/label-queue/", {"params": {"page_size": bad}}),
            ("POST", f"/projects/{project.pk}/label-queue/", {"json": {"labels": {bad: "cat"}}}),
            ("GET", f"/datasets/{project.pk}/versions/1/images/", {"params": {"page": bad}}),
        ]:
            r = api.call(method, path, **kwargs)
            assert 400 <= r.status_code < 500, (method, path, bad[:20], r.status_code, r.text[:200])
    for path in ("/models/99999999999999999999/", "/datasets/99999999999999999999/", "/jobs/99999999999999999999/"):
        assert api.call("GET", path).status_code == 404, path
