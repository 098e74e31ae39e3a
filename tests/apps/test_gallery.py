"""The misclassified gallery: thumbnails made by the training worker and stored with the model.

Web hosts serve stored thumbnails only: nothing there opens a dataset archive (on S3 that read the
whole object into the web process's memory), and a model's gallery outlives its dataset.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pytest
from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.files.uploadedfile import SimpleUploadedFile

from apps.common.storage import RangeReader
from apps.datasets.models import Dataset
from apps.serving.models import TrainedModel
from apps.training.gallery import GALLERY_SIZE, gallery_members, gallery_store, gallery_thumb_name
from apps.training.models import Job
from tests.apps.conftest import stored_files
from tests.conftest import IN_CI, image_bytes, make_zip

pytestmark = pytest.mark.integration

RED, BLUE = (200, 40, 40), (40, 40, 200)


def _colours(per_class: int, mislabelled: int = 0) -> dict[str, bytes]:
    """Red and blue squares a linear probe tells apart, the split fixed; `mislabelled` blue squares
    sit in val/red, so the model gets at least those wrong."""
    members, seed = {}, 0
    for split, n in (("train", per_class), ("val", per_class)):
        for label, colour in (("red", RED), ("blue", BLUE)):
            for i in range(n):
                seed += 1
                wrong = split == "val" and label == "red" and i < mislabelled
                members[f"{split}/{label}/{i:02d}.png"] = image_bytes(color=BLUE if wrong else colour, seed=seed)
    return members


def _jpeg(response) -> bytes:
    body = b"".join(response.streaming_content)
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg", response
    assert body[:3] == b"\xff\xd8\xff"
    return body


@pytest.mark.django_db(transaction=True)
def test_the_gallery_is_stored_with_the_model_and_outlives_the_dataset(
    celery_worker_process, api_for, client, tmp_path
):
    api = api_for("alice")
    r = api.upload(make_zip(tmp_path / "colours.zip", _colours(6, mislabelled=3)))
    dataset = api.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=300)
    assert dataset["status"] == "ready", dataset
    r = api.call("POST", "/jobs/", json={"dataset": dataset["id"], "strategy": "linear"})
    job = api.wait(f"/jobs/{r.json()['id']}/", ("succeeded", "failed"), timeout=600)
    assert job["status"] == "succeeded", job["error"]

    model = TrainedModel.objects.get(pk=job["model"])
    members = gallery_members(job["metrics"])
    assert {"val/red/00.png", "val/red/01.png", "val/red/02.png"} <= set(members)  # the blue squares in val/red
    assert stored_files(f"{model.storage_prefix}thumbs/") == {
        gallery_thumb_name(model.storage_prefix, m) for m in members
    }

    client.force_login(model.owner)
    urls = [(f"/models/{model.pk}/thumb/", {"m": m}) for m in members]  # what job.js asks for
    before = [_jpeg(client.get(url, query)) for url, query in urls]
    assert client.get(f"/models/{model.pk}/thumb/", {"m": "train/red/00.png"}).status_code == 404  # not listed

    assert api.call("DELETE", f"/datasets/{dataset['id']}/").status_code == 204
    assert not Dataset.objects.filter(pk=dataset["id"]).exists()
    assert [_jpeg(client.get(url, query)) for url, query in urls] == before  # "Models trained on it stay"

    api_for("bob")
    client.force_login(type(model.owner).objects.get(username="bob"))
    assert client.get(*urls[0]).status_code == 404  # another user's model


@pytest.fixture
def ingested(db, make_user, tmp_path):
    """A dataset ingested here (14 images a class: its page shows 12 of each), and its owner."""
    from apps.datasets.services import dataset_create
    from apps.datasets.tasks import ingest_dataset

    user = make_user()
    archive = make_zip(tmp_path / "c.zip", _colours(7))
    dataset = dataset_create(owner=user, file=SimpleUploadedFile("c.zip", archive.read_bytes()), name="c")
    ingest_dataset.apply(args=[dataset.pk])  # as the ingestion worker would
    dataset = Dataset.objects.get(pk=dataset.pk)
    assert dataset.status == Dataset.Status.READY, dataset.error
    return dataset


def test_thumbnails_are_served_without_opening_the_archive(ingested, client):
    """The archive replaced by junk in storage: the page's thumbnails still come (stored at
    ingestion); an image without a stored thumbnail is a 404, not an archive read (the code before
    made one from the archive here, and failed on the junk with a 500)."""
    dataset = ingested
    shown = {m for group in dataset.thumbnails.values() for m in group}
    unshown = sorted(
        {f"{s}/{c}/{i:02d}.png" for s in ("train", "val") for c in ("red", "blue") for i in range(7)} - shown
    )
    assert len(shown) == 24 and unshown
    default_storage.delete(dataset.archive)
    default_storage.save(dataset.archive, ContentFile(b"not a zip any more"))

    client.force_login(dataset.owner)
    for member in sorted(shown)[:3]:
        _jpeg(client.get(f"/datasets/{dataset.pk}/thumb/", {"m": member}))
    assert client.get(f"/datasets/{dataset.pk}/thumb/", {"m": unshown[0]}).status_code == 404
    assert client.get(f"/datasets/{dataset.pk}/thumb/", {"m": "../../etc/passwd"}).status_code == 404

    # A model trained before the gallery was stored: a placeholder, not an archive read.
    metrics = {"misclassified": [{"file": unshown[0], "label": "red", "predicted": "blue", "score": 0.9}]}
    job = Job.objects.create(owner=dataset.owner, dataset=dataset, status=Job.Status.SUCCEEDED, metrics=metrics)
    model = TrainedModel.objects.create(owner=dataset.owner, job=job, name="old", metrics=metrics)
    r = client.get(f"/models/{model.pk}/thumb/", {"m": unshown[0]})
    assert r.status_code == 200 and r["Content-Type"] == "image/svg+xml"


def test_the_worker_stores_what_it_can_and_never_fails_the_job(ingested):
    dataset = ingested
    wrong = [{"file": f"val/red/{i:02d}.png", "label": "red", "predicted": "blue", "score": 0.5} for i in range(7)]
    metrics = {"misclassified": [*wrong, {"file": "val/red/gone.png", "label": "red", "predicted": "blue"}]}
    prefix = "models/gallery-test/"
    assert gallery_store(prefix=prefix, dataset=dataset, metrics=metrics) == 7  # all but the one not there
    assert stored_files(f"{prefix}thumbs/") == {gallery_thumb_name(prefix, w["file"]) for w in wrong}
    many = [{**wrong[0], "file": f"val/red/{i}.png"} for i in range(3 * GALLERY_SIZE)]
    assert gallery_members({"misclassified": many}) == [w["file"] for w in many[:GALLERY_SIZE]]  # what the page shows

    # A version's images may sit in two archives (the upload, images added later), under one name each.
    added = default_storage.save(
        f"{dataset.storage_prefix}additions/more.zip",
        ContentFile(make_zip(Path(settings.DATA_DIR) / "more.zip", {"owls/o.png": image_bytes(seed=77)}).read_bytes()),
    )
    origins = {"1/owls/o.png": (added, "owls/o.png"), "val/red/00.png": (dataset.archive, "val/red/00.png")}
    both = {"misclassified": [{**wrong[0], "file": "1/owls/o.png"}, wrong[0]]}
    assert gallery_store(prefix="models/gallery-test-4/", dataset=dataset, metrics=both, origins=origins) == 2
    assert gallery_thumb_name("models/gallery-test-4/", "1/owls/o.png") in stored_files("models/gallery-test-4/")

    default_storage.delete(dataset.archive)  # the dataset deleted while the job ran
    assert gallery_store(prefix="models/gallery-test-2/", dataset=dataset, metrics=metrics) == 0
    assert stored_files("models/gallery-test-2/") == set()
    assert gallery_store(prefix="models/gallery-test-3/", dataset=None, metrics=metrics) == 0


def test_the_range_reader_reads_a_member_not_the_archive(tmp_path):
    """On S3 the worker reads the zip's directory and the members it shows, in byte ranges."""
    from tests.settings import S3_ENDPOINT, S3_REACHABLE

    if not S3_REACHABLE:
        why = f"needs an S3 server at {S3_ENDPOINT}"
        pytest.fail(why) if IN_CI else pytest.skip(why)
    import boto3

    s3 = boto3.resource(
        "s3",
        endpoint_url=S3_ENDPOINT,
        aws_access_key_id="graft",
        aws_secret_access_key="graft-secret",
        region_name="us-east-1",
    )
    bucket = s3.Bucket(f"graft-gallery-test-{tmp_path.name[-8:].lower().replace('_', '-')}")
    bucket.create()
    try:
        big = {f"noise/{i}.bin": bytes(range(256)) * 4096 for i in range(20)}  # 20 MiB
        big["a/target.png"] = image_bytes(seed=7)
        body = make_zip(tmp_path / "big.zip", big).read_bytes()
        bucket.put_object(Key="archive.zip", Body=body)

        fetched: list[int] = []

        class Counted:
            content_length = len(body)

            def get(self, Range: str) -> dict:  # noqa: N803 - boto3's spelling
                start, end = map(int, Range.removeprefix("bytes=").split("-"))
                fetched.append(end - start + 1)
                return bucket.Object("archive.zip").get(Range=Range)

        with io.BufferedReader(RangeReader(Counted()), 256 * 1024) as fh, zipfile.ZipFile(fh) as zf:
            assert zf.read("a/target.png") == big["a/target.png"]
        assert sum(fetched) < 1024 * 1024 < len(body) and len(fetched) <= 4, fetched
    finally:
        bucket.objects.all().delete()
        bucket.delete()
