"""Loaded models stay in the web process, bounded by the memory they add; a load holds up no other model."""

from __future__ import annotations

import threading
import time

import pytest

from apps.serving import cache
from tests.conftest import image_bytes

pytestmark = [pytest.mark.integration, pytest.mark.django_db]


@pytest.fixture
def owner(make_user):
    return make_user("alice")


@pytest.fixture(autouse=True)
def empty_cache():
    cache._loaded.clear()
    yield
    for entry in cache._loaded.values():
        entry.predictor.close()
    cache._loaded.clear()


def test_models_stay_loaded_within_the_memory_budget_and_the_least_recently_used_go_first(
    owner, make_tiny_model, settings, monkeypatch
):
    a, b, c = (make_tiny_model(owner, name) for name in "abc")
    resident = iter(range(0, 10_000, 50))  # each load adds 50 bytes to the process, as measured
    monkeypatch.setattr(cache, "resident_bytes", lambda: next(resident))
    settings.GRAFT_SERVE_MODEL_MEMORY = 100  # room for two
    first = cache.get_predictor(a)
    assert cache.get_predictor(a) is first  # loaded once, then reused
    cache.get_predictor(b)
    cache.get_predictor(a)  # a is now the more recently used
    cache.get_predictor(c)
    assert [key[0] for key in cache._loaded] == [a.pk, c.pk]  # b went, not a

    settings.GRAFT_SERVE_MODEL_MEMORY = 1  # every model is over it: only the newest stays
    cache.get_predictor(b)
    assert [key[0] for key in cache._loaded] == [b.pk]
    # a request still holding an unloaded model is answered (a thread, so that a hang fails)
    answers: list = []
    late = threading.Thread(target=lambda: answers.append(first.predict_bytes([image_bytes(size=(40, 40))], k=1)))
    late.daemon = True
    late.start()
    late.join(30)
    assert answers and answers[0][0][0].label in {"cat", "dog"}


def test_a_model_loading_does_not_hold_up_a_loaded_one(owner, make_tiny_model, monkeypatch):
    loaded, slow = make_tiny_model(owner, "loaded"), make_tiny_model(owner, "slow")
    cache.get_predictor(loaded)
    release, unpacking = threading.Event(), threading.Event()
    unpack = cache.unpack_bundle

    def slow_unpack(*args, **kwargs):  # a large bundle, or slow storage
        unpacking.set()
        release.wait(30)
        return unpack(*args, **kwargs)

    monkeypatch.setattr(cache, "unpack_bundle", slow_unpack)
    loading = threading.Thread(target=cache.get_predictor, args=(slow,), daemon=True)
    loading.start()
    try:
        assert unpacking.wait(10)
        started = time.monotonic()
        cache.get_predictor(loaded)
        assert time.monotonic() - started < 1, "a loaded model waited for another model's load"
    finally:
        release.set()
        loading.join(30)
    assert [key[0] for key in cache._loaded] == [loaded.pk, slow.pk]
