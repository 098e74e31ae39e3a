"""Every split the engine and the app make, in one place.

- `split_samples`: an upload's train and validation images (its own val/, or a stratified split);
- `with_splits`: that split written into the index, so each image keeps its side in later versions;
- `place_added`: the side of images added to a version (the zip's own, or as many to validation as
  keep each class's share at VAL_FRACTION);
- `stratified_draw`: a fraction of each class, by position (the fit's held-out slice and its pilot
  subsample).
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import replace

import numpy as np

from ml.config import VAL_FRACTION_OPTION
from ml.dataset import DatasetIndex, Sample

VAL_FRACTION = VAL_FRACTION_OPTION.default_value()  # of an upload without val/


def with_splits(index: DatasetIndex, val_fraction: float = VAL_FRACTION, seed: int = 0) -> DatasetIndex:
    """The index with every image's split written down: the upload's own, or the stratified split a
    fit would make (`split_samples`), so that a later relabel or addition leaves each image where it was."""
    if any(s.split == "val" for s in index.samples):
        return index
    _, val = split_samples(index, val_fraction, seed)
    held_out = {s.sha256 for s in val}
    samples = [
        s if s.split == "test" else replace(s, split="val" if s.sha256 in held_out else "train") for s in index.samples
    ]
    return DatasetIndex(classes=index.classes, samples=samples, warnings=index.warnings, layout=index.layout)


def split_samples(
    index: DatasetIndex, val_fraction: float = VAL_FRACTION, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """(train, val): the upload's own val/ when it has one, else a stratified split."""
    if any(s.split == "val" for s in index.samples):
        return (
            [s for s in index.samples if s.split in ("train", "")],
            [s for s in index.samples if s.split == "val"],
        )
    from sklearn.model_selection import train_test_split

    pool = [s for s in index.samples if s.split != "test"]
    labels = [s.label for s in pool]
    n_val = max(len(index.classes), round(len(pool) * val_fraction))
    train, val = train_test_split(pool, test_size=n_val, stratify=labels, random_state=seed)
    return sorted(train, key=lambda s: s.member), sorted(val, key=lambda s: s.member)


def place_added(parent: DatasetIndex, new: list[Sample], *, own_split: bool) -> list[Sample]:
    """Splits for added images: the zip's own train/ and val/, else per class as many to val as keep
    the class's share of validation images at VAL_FRACTION (a seeded choice among them)."""
    if own_split:
        return [replace(s, split="train" if s.split in ("", "train") else s.split) for s in new]
    val_now = Counter(s.label for s in parent.samples if s.split == "val")
    total_now = Counter(s.label for s in parent.samples if s.split in ("train", "val"))
    by_class: dict[str, list[Sample]] = defaultdict(list)
    for s in sorted(new, key=lambda s: s.sha256):
        by_class[s.label].append(s)
    placed = []
    for label, group in by_class.items():
        target = round((total_now[label] + len(group)) * VAL_FRACTION) - val_now[label]
        to_val = set(random.Random(f"{label}:{len(group)}").sample(range(len(group)), max(0, min(len(group), target))))
        placed += [replace(s, split="val" if i in to_val else "train") for i, s in enumerate(group)]
    return placed


def stratified_draw(y: np.ndarray, fraction: float, seed: int, *, keep_one: bool) -> np.ndarray:
    """Sorted positions of `fraction` of each class, drawn at random; at least one per class, and
    with `keep_one` at least one left out of the draw (a class of one image is not drawn at all)."""
    rng = np.random.default_rng(seed)
    drawn = []
    for c in np.unique(y):
        pos = np.flatnonzero(y == c)
        m = max(1, round(fraction * len(pos)))
        m = min(m, len(pos) - 1) if keep_one else min(m, len(pos))
        drawn.append(rng.choice(pos, m, replace=False))
    return np.sort(np.concatenate(drawn))
