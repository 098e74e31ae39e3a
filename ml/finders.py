"""Finders: likely label errors, near-duplicates and outliers in a dataset, from one frozen pass.

    index the archive -> split it as a fit would -> top-layer features of every image
    (frozen backbone, eval, no grad, batched; once) -> three finders on those features:
    - label issues: out-of-fold probabilities of the cross-validated probe (the fit's logistic
      regression, C chosen by log loss), ranked by confident learning (`cleanlab`);
    - near-duplicates: pairs of images whose L2-normalised embeddings are closer than a
      threshold calibrated on re-encoded, resized and cropped copies (see DUPLICATE_SIMILARITY);
    - outliers: images far from every class (nearest-neighbour distance, normalised per class).

Results are frozen dataclasses; `Findings.to_dict()` is the one JSON shape the CLI prints and
the app stores. Members are named by their path in the archive.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

from ml.backbones import DEFAULT_BACKBONE, Backbone, create_backbone
from ml.dataset import DatasetIndex, IngestConfig, index_dataset, split_samples
from ml.errors import ConfigError
from ml.features import ZipImages, extract_features, iter_batches
from ml.preprocess import eval_transform
from ml.probe import out_of_fold_proba

DuplicateKind = Literal["cross-class", "cross-split", "same-class"]
ProgressFn = Callable[[str, int, int], None]  # (phase, done, total)

# Cosine similarity of L2-normalised coarse embeddings above which two images are near-duplicates.
# From `python -m tests.benchmarks.bench_curate` (copy_similarity): copies re-encoded at JPEG quality 70,
# resized to half and cropped to 90 % against each image's most similar other image. Hymenoptera (photos):
# copies min 0.835, p05 0.844, median 0.924; distinct images p99 0.842, max 0.852. On steel textures the
# distinct images reach 0.951 (p99 0.941) while copies have p05 0.849: one absolute threshold does not
# hold across domains (README, "Finders"; a relative rule is the open item).
DUPLICATE_SIMILARITY = 0.85
# cleanlab's rule. prune_by_class (the paper's "C_confusion"-ranked pruning, per given class) had the best
# precision and recall together over the first four datasets the benchmark measured (README, "Finders").
FILTER_BY = "prune_by_class"
# The probe's C path for out-of-fold probabilities: the fit's path without its two weakest penalties, which
# the CV log loss never chose with noisy labels (more noise, more regularisation) and which are the slowest.
ISSUE_CS = (1e-4, 1e-3, 1e-2, 1e-1)
# Near-duplicates are compared at a coarse, common resolution: every image reduced to a short side of
# half the dataset's 5th-percentile short side (at most DUPLICATE_SIDE), then read at DUPLICATE_SIDE px.
# At the native 240 px a half-size copy is a blurred image and its embedding moves more than the gap
# between distinct images (README, "Finders": 71 % of copies were their original's mutual nearest
# neighbour on hymenoptera at 240 px, 100 % at 96 px).
DUPLICATE_SIDE = 96
MIN_COARSE_SIDE = 8
NEIGHBOURS = 5  # outliers: mean distance to this many nearest images of a class
MAX_OUTLIERS = 10
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


@dataclass(frozen=True)
class FinderConfig:
    backbone: str = DEFAULT_BACKBONE
    val_fraction: float = 0.2  # as the fit splits an upload that has no val/ folder
    seed: int = 0
    folds: int = 5  # of the cross-validated probe whose out-of-fold probabilities are ranked
    filter_by: str = FILTER_BY
    duplicate_similarity: float = DUPLICATE_SIMILARITY
    max_outliers: int = MAX_OUTLIERS
    batch_size: int = 64
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    ingest: IngestConfig = IngestConfig()

    def validate(self) -> None:
        if self.filter_by not in FILTERS:
            raise ConfigError(f"Unknown filter_by '{self.filter_by}'. Valid choices: {', '.join(FILTERS)}.")
        if not 0.0 < self.duplicate_similarity <= 1.0:
            raise ConfigError("duplicate_similarity must be in (0, 1].")
        if not 2 <= self.folds <= 20:
            raise ConfigError("folds must be between 2 and 20.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction must be between 0 and 1.")


@dataclass(frozen=True)
class LabelIssue:
    member: str
    label: str  # the class it is filed under
    suggested: str  # the class the out-of-fold probe prefers
    score: float  # 0..1: 1 - the probe's out-of-fold probability of `label` (higher: more likely wrong)


@dataclass(frozen=True)
class NearDuplicate:
    members: tuple[str, str]
    kind: DuplicateKind  # cross-class (a conflict), cross-split (train/val leakage) or same-class
    similarity: float  # cosine similarity of the embeddings


@dataclass(frozen=True)
class Outlier:
    member: str
    score: float  # distance to the nearest class over that class's typical neighbour distance (>1: farther)


@dataclass(frozen=True)
class Findings:
    label_issues: tuple[LabelIssue, ...]  # most likely first
    near_duplicates: tuple[NearDuplicate, ...]  # most similar first
    outliers: tuple[Outlier, ...]  # farthest first
    num_images: int = 0
    probe: dict[str, Any] = field(default_factory=dict)  # C, cv_accuracy, cv_loss of the probe ranked
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "label_issues": [
                {"member": i.member, "label": i.label, "suggested": i.suggested, "score": round(i.score, 4)}
                for i in self.label_issues
            ],
            "near_duplicates": [
                {"members": list(d.members), "kind": d.kind, "similarity": round(d.similarity, 4)}
                for d in self.near_duplicates
            ],
            "outliers": [{"member": o.member, "score": round(o.score, 4)} for o in self.outliers],
            "num_images": self.num_images,
            "probe": self.probe,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass(frozen=True)
class Embedding:
    """Every train and validation image: its member, class id, split and top-layer features."""

    classes: list[str]
    members: list[str]
    labels: np.ndarray  # (N,) class ids
    splits: list[str]  # "train" or "val"
    features: np.ndarray  # (N, D) at the backbone's own preprocessing: what the probe reads
    # (N, D) at a common low resolution (see DUPLICATE_SIDE): what near-duplicates and outliers compare
    coarse: np.ndarray | None = None


def find_issues(
    archive: Path,
    config: FinderConfig = FinderConfig(),
    *,
    index: DatasetIndex | None = None,
    progress: ProgressFn | None = None,
) -> Findings:
    """Index `archive` (unless `index` is given), embed it once, and run the three finders."""
    config.validate()
    timings: dict[str, float] = {}
    with _timed(timings, "decode"):
        if index is None:
            index = index_dataset(archive, config.ingest, _phase(progress, "decode"))
    with _timed(timings, "features"):
        emb = embed(archive, index, config, progress=_phase(progress, "features"))
    findings = find_in_embedding(emb, config)
    return Findings(
        findings.label_issues,
        findings.near_duplicates,
        findings.outliers,
        findings.num_images,
        findings.probe,
        {**timings, **findings.timings},
    )


def embed(
    archive: Path,
    index: DatasetIndex,
    config: FinderConfig = FinderConfig(),
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Embedding:
    """Top-layer features at the backbone's own preprocessing, train images first, then val."""
    train, val = split_samples(index, config.val_fraction, config.seed)
    samples = train + val
    class_id = {c: i for i, c in enumerate(index.classes)}
    device = torch.device("cuda" if config.device == "auto" and torch.cuda.is_available() else "cpu")
    if config.device not in ("auto", "cpu"):
        device = torch.device(config.device)
    backbone = create_backbone(config.backbone)
    members = [s.member for s in samples]
    feats = extract_features(backbone, archive, members, batch_size=config.batch_size, device=device, progress=progress)
    side = coarse_side([min(s.width, s.height) for s in samples])
    coarse = extract_coarse_features(backbone, archive, members, side, batch_size=config.batch_size, device=device)
    return Embedding(
        classes=list(index.classes),
        members=members,
        labels=np.array([class_id[s.label] for s in samples]),
        splits=["train"] * len(train) + ["val"] * len(val),
        features=feats,
        coarse=coarse,
    )


