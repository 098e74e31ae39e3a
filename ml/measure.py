"""What a fit measures before it trains: the split in the fit's order, the candidate input sizes,
the frozen features at each size (top layer and stage taps) and the similarity to ImageNet.

The fit and the finders both measure through `frozen_views`. Given a store (an
`ml.features.EmbeddingCache`), it keeps what it extracts there by image content and reads what is
already there instead of extracting it again. The finders, which run when a dataset version is made,
measure exactly what a fit of that version would (same images, same order, same batches, kept at
full precision), so the fit that follows reads its features instead of computing them: the same
numbers, without the pass. `assess` (the matrix cell shown before training) is here too, so that
ingestion does not import the training pipeline.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ml.backbones import DEFAULT_BACKBONE, Backbone, Preprocessing, create_backbone
from ml.dataset import DatasetIndex, Sample
from ml.features import TOP, EmbeddingCache, Pass, extract_stage_features
from ml.preprocess import choose_preprocessing
from ml.runtime import tune_allocator
from ml.similarity import BatchNormStats, Similarity, head_entropy, similarity_score
from ml.splits import split_samples
from ml.strategy import SIZE_BOUNDARY, Plan, decide

SIMILARITY_SAMPLE = 256  # images whose BN statistics measure similarity (train split first)
FEATURE_BATCH = 64  # images per forward pass (the fit's default; the finders use it, so stored and fresh agree)


@dataclass(frozen=True)
class Representation:
    """Frozen features at one input size: TOP and the stage taps, train rows then val rows."""

    prep: Preprocessing
    feats: dict[str, np.ndarray]


def split_for_fit(index: DatasetIndex, val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The stratified split, with the training images in a seeded random order.

    The order matters: BatchNorm statistics are taken from the first `SIMILARITY_SAMPLE` training
    images, which must not all be one class.
    """
    train, val = split_samples(index, val_fraction, seed)
    return random.Random(seed).sample(train, len(train)), val


