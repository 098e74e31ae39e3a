"""The per-model prediction log: opt-in, written off the request path, trimmed, images only when asked."""

from __future__ import annotations

import time

import pytest
from django.core.files.storage import default_storage

from apps.accounts.quotas import usage
from apps.serving.models import PredictionRecord
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def alice(api_for):
    return api_for("alice")


@pytest.fixture
def model(alice, django_user_model, make_tiny_model):
    return make_tiny_model(django_user_model.objects.get(username="alice"))


def _predict(api, model, n: int, seed: int = 0) -> list[list[dict]]:
    files = [("image", (f"p{i}.png", image_bytes(size=(40, 40), seed=seed + i))) for i in range(n)]
    r = api.call("POST", f"/models/{model.pk}/predict/", files=files)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def _records(api, model, expect: int, timeout: float = 10) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        body = api.call("GET", f"/models/{model.pk}/predictions/").json()
        if len(body["records"]) >= expect or time.monotonic() > deadline:
            return body["records"]
        time.sleep(0.2)


def test_the_log_is_off_until_the_owner_turns_it_on(alice, api_for, model):
    assert alice.call("GET", f"/models/{model.pk}/").json()["prediction_log"] == "off"
    _predict(alice, model, 2)
    time.sleep(1.5)  # the writer gathers for half a second
    assert _records(alice, model, 1, timeout=0) == [] and not PredictionRecord.objects.exists()

    r = alice.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "on"})
    assert r.status_code == 200 and r.json()["prediction_log"] == "on", r.text
    predictions = _predict(alice, model, 3)
    records = _records(alice, model, 3)
    assert [(r["label"], r["score"]) for r in reversed(records)] == [
        (p[0]["label"], pytest.approx(p[0]["score"])) for p in predictions
    ]
    assert all(r["latency_ms"] > 0 and r["image"] is None for r in records)

    r = alice.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "everything"})
    assert r.status_code == 400 and "prediction_log" in r.text
    bob = api_for("bob")
    assert bob.call("GET", f"/models/{model.pk}/predictions/").status_code == 404
    assert bob.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "off"}).status_code == 404


def test_kept_images_count_against_the_quota_and_go_when_keeping_stops(alice, model, django_user_model):
    user = django_user_model.objects.get(username="alice")
    alice.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "with_images"})
    before = usage(user).bytes_stored
    _predict(alice, model, 2, seed=10)
    records = _records(alice, model, 2)
    sent = image_bytes(size=(40, 40), seed=10)
    image = alice.call("GET", records[-1]["image"].removeprefix("/api/v1"))
    assert image.status_code == 200 and image.content == sent and image.headers["Content-Type"] == "image/png"
    assert usage(user).bytes_stored - before == sum(len(image_bytes(size=(40, 40), seed=s)) for s in (10, 11))
    kept = list(PredictionRecord.objects.values_list("image", flat=True))
    assert all(default_storage.exists(name) for name in kept)

    alice.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "on"})
    assert not any(default_storage.exists(name) for name in kept)
    assert [r["image"] for r in _records(alice, model, 2)] == [None, None]
    assert usage(user).bytes_stored == before


def test_the_log_keeps_the_most_recent_records_only(alice, model, settings):
    settings.GRAFT_PREDICTION_LOG_KEEP = 3
    alice.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "with_images"})
    for seed in range(5):
        _predict(alice, model, 1, seed=seed)
        _records(alice, model, min(seed + 1, 3))
    newest = image_bytes(size=(40, 40), seed=4)
    deadline = time.monotonic() + 15
    while True:  # until the last request's record is in and the log trimmed
        records = list(PredictionRecord.objects.all())
        if records and records[0].image_bytes == len(newest) and len(records) == 3:
            break
        assert time.monotonic() < deadline, [(r.pk, r.image_bytes) for r in records]
        time.sleep(0.2)
    with default_storage.open(records[0].image) as f:
        assert f.read() == newest
    kept = {r.image for r in records}
    _, files = default_storage.listdir(f"{model.storage_prefix}inputs/")
    assert {f"{model.storage_prefix}inputs/{f}" for f in files} == kept  # the trimmed records' images went too


