"""Loaded models stay in the web process, bounded by the memory they add; a load holds up no other model,
and a model asked for by many requests at once loads once."""

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


def _holding(target_pk: int, unpacking: threading.Event, release: threading.Event, calls: list[int]):
    """An unpack_bundle that waits for `release` when it unpacks `target_pk`'s bundle (a large bundle,
    or slow storage), and counts each model's unpacks in `calls`."""
    unpack = cache.unpack_bundle

    def slow_unpack(archive, folder, *args, **kwargs):
        pk = int(folder.name.split("-")[0])
        calls.append(pk)
        if pk == target_pk:
            unpacking.set()
            release.wait(30)
        return unpack(archive, folder, *args, **kwargs)

    return slow_unpack


def test_a_model_loading_does_not_hold_up_the_first_load_of_another(owner, make_tiny_model, monkeypatch):
    slow, other = make_tiny_model(owner, "slow"), make_tiny_model(owner, "other")
    release, unpacking, calls = threading.Event(), threading.Event(), []
    monkeypatch.setattr(cache, "unpack_bundle", _holding(slow.pk, unpacking, release, calls))
    loading = threading.Thread(target=cache.get_predictor, args=(slow,), daemon=True)
    loading.start()
    answers: list = []
    try:
        assert unpacking.wait(10)
        # In a thread, so that a load held up behind the slow one fails here rather than hangs.
        cold = threading.Thread(target=lambda: answers.append(cache.get_predictor(other)), daemon=True)
        cold.start()
        cold.join(20)
        assert answers, "a cold model's first load waited for another model's load"
        assert not release.is_set() and loading.is_alive()  # the slow load was still under way
    finally:
        release.set()
        loading.join(30)
    assert answers[0].predict_bytes([image_bytes(size=(40, 40))], k=1)[0][0].label in {"cat", "dog"}
    assert [key[0] for key in cache._loaded] == [other.pk, slow.pk]
    assert sorted(calls) == sorted([slow.pk, other.pk])


def test_a_model_requested_by_two_threads_at_once_loads_once(owner, make_tiny_model, monkeypatch):
    model = make_tiny_model(owner, "popular")
    release, unpacking, calls = threading.Event(), threading.Event(), []
    monkeypatch.setattr(cache, "unpack_bundle", _holding(model.pk, unpacking, release, calls))
    got: list = []
    threads = [threading.Thread(target=lambda: got.append(cache.get_predictor(model)), daemon=True) for _ in range(2)]
    threads[0].start()
    assert unpacking.wait(10)
    threads[1].start()
    time.sleep(0.3)  # the second request arrives while the first is loading
    release.set()
    for thread in threads:
        thread.join(30)
    assert len(got) == 2 and got[0] is got[1]
    assert calls == [model.pk]  # fetched and unpacked once
    assert list(cache._loaded) == [(model.pk, model.bundle_sha256)]


def test_a_bundle_stored_again_is_served_and_the_one_it_replaced_stays_for_requests_already_under_way(
    owner, make_tiny_model
):
    """What the int8 step does to a model: a new bundle, the row updated. The next request loads the new
    one and the process lets the old one go; a request that read the row just before still gets an
    answer (the old file stays until the sweeper's grace period), and the sweeper then removes it."""
    from datetime import timedelta

    from django.core.files.storage import default_storage

    from apps.ops.sweep import sweep
    from apps.serving.models import TrainedModel

    stale = make_tiny_model(owner, "pets", seed=0)
    old = cache.get_predictor(stale)
    other = make_tiny_model(owner, "pets-again", seed=1)  # another network, stored as the model's new bundle
    with default_storage.open(other.bundle, "rb") as fh:
        again = default_storage.save(f"{stale.storage_prefix}bundle-again.zip", fh)
    other.delete()
    default_storage.delete(other.bundle)
    TrainedModel.objects.filter(pk=stale.pk).update(
        bundle=again, bundle_sha256=other.bundle_sha256, bundle_bytes=other.bundle_bytes
    )
    fresh = TrainedModel.objects.get(pk=stale.pk)

    new = cache.get_predictor(fresh)
    assert new is not old and list(cache._loaded) == [(fresh.pk, fresh.bundle_sha256)]  # the old one let go
    late = cache.get_predictor(stale)  # read the row before the update: its bundle is still stored
    assert late.predict_bytes([image_bytes(size=(40, 40))], k=1)[0][0].label in {"cat", "dog"}

    report = sweep(grace=timedelta(0), scratch=False)
    removed = {r["name"] for r in report.removed}
    assert stale.bundle in removed and not default_storage.exists(stale.bundle)
    assert fresh.bundle not in removed and default_storage.exists(fresh.bundle)
