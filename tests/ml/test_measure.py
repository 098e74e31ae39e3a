"""ml.measure: the frozen features a fit measures, kept in a store by the finders and read back by
the fit that follows (the real EfficientNet-Lite backbone on the CPU, a tiny archive of small images,
so both candidate input sizes are measured)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ml.backbones import create_backbone
from ml.dataset import index_dataset
from ml.features import EmbeddingCache, Pass
from ml.finders import FinderConfig, find_issues
from ml.fit import FitConfig, Known, fit
from ml.measure import candidate_sizes, frozen_views, split_for_fit, stage_taps, view_key
from ml.run import Progress
from tests.ml.test_progress import _archive

CONFIG = FitConfig(strategy="linear", batch_size=16)


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    """An archive, the store the finders filled while looking at it, and a fit without the store."""
    tmp = tmp_path_factory.mktemp("measure")
    archive = _archive(tmp / "data.zip")
    store = EmbeddingCache()
    find_issues(archive, FinderConfig(folds=3, batch_size=CONFIG.batch_size), cache=store)
    cold = fit(archive, tmp / "cold", CONFIG)
    return archive, EmbeddingCache.from_bytes(store.to_bytes()), cold


def test_the_finders_store_every_view_a_fit_reads(measured):
    archive, store, _ = measured
    index = index_dataset(archive)
    train, val = split_for_fit(index, CONFIG.val_fraction, CONFIG.seed)
    backbone = create_backbone(CONFIG.backbone)
    sizes, _ = candidate_sizes(backbone.spec.preprocessing, train)
    assert len(sizes) == 2  # 32-px images: a small input and the native one
    for prep in sizes:
        for tap in ["top", *stage_taps(backbone)]:
            view = view_key(CONFIG.backbone, tap, prep)
            assert all(store.has(view, s.sha256) for s in train + val), view


def test_a_fit_that_reads_the_store_makes_the_same_model_without_extracting(measured, tmp_path):
    archive, store, cold = measured
    events: list[Progress] = []
    warm = fit(archive, tmp_path / "warm", CONFIG, known=Known(store=store), progress=events.append)
    assert warm.strategy == cold.strategy  # the same similarity, so the same cell and plan
    assert warm.metrics.val_accuracy == cold.metrics.val_accuracy
    assert [getattr(r, "cv_accuracy", None) for r in warm.history] == [
        getattr(r, "cv_accuracy", None) for r in cold.history
    ]
    assert [d.chosen for d in warm.decisions] == [d.chosen for d in cold.decisions]
    assert any("read from the store" in line for line in warm.log)
    assert not any(e.label.startswith("Extracting features") for e in events)
    assert any(e.label.startswith("Reading the stored features") for e in events)
    assert events[-1].fraction == 1.0
    assert any(e.eta_s is not None for e in events)  # measured on the probe's fits, as no pass was timed


def test_a_version_with_new_images_extracts_those_and_reads_the_rest(measured):
    """Stored rows match fresh ones; an image the store lacks is extracted (with the first training
    images again, whose BatchNorm statistics the similarity is measured on), the rest read."""
    archive, store, _ = measured
    index = index_dataset(archive)
    train, val = split_for_fit(index, CONFIG.val_fraction, CONFIG.seed)
    backbone = create_backbone(CONFIG.backbone)
    native = backbone.spec.preprocessing
    taps = stage_taps(backbone)
    cpu = torch.device("cpu")
    fresh, similarity = frozen_views(backbone, archive, (train, val), native, taps=taps, how=Pass(cpu, 16))
    partial = EmbeddingCache.from_bytes(store.to_bytes())
    partial._views[view_key(CONFIG.backbone, "top", native)].pop(val[-1].sha256)
    read, again = frozen_views(backbone, archive, (train, val), native, taps=taps, how=Pass(cpu, 16), store=partial)
    assert partial.has(view_key(CONFIG.backbone, "top", native), val[-1].sha256)
    assert again is not None and similarity is not None and again.score == pytest.approx(similarity.score)
    for tap in fresh:
        np.testing.assert_allclose(read[tap], fresh[tap], rtol=1e-4, atol=1e-5)


def test_store_values_round_trip(tmp_path: Path):
    store = EmbeddingCache()
    store.put("b/top@64r64", "aa", np.arange(3, dtype=np.float32))
    store.put_value("b/similarity/xyz", np.array([0.5, np.nan, 0.25]))
    again = EmbeddingCache.from_bytes(store.to_bytes())
    assert len(again) == 1 and again.get("b/top@64r64", "aa").dtype == np.float32
    assert np.array_equal(again.value("b/similarity/xyz"), np.array([0.5, np.nan, 0.25]), equal_nan=True)
    assert again.value("missing") is None
