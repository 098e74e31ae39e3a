"""A web host loads a model only from the bundle whose SHA-256 the database recorded."""

from __future__ import annotations

import logging

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from apps.serving import cache
from tests.conftest import image_bytes

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def empty_cache():
    cache._loaded.clear()
    yield
    for entry in cache._loaded.values():
        entry.predictor.close()
    cache._loaded.clear()


@pytest.fixture
def swapped(make_user, make_tiny_model):
    """A model whose stored bundle was replaced by another, valid one (another model's file):
    a loader that does not check would serve the wrong network without a word."""
    owner = make_user("alice")
    model, other = make_tiny_model(owner, "pets", seed=0), make_tiny_model(owner, "impostor", seed=1)
    with default_storage.open(other.bundle, "rb") as fh:
        data = fh.read()
    default_storage.delete(model.bundle)
    assert default_storage.save(model.bundle, ContentFile(data)) == model.bundle
    return model


def test_a_bundle_that_is_not_the_recorded_one_is_never_unpacked(swapped, monkeypatch, caplog):
    unpacked = []
    monkeypatch.setattr(cache, "unpack_bundle", lambda *args: unpacked.append(args))
    with caplog.at_level(logging.ERROR, logger="apps.serving.cache"), pytest.raises(cache.BundleIntegrityError):
        cache.get_predictor(swapped)
    assert not unpacked and not cache._loaded
    (record,) = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert f"model {swapped.pk}" in record.getMessage() and swapped.bundle_sha256 in record.getMessage()


def test_the_caller_gets_a_json_error_not_a_prediction_nor_a_500(swapped, client):
    client.force_login(swapped.owner)
    response = client.post(
        f"/api/v1/models/{swapped.pk}/predict/", {"image": ContentFile(image_bytes(size=(40, 40)), name="a.png")}
    )
    assert response.status_code == 503, response.content[:300]
    assert response.json() == {
        "error": "This model's stored file failed its integrity check, so it cannot serve predictions; "
        "the operators have the details."
    }


def test_the_recorded_bundle_loads(make_user, make_tiny_model):
    model = make_tiny_model(make_user("alice"))
    predictor = cache.get_predictor(model)
    assert predictor.predict_bytes([image_bytes(size=(40, 40))], k=1)[0][0].label in {"cat", "dog"}