def test_at_the_storage_quota_records_are_kept_without_their_images(alice, model, settings):
    from apps.accounts.quotas import usage as usage_of

    alice.call("PATCH", f"/models/{model.pk}/", json={"prediction_log": "with_images"})
    settings.GRAFT_QUOTA_BYTES = usage_of(model.owner).bytes_stored + len(image_bytes(size=(40, 40), seed=0)) + 10
    _predict(alice, model, 1, seed=0)
    assert _records(alice, model, 1)[0]["image"] is not None  # it fitted
    _predict(alice, model, 1, seed=1)
    records = _records(alice, model, 2)
    assert records[0]["image"] is None and records[0]["label"] in {"cat", "dog"}  # recorded, image not kept
    assert usage_of(model.owner).bytes_stored <= settings.GRAFT_QUOTA_BYTES


def _entry(model, seed: int):
    from django.utils import timezone

    from apps.serving import predlog

    image = image_bytes(size=(40, 40), seed=seed)
    return predlog._Entry(model.pk, model.storage_prefix, timezone.now(), 1.0, "cat", 0.9, 0.8, image, ".png")


def _kept_files(model) -> list[str]:
    try:
        _, files = default_storage.listdir(f"{model.storage_prefix}inputs/")
    except FileNotFoundError:
        return []
    return files


@pytest.fixture
def keeping(make_user, make_tiny_model):
    """A model whose log keeps images, with one record and its image already written."""
    from apps.serving import predlog
    from apps.serving.models import TrainedModel

    model = make_tiny_model(make_user("carol"))
    model.prediction_log = TrainedModel.Log.WITH_IMAGES
    model.save(update_fields=["prediction_log"])
    predlog.write([_entry(model, seed=0)])
    assert len(_kept_files(model)) == 1
    return model


def test_a_write_landing_while_keeping_is_switched_off_keeps_no_image(keeping, monkeypatch):
    from apps.serving import predlog
    from apps.serving.models import TrainedModel

    delete, raced = predlog.delete_quietly, []

    def delete_then_write(name: str) -> None:  # the writer's next batch lands while the switch deletes
        delete(name)
        if not raced:
            raced.append(name)
            predlog.write([_entry(keeping, seed=1)])

    monkeypatch.setattr(predlog, "delete_quietly", delete_then_write)
    predlog.set_mode(model=TrainedModel.objects.get(pk=keeping.pk), mode=TrainedModel.Log.ON)
    assert raced and PredictionRecord.objects.filter(model=keeping).count() == 2
    assert not PredictionRecord.objects.exclude(image="").exists()
    assert _kept_files(keeping) == []
    assert usage(keeping.owner).bytes_stored == keeping.bundle_bytes


def test_a_write_that_read_the_mode_before_keeping_was_switched_off_keeps_no_image(keeping, monkeypatch):
    from apps.serving import predlog
    from apps.serving.models import TrainedModel

    switched: list[bool] = []

    class SwitchedOffMidWrite:  # the owner switches keeping off after the writer read the mode
        def __getattr__(self, name: str):
            return getattr(default_storage, name)

        def save(self, name, content):
            if not switched:
                switched.append(True)
                predlog.set_mode(model=TrainedModel.objects.get(pk=keeping.pk), mode=TrainedModel.Log.OFF)
            return default_storage.save(name, content)

    monkeypatch.setattr(predlog, "default_storage", SwitchedOffMidWrite())
    predlog.write([_entry(keeping, seed=1)])
    assert switched and PredictionRecord.objects.filter(model=keeping).count() == 2
    assert not PredictionRecord.objects.exclude(image="").exists()
    assert _kept_files(keeping) == []
    assert usage(keeping.owner).bytes_stored == keeping.bundle_bytes