def coarse_side(short_sides: list[int]) -> int:
    """The short side every image is reduced to before it is compared with the others: half the
    5th-percentile short side (a copy at half size then holds as much detail as its original),
    within [MIN_COARSE_SIDE, DUPLICATE_SIDE]."""
    p5 = float(np.percentile(short_sides, 5)) if short_sides else DUPLICATE_SIDE
    return int(min(DUPLICATE_SIDE, max(MIN_COARSE_SIDE, p5 // 2)))


def extract_coarse_features(
    backbone: Backbone,
    archive: Path,
    members: list[str],
    side: int,
    *,
    batch_size: int = 64,
    device: torch.device = torch.device("cpu"),
) -> np.ndarray:
    """Top-layer features of every image reduced to a short side of `side` px, then brought to the
    DUPLICATE_SIDE-px input the backbone reads (full view, centre crop of the long side only)."""
    prep = replace(backbone.spec.preprocessing, input_size=DUPLICATE_SIDE, resize_size=DUPLICATE_SIDE)
    to_tensor = eval_transform(prep)

    def load(img: Image.Image) -> torch.Tensor:
        scale = side / max(1, min(img.size))
        if scale < 1:
            img = img.resize(
                (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX
            )
        return to_tensor(img)

    images = ZipImages(archive, load, min_side=side)
    body = backbone.eval().to(device).body
    out = np.empty((len(members), 0), dtype=np.float32)
    chunks = []
    with torch.inference_mode():
        for batch in iter_batches(images.load, members, batch_size):
            chunks.append(body(batch.to(device)).float().cpu().numpy())
    if chunks:
        out = np.concatenate(chunks)
    return out


def find_in_embedding(emb: Embedding, config: FinderConfig = FinderConfig()) -> Findings:
    """The three finders on features already extracted."""
    config.validate()
    timings: dict[str, float] = {}
    with _timed(timings, "label_issues"):
        issues, probe = find_label_issues(emb, config)
    with _timed(timings, "neighbours"):
        unit = _normalise(emb.coarse if emb.coarse is not None else emb.features)
        neighbours = Neighbours.compute(unit, emb.labels, len(emb.classes))
    with _timed(timings, "near_duplicates"):
        dups = find_near_duplicates(emb, neighbours, config.duplicate_similarity)
    with _timed(timings, "outliers"):
        outliers = find_outliers(emb, neighbours, config.max_outliers)
    return Findings(tuple(issues), tuple(dups), tuple(outliers), len(emb.members), probe, timings)


# --- label issues --------------------------------------------------------------------------------


def find_label_issues(emb: Embedding, config: FinderConfig = FinderConfig()) -> tuple[list[LabelIssue], dict[str, Any]]:
    """Confident learning on the probe's out-of-fold probabilities, most likely errors first."""
    from cleanlab.rank import get_label_quality_scores

    oof = out_of_fold_proba(
        emb.features, emb.labels, len(emb.classes), Cs=ISSUE_CS, folds=config.folds, seed=config.seed
    )
    best = next(r for r in oof.history if r["C"] == oof.C)
    probe = {"C": oof.C, "cv_accuracy": round(best["cv_accuracy"], 4), "cv_loss": round(best["cv_loss"], 4)}
    flagged = rank_label_issues(emb.labels, oof.proba, config.filter_by)
    quality = get_label_quality_scores(emb.labels, oof.proba, method="self_confidence")
    suggested = oof.proba.argmax(1)
    issues = [
        LabelIssue(
            member=emb.members[i],
            label=emb.classes[emb.labels[i]],
            suggested=emb.classes[suggested[i]],
            score=float(1.0 - quality[i]),
        )
        for i in flagged
        if suggested[i] != emb.labels[i]  # an issue names a better class, or it is not actionable
    ]
    return issues, probe


def rank_label_issues(labels: np.ndarray, proba: np.ndarray, filter_by: str = FILTER_BY) -> list[int]:
    """Positions cleanlab flags, least likely label first."""
    from cleanlab.filter import find_label_issues

    ranked = find_label_issues(
        labels, proba, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1
    )  # n_jobs=1: no process pool (a Celery worker's child is a daemon, which may not fork one)
    return [int(i) for i in ranked]


# --- neighbours: near-duplicates and outliers ----------------------------------------------------

CHUNK = 1024  # rows of the similarity matrix held at once


@dataclass(frozen=True)
class Neighbours:
    """Each image's nearest others (any class), and its mean distance to the nearest of each class."""

    index: np.ndarray  # (N, k) nearest other images, most similar first
    similarity: np.ndarray  # (N, k) their cosine similarities
    class_distance: np.ndarray  # (N, C) mean cosine distance to the NEIGHBOURS nearest of each class

    @classmethod
    def compute(cls, unit: np.ndarray, labels: np.ndarray, num_classes: int, k: int = 8) -> Neighbours:
        n = len(unit)
        k = min(k, n - 1)
        index = np.empty((n, k), dtype=np.int64)
        sim = np.empty((n, k), dtype=np.float32)
        class_distance = np.full((n, num_classes), np.inf, dtype=np.float32)
        columns = [np.flatnonzero(labels == c) for c in range(num_classes)]
        for start in range(0, n, CHUNK):
            rows = np.arange(start, min(n, start + CHUNK))
            s = unit[rows] @ unit.T
            s[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
            top = np.argpartition(-s, k - 1, axis=1)[:, :k]
            top_s = np.take_along_axis(s, top, 1)
            order = np.argsort(-top_s, axis=1)
            index[rows] = np.take_along_axis(top, order, 1)
            sim[rows] = np.take_along_axis(top_s, order, 1)
            for c, cols in enumerate(columns):
                m = min(NEIGHBOURS, len(cols) - 1)
                if m < 1:
                    continue
                near = -np.partition(-s[:, cols], m - 1, axis=1)[:, :m]
                class_distance[rows, c] = 1.0 - np.where(np.isfinite(near), near, np.nan).mean(1)
        return cls(index, sim, class_distance)


def find_near_duplicates(emb: Embedding, nb: Neighbours, threshold: float) -> list[NearDuplicate]:
    """Pairs of distinct images whose cosine similarity reaches `threshold`, most similar first."""
    pairs: dict[tuple[int, int], float] = {}
    for i, j in zip(*np.nonzero(nb.similarity >= threshold), strict=True):
        other = int(nb.index[i, j])
        a, b = sorted((int(i), other))
        pairs[(a, b)] = float(nb.similarity[i, j])
    found = [NearDuplicate((emb.members[a], emb.members[b]), _kind(emb, a, b), s) for (a, b), s in pairs.items()]
    return sorted(found, key=lambda d: (-d.similarity, d.members))


def _kind(emb: Embedding, a: int, b: int) -> DuplicateKind:
    if emb.labels[a] != emb.labels[b]:
        return "cross-class"
    if emb.splits[a] != emb.splits[b]:
        return "cross-split"
    return "same-class"


def find_outliers(emb: Embedding, nb: Neighbours, top: int = MAX_OUTLIERS) -> list[Outlier]:
    """The images farthest from every class: distance to a class's nearest images over that class's own
    median neighbour distance, at the nearest class; the `top` largest above 1."""
    own = nb.class_distance[np.arange(len(emb.labels)), emb.labels]
    typical = np.array(
        [np.nanmedian(own[emb.labels == c]) if (emb.labels == c).any() else np.nan for c in range(len(emb.classes))]
    )
    typical = np.where(np.isfinite(typical) & (typical > 0), typical, np.nan)
    ratio = nb.class_distance / typical[None, :]
    score = np.nanmin(np.where(np.isfinite(ratio), ratio, np.nan), axis=1)
    order = [int(i) for i in np.argsort(-np.nan_to_num(score, nan=-np.inf)) if score[i] > 1.0][:top]
    return [Outlier(emb.members[i], float(score[i])) for i in order]


def _normalise(x: np.ndarray) -> np.ndarray:
    unit: np.ndarray = (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    return unit


# --- helpers -------------------------------------------------------------------------------------


@contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = time.perf_counter() - start


def _phase(progress: ProgressFn | None, phase: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(phase, done, total)
