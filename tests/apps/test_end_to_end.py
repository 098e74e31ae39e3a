"""The whole path on real services: upload -> ingest -> train -> download -> predict, with isolation."""

from __future__ import annotations

import csv
import io
import zipfile

import pytest
import torch

from tests.apps.api_schema import schema_errors

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

SAMPLE_IMAGES = [
    "val/ants/10308379_1b6c72e180.jpg",
    "val/ants/1073564163_225a64f170.jpg",
    "val/ants/11381045_b352a47d8c.jpg",
    "val/bees/10870992_eebeeb3a12.jpg",
    "val/bees/1181173278_23c36fac71.jpg",
    "val/bees/1297972485_33266a18d9.jpg",
]


def test_hymenoptera_from_upload_to_predictions(celery_worker_process, api_for, datasets_dir, tmp_path):
    alice = api_for("alice")
    archive = datasets_dir / "hymenoptera.zip"

    r = alice.upload(archive, "hymenoptera.zip", name="ants vs bees")
    assert r.status_code == 201, r.text
    dataset = alice.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=300)
    assert dataset["status"] == "ready", dataset
    assert [c["name"] for c in dataset["classes"]] == ["ants", "bees"]
    assert dataset["num_images"] == 398

    r = alice.call("POST", "/jobs/", json={"dataset": dataset["id"]})
    assert r.status_code == 201 and r.json()["status"] == "queued", r.text
    job = alice.wait(f"/jobs/{r.json()['id']}/", ("succeeded", "failed", "cancelled"), timeout=900)
    assert job["status"] == "succeeded", job["error"]
    assert job["metrics"]["val_accuracy"] >= 0.90
    assert job["strategy"]["name"] == "linear" and job["strategy"]["cell"] == "small-similar"
    assert job["strategy"]["images_per_class"] == 122.5 and job["strategy"]["similarity"] >= 0.5
    assert job["history"] and job["progress"] == 1.0
    assert schema_errors(job, "JobOutput") == []  # the job's answer has the shapes the API schema declares
    model_id = job["model"]

    r = alice.call("GET", f"/models/{model_id}/download/")
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/zip"
    bundle = zipfile.ZipFile(io.BytesIO(r.content))
    assert {"model.torchscript.pt", "labels.json", "preprocessing.json", "metrics.json", "model_card.md"} <= set(
        bundle.namelist()
    )
    scripted = torch.jit.load(io.BytesIO(bundle.read("model.torchscript.pt")))
    assert scripted(torch.zeros(1, 3, 224, 224)).shape == (1, 2)

    with zipfile.ZipFile(archive) as zf:
        files = [("image", (name.rsplit("/", 1)[1], zf.read(name))) for name in SAMPLE_IMAGES]
    r = alice.call("POST", f"/models/{model_id}/predict/", files=files, data={"k": "2"})
    assert r.status_code == 200, r.text
    predictions = r.json()["predictions"]
    assert len(predictions) == len(SAMPLE_IMAGES) and all(len(p) == 2 for p in predictions)
    hits = sum(p[0]["label"] == name.split("/")[1] for p, name in zip(predictions, SAMPLE_IMAGES, strict=True))
    assert hits >= 5, predictions

    r = alice.call("POST", f"/models/{model_id}/predict/", files=[("image", ("notes.txt", b"not an image"))])
    assert r.status_code == 400 and "'notes.txt' cannot be read as an image" in r.json()["error"]
    r = alice.call("POST", f"/models/{model_id}/predict/", data={"k": "3"})
    assert r.status_code == 400 and "'image'" in r.json()["error"]

    # Batch prediction: a zip of images (in folders, with a file that is no image) on the GPU queue's
    # worker; its CSV gives each image what the prediction endpoint gives it.
    with zipfile.ZipFile(archive) as zf:
        images = {f"photos/{i:02d}-{name.rsplit('/', 1)[1]}": zf.read(name) for i, name in enumerate(SAMPLE_IMAGES)}
    batch_zip = io.BytesIO()
    with zipfile.ZipFile(batch_zip, "w") as zf:
        for name, data in images.items():
            zf.writestr(name, data)
        zf.writestr("photos/broken.jpg", b"not a jpeg")
        zf.writestr("README.txt", b"not an image, not listed")
    r = alice.call(
        "POST", f"/models/{model_id}/batch/", files={"file": ("photos.zip", batch_zip.getvalue())}, data={"k": "2"}
    )
    assert r.status_code == 202 and r.json()["status"] == "queued", r.text
    batch = alice.wait(f"/batches/{r.json()['id']}/", ("succeeded", "failed"), timeout=300)
    assert batch["status"] == "succeeded", batch["error"]
    assert (batch["total"], batch["done"], batch["failed"], batch["progress"]) == (7, 7, 1, 1.0)
    rows = list(csv.DictReader(io.StringIO(alice.call("GET", batch["results"]["csv"].removeprefix("/api/v1")).text)))
    assert [row["file"] for row in rows] == sorted([*images, "photos/broken.jpg"])
    assert "cannot be read as an image" in rows[-1]["error"] and not rows[-1]["label_1"]
    for row in rows[:-1]:
        r = alice.call(
            "POST", f"/models/{model_id}/predict/", files=[("image", ("x.jpg", images[row["file"]]))], data={"k": "2"}
        )
        single = r.json()["predictions"][0]
        assert [row["label_1"], row["label_2"]] == [p["label"] for p in single] and not row["error"]
        assert float(row["score_1"]) == pytest.approx(single[0]["score"], abs=1e-5)
    as_json = alice.call("GET", batch["results"]["json"].removeprefix("/api/v1")).json()
    assert [r["file"] for r in as_json] == [row["file"] for row in rows] and "error" in as_json[-1]
    assert [b["id"] for b in alice.call("GET", f"/models/{model_id}/batch/").json()["results"]] == [batch["id"]]
    # The batch page's list: least confident first (the unreadable file last), by label, with thumbnails.
    items = alice.call("GET", f"/batches/{batch['id']}/items/").json()
    scores = [row["score"] for row in items["results"] if not row["error"]]
    assert items["count"] == 7 and scores == sorted(scores) and items["results"][-1]["error"]
    assert sum(items["labels"].values()) == 6
    first = items["results"][0]
    thumb = alice.call("GET", first["thumbnail"].removeprefix("/api/v1"))
    assert thumb.status_code == 200 and thumb.headers["Content-Type"] == "image/jpeg"
    label = next(iter(items["labels"]))
    only = alice.call("GET", f"/batches/{batch['id']}/items/", params={"label": label}).json()
    assert only["count"] == items["labels"][label] and {r["label"] for r in only["results"]} == {label}

    # Another user cannot see or touch any of it.
    bob = api_for("bob")
    for method, path in [
        ("GET", f"/datasets/{dataset['id']}/"),
        ("DELETE", f"/datasets/{dataset['id']}/"),
        ("GET", f"/jobs/{job['id']}/"),
        ("POST", f"/jobs/{job['id']}/cancel/"),
        ("GET", f"/models/{model_id}/"),
        ("GET", f"/models/{model_id}/download/"),
        ("POST", f"/models/{model_id}/predict/"),
        ("GET", f"/models/{model_id}/batch/"),
        ("GET", f"/batches/{batch['id']}/"),
        ("GET", f"/batches/{batch['id']}/items/"),
        ("GET", batch["results"]["csv"].removeprefix("/api/v1")),
        ("DELETE", f"/batches/{batch['id']}/"),
    ]:
        r = bob.call(method, path, files=files if path.endswith("predict/") else None)
        assert r.status_code == 404 and r.json()["error"].startswith("Not found"), (method, path, r.text)
    r = bob.call("POST", "/jobs/", json={"dataset": dataset["id"]})
    assert r.status_code == 404
    assert bob.call("GET", "/datasets/").json()["results"] == [] and bob.call("GET", "/models/").json()["results"] == []
