"""Projects: a dataset's versions and its models as one timeline; one published model behind a URL
that stays while better models are published; rename and retrain. A second user reaches none of it."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction

from apps.datasets.models import Dataset
from apps.serving.models import TrainedModel
from tests.conftest import class_folders, image_bytes, make_zip

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


def _project(api, tmp_path) -> int:
    data = make_zip(tmp_path / "pets.zip", class_folders({"cat": 6, "dog": 6})).read_bytes()
    r = api.upload(data, "pets.zip", name="pets")
    assert r.status_code == 201, r.text
    assert api.wait(f"/datasets/{r.json()['id']}/", ("ready", "failed"), timeout=180)["status"] == "ready"
    return r.json()["id"]


def _predict(api, path: str) -> tuple[int, dict]:
    r = api.call("POST", path, files={"image": ("x.png", image_bytes(seed=3))})
    return r.status_code, r.json()


def test_the_project_url_serves_the_published_model_and_never_a_deleted_one(
    celery_worker_process, api_for, make_tiny_model, tmp_path
):
    api = api_for("alice")
    pid = _project(api, tmp_path)
    owner = User.objects.get(username="alice")
    a, b = make_tiny_model(owner, "a", seed=1), make_tiny_model(owner, "b", seed=2)
    TrainedModel.objects.filter(pk__in=[a.pk, b.pk]).update(dataset_id=pid)
    url = f"/projects/{pid}/predict/"

    status, body = _predict(api, url)
    assert status == 404 and "has no published model yet" in body["error"]
    r = api.call("POST", f"/projects/{pid}/publish/", json={"model": a.pk})
    assert r.status_code == 200 and r.json()["published"] == a.pk
    status, body = _predict(api, url)
    assert status == 200 and body["model"]["id"] == a.pk and len(body["predictions"]) == 1
    # A better model is published: the same URL, now B.
    api.call("POST", f"/projects/{pid}/publish/", json={"model": b.pk})
    assert _predict(api, url)[1]["model"]["id"] == b.pk
    assert TrainedModel.objects.filter(dataset_id=pid, published=True).count() == 1
    detail = api.call("GET", f"/projects/{pid}/").json()
    assert detail["published"] == b.pk and {m["id"] for m in detail["models"]} == {a.pk, b.pk}
    assert [v["number"] for v in detail["versions"]] == [1] and detail["predict_url"].endswith(url)
    # The model's own URL still works; deleting the published one leaves the project URL empty, not served by A.
    assert _predict(api, f"/models/{a.pk}/predict/")[0] == 200
    assert api.call("DELETE", f"/models/{b.pk}/").status_code == 204
    status, body = _predict(api, url)
    assert status == 404 and "no published model" in body["error"]
    # The database holds at most one published model per project, whatever a caller does.
    TrainedModel.objects.filter(pk=a.pk).update(published=True)
    other = make_tiny_model(owner, "c", seed=3)
    with pytest.raises(IntegrityError), transaction.atomic():
        TrainedModel.objects.filter(pk=other.pk).update(dataset_id=pid, published=True)


def test_publishing_names_the_right_project_and_owner(celery_worker_process, api_for, make_tiny_model, tmp_path):
    alice, bob = api_for("alice"), api_for("bob")
    pid = _project(alice, tmp_path)
    owner = User.objects.get(username="alice")
    stray = make_tiny_model(owner, "stray")  # no project: its dataset is gone
    r = alice.call("POST", f"/projects/{pid}/publish/", json={"model": stray.pk})
    assert r.status_code == 409 and "another project" in r.json()["error"]
    mine = make_tiny_model(owner, "mine", seed=4)
    TrainedModel.objects.filter(pk=mine.pk).update(dataset_id=pid)
    for method, path, kw in [
        ("GET", f"/projects/{pid}/", {}),
        ("POST", f"/projects/{pid}/publish/", {"json": {"model": mine.pk}}),
        ("POST", f"/projects/{pid}/predict/", {"files": {"image": ("x.png", image_bytes())}}),
        ("PATCH", f"/models/{mine.pk}/", {"json": {"name": "bob's now"}}),
    ]:
        assert bob.call(method, path, **kw).status_code == 404, (method, path)
    assert bob.call("GET", "/projects/").json()["results"] == []
    assert [p["id"] for p in alice.call("GET", "/projects/").json()["results"]] == [pid]


def test_models_are_renamed_and_retrained_with_their_options(celery_worker_process, api_for, make_tiny_model, tmp_path):
    api = api_for("alice")
    pid = _project(api, tmp_path)
    owner = User.objects.get(username="alice")
    model = make_tiny_model(owner, "pets")
    r = api.call("PATCH", f"/models/{model.pk}/", json={"name": "  pets, fixed labels  "})
    assert r.status_code == 200 and r.json()["name"] == "pets, fixed labels"
    assert api.call("PATCH", f"/models/{model.pk}/", json={"name": "   "}).json()["error"]
    assert api.call("PATCH", f"/models/{model.pk}/", json={}).status_code == 400

    job = api.call("POST", "/jobs/", json={"dataset": pid, "strategy": "linear", "seed": 7, "hflip": False}).json()
    api.call("POST", f"/jobs/{job['id']}/cancel/")
    rows = api.call("GET", f"/datasets/{pid}/versions/1/images/").json()["results"]
    api.call("POST", f"/datasets/{pid}/versions/", json={"remove": [rows[0]["sha256"]]})
    again = api.call("POST", f"/jobs/{job['id']}/retrain/")
    assert again.status_code == 201, again.text
    body = again.json()
    assert body["version"] == 2 and body["status"] == "queued"
    assert {k: body["config"][k] for k in ("strategy", "seed", "hflip")} == {
        "strategy": "linear",
        "seed": 7,
        "hflip": False,
    }
    api.call("POST", f"/jobs/{body['id']}/cancel/")
    Dataset.objects.filter(pk=pid).delete()
    gone = api.call("POST", f"/jobs/{job['id']}/retrain/")
    assert gone.status_code == 409 and "was deleted" in gone.json()["error"]


def test_compare_lists_the_validation_images_a_retrain_fixed_and_broke(
    celery_worker_process, api_for, make_tiny_model, tmp_path
):
    api = api_for("alice")
    pid = _project(api, tmp_path)
    owner = User.objects.get(username="alice")
    rows = api.call("GET", f"/datasets/{pid}/versions/1/images/", params={"split": "val"}).json()["results"]
    val = [r["member"] for r in rows]
    assert len(val) >= 2
    train_row = api.call("GET", f"/datasets/{pid}/versions/1/images/", params={"split": "train"}).json()["results"][0]

    def wrong(member: str) -> dict:
        return {"file": member, "label": "cat", "predicted": "dog", "score": 0.9}

    def model(name: str, accuracy: float, mistakes: list[str]) -> TrainedModel:
        m = make_tiny_model(owner, name, seed=len(name))
        metrics = {
            "val_accuracy": accuracy,
            "macro_f1": accuracy,
            "num_val": len(val),
            "per_class": [{"label": "cat", "precision": 1, "recall": accuracy, "f1": accuracy, "support": 1}],
            "confusion_matrix": [[1, 0], [0, 1]],
            "misclassified": [wrong(f) for f in mistakes],
        }
        version = Dataset.objects.get(pk=pid).versions.get(number=1)
        TrainedModel.objects.filter(pk=m.pk).update(dataset_id=pid, version=version, metrics=metrics)
        return m

    old = model("old", 0.5, [val[0], train_row["member"]])  # a training image is never "compared"
    new = model("newer", 0.75, [val[1]])
    r = api.call("GET", "/models/compare/", params={"a": old.pk, "b": new.pk})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["deltas"]["val_accuracy"] == pytest.approx(0.25)
    assert [f["file"] for f in body["fixed"]] == [val[0]]
    assert [f["file"] for f in body["broken"]] == [val[1]]
    # each with the model whose gallery has its thumbnail (its mistakes are its gallery)
    assert body["fixed"][0]["model_with_image"] == old.pk and body["broken"][0]["model_with_image"] == new.pk
    assert body["per_class"][0]["delta_f1"] == pytest.approx(0.25)
    assert body["confusion"]["a"]["matrix"] == [[1, 0], [0, 1]]
    # A model trained on other data whose mistakes carry the same names: those are other images.
    stranger = model("stranger", 0.5, [val[1]])
    TrainedModel.objects.filter(pk=stranger.pk).update(dataset=None, version=None)
    body = api.call("GET", "/models/compare/", params={"a": stranger.pk, "b": new.pk}).json()
    assert body["compared_images"] == 0 and body["still_wrong"] == body["fixed"] == body["broken"] == []
    assert api.call("GET", "/models/compare/", params={"a": old.pk}).status_code == 400
    assert api.call("GET", "/models/compare/", params={"a": "²", "b": new.pk}).status_code == 400
    assert api.call("GET", "/models/compare/", params={"a": "9" * 5000, "b": new.pk}).status_code == 400
    assert api.call("GET", "/models/compare/", params={"a": old.pk, "b": old.pk}).status_code == 400
    assert api_for("bob").call("GET", "/models/compare/", params={"a": old.pk, "b": new.pk}).status_code == 404


def test_kept_predictions_come_back_as_labels_in_a_new_version(
    celery_worker_process, api_for, make_tiny_model, tmp_path
):
    import time

    from apps.accounts.quotas import usage
    from apps.serving.models import PredictionRecord

    api = api_for("alice")
    pid = _project(api, tmp_path)
    owner = User.objects.get(username="alice")
    model = make_tiny_model(owner, "pets")
    TrainedModel.objects.filter(pk=model.pk).update(dataset_id=pid, prediction_log="with_images")
    for i in range(10):
        r = api.call("POST", f"/models/{model.pk}/predict/", files={"image": (f"p{i}.png", image_bytes(seed=300 + i))})
        assert r.status_code == 200
    deadline = time.monotonic() + 30
    while PredictionRecord.objects.exclude(image="").count() < 10 and time.monotonic() < deadline:
        time.sleep(0.2)
    queue = api.call("GET", f"/projects/{pid}/label-queue/").json()
    assert queue["count"] == 10 and queue["classes"] == ["cat", "dog"]
    margins = [row["margin"] for row in queue["results"]]
    assert margins == sorted(margins) and all(m is not None for m in margins)  # least certain first
    assert api.session.get(api.base.removesuffix("/api/v1") + queue["results"][0]["image"]).status_code == 200

    before = usage(owner).bytes_stored
    pick = {str(row["id"]): ("cat" if i % 2 else "dog") for i, row in enumerate(queue["results"][:5])}
    bad = api.call("POST", f"/projects/{pid}/label-queue/", json={"labels": {"1": "horse"}})
    assert bad.status_code == 400 and "not a class" in bad.json()["error"]
    r = api.call("POST", f"/projects/{pid}/label-queue/", json={"labels": pick})
    assert r.status_code == 202, r.text
    v2 = api.wait(f"/datasets/{pid}/versions/{r.json()['version']}/", ("ready", "failed"), timeout=180)
    assert v2["status"] == "ready" and v2["summary"]["added"] == 5, v2
    assert api.call("GET", f"/projects/{pid}/label-queue/").json()["count"] == 5
    again = api.call("POST", f"/projects/{pid}/label-queue/", json={"labels": dict(list(pick.items())[:1])})
    assert again.status_code == 409  # labelled already
    # The images moved from the log to the dataset: charged once (the zip's few bytes of headers aside).
    assert abs(usage(owner).bytes_stored - before) < 5 * 200
    moved = PredictionRecord.objects.exclude(labelled="")
    assert moved.count() == 5 and not moved.exclude(image="").exists()

    # A version that fails (its one image is in the dataset already) puts the labelled image back in
    # the queue, stored and charged as before.
    r = api.call("POST", f"/models/{model.pk}/predict/", files={"image": ("dup.png", image_bytes(seed=1))})
    assert r.status_code == 200
    deadline = time.monotonic() + 30
    while PredictionRecord.objects.exclude(image="").count() < 6 and time.monotonic() < deadline:
        time.sleep(0.2)
    dup = PredictionRecord.objects.filter(labelled="").exclude(image="").order_by("-id").first()
    before = usage(owner).bytes_stored
    r = api.call("POST", f"/projects/{pid}/label-queue/", json={"labels": {str(dup.pk): "cat"}})
    assert r.status_code == 202, r.text
    v3 = api.wait(f"/datasets/{pid}/versions/{r.json()['version']}/", ("ready", "failed"), timeout=180)
    assert v3["status"] == "failed", v3
    dup.refresh_from_db()
    assert dup.labelled == "" and dup.labelled_version is None and default_storage.exists(dup.image)
    assert api.call("GET", f"/projects/{pid}/label-queue/").json()["count"] == 6
    assert usage(owner).bytes_stored == before

    # A kept image deleted just now (the log trimmed meanwhile): its URL answers 404, not 500.
    gone = PredictionRecord.objects.filter(labelled="").exclude(image="").first()
    default_storage.delete(gone.image)
    assert api.call("GET", f"/models/{model.pk}/predictions/{gone.pk}/image/").status_code == 404
    r = api.call("POST", f"/projects/{pid}/label-queue/", json={"labels": {str(gone.pk): "cat"}})
    assert r.status_code == 409 and "no longer kept" in r.json()["error"], r.text

    # The dataset deleted while predictions are being added to it as a version: they wait again.
    from apps.datasets.models import DatasetVersion

    rec = PredictionRecord.objects.filter(labelled="").exclude(image="").exclude(pk=gone.pk).first()
    head = DatasetVersion.objects.filter(dataset_id=pid, status="ready").order_by("-number").first()
    adding = DatasetVersion.objects.create(dataset_id=pid, number=50, parent=head, status="processing")
    PredictionRecord.objects.filter(pk=rec.pk).update(labelled="cat", labelled_version=adding)
    assert api.call("DELETE", f"/datasets/{pid}/").status_code == 204
    rec.refresh_from_db()
    assert rec.labelled == "" and rec.image and default_storage.exists(rec.image)