def stage_taps(backbone: Backbone) -> list[str]:
    """Intermediate stages worth a probe: from a third of the way up to just below the top."""
    stages = backbone.stages
    return stages[len(stages) // 3 : -1]


def candidate_sizes(
    native: Preprocessing, train: Sequence[Sample], resolution: str = "auto"
) -> tuple[list[Preprocessing], str]:
    """The input sizes a fit measures, smallest first, and why there is a second: the native input
    always (similarity is calibrated there), and a size that follows small images."""
    if resolution != "auto":
        return [native], ""
    small, why = choose_preprocessing(native, [min(s.width, s.height) for s in train])
    return ([small, native] if small != native else [native]), why


def view_key(backbone: str, tap: str, prep: Preprocessing) -> str:
    """The store's name for one tap's features at one input (everything they depend on but the image)."""
    return f"{backbone}/{tap}@{prep.input_size}r{prep.resize_size}"


def _similarity_key(backbone: str, train: Sequence[Sample]) -> str:
    """The store's name for the similarity measured on the first training images, in the fit's order."""
    first = "|".join(s.sha256 for s in train[:SIMILARITY_SAMPLE])
    return f"{backbone}/similarity/{hashlib.sha256(first.encode()).hexdigest()}"


def held(
    store: EmbeddingCache | None,
    backbone: str,
    prep: Preprocessing,
    taps: Sequence[str],
    train: Sequence[Sample],
    val: Sequence[Sample],
    *,
    native: bool,
) -> bool:
    """Whether `store` holds every image's features at `prep` (and, at the native input, the similarity)."""
    if store is None:
        return False
    if native and store.value(_similarity_key(backbone, train)) is None:
        return False
    return all(store.has(view_key(backbone, tap, prep), s.sha256) for tap in (TOP, *taps) for s in (*train, *val))


def frozen_views(
    backbone: Backbone,
    archive: Path,
    split: tuple[Sequence[Sample], Sequence[Sample]],
    prep: Preprocessing,
    *,
    taps: Sequence[str],
    how: Pass,
    store: EmbeddingCache | None = None,
) -> tuple[dict[str, np.ndarray], Similarity | None]:
    """Features of every image of `split` (train rows, then val) at `prep`, TOP and each tap, and at
    the backbone's native input the similarity measured on the first training images.

    Without a store, or with one that holds none of them, every image is extracted in this order, as
    a fit always has. A store keeps what is extracted; images it already holds are read instead (a
    version that adds images extracts those alone, plus, for a similarity not measured yet, the first
    training images again: their BatchNorm statistics are what it measures)."""
    train, val = split
    name = backbone.spec.name
    native = prep == backbone.spec.preprocessing
    samples = [*train, *val]
    keys = {tap: view_key(name, tap, prep) for tap in (TOP, *taps)}
    sim_key = _similarity_key(name, train)
    missing = [s for s in samples if store is None or not all(store.has(k, s.sha256) for k in keys.values())]
    need_similarity = native and (store is None or store.value(sim_key) is None)
    if store is None or len(missing) == len(samples):
        todo, n_first = samples, len(train)  # the fit's own pass, in its order
    else:
        first = list(train[:SIMILARITY_SAMPLE]) if need_similarity else []
        seen = {s.sha256 for s in first}
        todo, n_first = first + [s for s in missing if s.sha256 not in seen], len(first)
    feats: dict[str, np.ndarray] = {}
    similarity = None
    if todo:
        members = [s.member for s in todo]
        if need_similarity:
            feats, similarity = native_pass(backbone, archive, members, n_first, taps, how)
        else:
            feats = extract_stage_features(backbone, archive, members, taps=taps, preprocessing=prep, how=how)
    elif how.progress:
        how.progress(len(samples), len(samples))
    if store is None:
        return feats, similarity
    for tap, matrix in feats.items():
        for s, row in zip(todo, matrix, strict=True):
            store.put(keys[tap], s.sha256, row)
    if similarity is not None:
        store.put_value(sim_key, _similarity_vector(similarity))
    if native and similarity is None:
        stored = store.value(sim_key)
        similarity = _similarity_from(stored) if stored is not None else None
    if todo is samples:
        return feats, similarity
    return {tap: store.stack(key, [s.sha256 for s in samples]) for tap, key in keys.items()}, similarity


def native_pass(
    backbone: Backbone,
    archive: Path,
    members: list[str],
    n_train: int,
    taps: Sequence[str],
    how: Pass,
) -> tuple[dict[str, np.ndarray], Similarity]:
    """Features at the native input, and the similarity measured on the first training images
    (`members` starts with the `n_train` training images; the validation images never count)."""
    n = min(SIMILARITY_SAMPLE, n_train)
    with BatchNormStats(backbone.body, max_images=n) as stats:
        feats = extract_stage_features(backbone, archive, members, taps=taps, how=how)
    with torch.no_grad():
        logits = backbone.imagenet_head.cpu()(torch.from_numpy(feats[TOP][:n]))
    return feats, similarity_score(stats.divergence(), head_entropy(logits))


def assess(
    archive: Path,
    index: DatasetIndex,
    *,
    backbone: str = DEFAULT_BACKBONE,
    size_boundary: int = SIZE_BOUNDARY,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: str = "auto",
) -> Plan:
    """Where a dataset sits in the transfer matrix, before any training.

    The same measurement `fit` makes (same images, same order), so the cell shown
    before training is the one the fit will find.
    """
    tune_allocator()
    train, _ = split_for_fit(index, val_fraction, seed)
    bb = create_backbone(backbone)
    members = [s.member for s in train[:SIMILARITY_SAMPLE]]
    _, similarity = native_pass(bb, archive, members, len(members), [], Pass(resolve_device(device), FEATURE_BATCH))
    return decide(len(train) / len(index.classes), similarity, boundary=size_boundary)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _similarity_vector(s: Similarity) -> np.ndarray:
    return np.array([s.score, np.nan if s.bn_divergence is None else s.bn_divergence, s.head_entropy])


def _similarity_from(v: np.ndarray) -> Similarity:
    score, divergence, entropy = (float(x) for x in v)
    return Similarity(score=score, bn_divergence=None if np.isnan(divergence) else divergence, head_entropy=entropy)
