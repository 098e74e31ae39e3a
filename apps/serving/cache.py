"""Loaded models stay in the process: a bundle is fetched and loaded once, then reused."""

from __future__ import annotations

import threading
from collections import OrderedDict

from django.conf import settings

from apps.common.storage import local_copy
from apps.serving.models import TrainedModel
from ml.bundle import unpack_bundle
from ml.predict import Predictor

MAX_LOADED = 8

_lock = threading.Lock()
_loaded: OrderedDict[tuple[int, str], Predictor] = OrderedDict()


def get_predictor(model: TrainedModel) -> Predictor:
    key = (model.pk, model.bundle_sha256)
    with _lock:
        if key in _loaded:
            _loaded.move_to_end(key)
            return _loaded[key]
        folder = settings.GRAFT_WORK_DIR / "serving" / f"{model.pk}-{model.bundle_sha256[:16]}"
        with local_copy(model.bundle) as archive:
            unpack_bundle(archive, folder)
        predictor = Predictor(folder)
        _loaded[key] = predictor
        while len(_loaded) > MAX_LOADED:
            _loaded.popitem(last=False)
        return predictor
