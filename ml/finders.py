"""Finders: likely label errors, near-duplicates and outliers in a dataset.

    index the archive -> split it as a fit would (`ml.measure.split_for_fit`) -> two views of every image:
      - the probe views: the fit's own frozen measurement (`ml.measure.frozen_views`) at the smaller of
        its candidate input sizes, the top layer and every stage tap: what the probe reads. Given a cache,
        every view a fit of this version reads is measured and kept there, and the fit that follows reads it;
      - the duplicate view: every image reduced to one coarse common size, the backbone's
        stride-8 stage pooled into a 4x4 grid: detail and layout, not the class;
    (frozen backbone, eval, no grad, batched; images already in an `EmbeddingCache` are skipped)
    -> three finders on those features:
    - label issues: out-of-fold probabilities of the cross-validated probe (the fit's logistic
      regression, C chosen by log loss) on each probe view, and their mean; the one whose log loss
      on the given labels is lowest is ranked by confident learning (`cleanlab`);
    - near-duplicates: mutual nearest neighbours in the duplicate view whose distance is a small
      fraction of the distance to either one's next neighbour (a ratio test, see DUPLICATE_RATIO);
    - outliers: images far from every class (nearest-neighbour distance in the top-layer probe view,
      normalised per class).

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
import torch.nn.functional as F
from PIL import Image

from ml.backbones import DEFAULT_BACKBONE, Backbone, create_backbone, get_spec
from ml.dataset import DatasetIndex, IngestConfig, Sample, index_dataset
from ml.errors import ConfigError
from ml.features import TOP, EmbeddingCache, Pass, ZipImages, iter_batches
from ml.measure import candidate_sizes, frozen_views, resolve_device, split_for_fit, stage_taps
from ml.preprocess import eval_transform
from ml.probe import out_of_fold_proba
from ml.runtime import tune_allocator

DuplicateKind = Literal["cross-class", "cross-split", "same-class"]
PhaseTick = Callable[[str, int, int], None]  # (phase, done, total)

# Near-duplicates: a pair of images is one when each is the other's nearest neighbour in the duplicate view
# and their cosine distance is at most DUPLICATE_RATIO times the distance from either of them to its next
# nearest image (Lowe's ratio test, relative to the dataset's own spacing, so one setting holds on photos and
# on textures alike). Calibrated with `python -m tests.benchmarks.bench_curate` on copies re-encoded at JPEG
# quality 70, resized to half and cropped to the central 90 %, planted into val/ and into another class
# (5 % of the training images each). Per kind (cross-class, cross-split), recall / precision with every
# other pair of that kind counted false, at 0.75: hymenoptera 1.00/1.00, 1.00/1.00; flowers 1.00/1.00,
# 1.00/1.00; cats vs dogs 0.97/1.00, 1.00/1.00; chest X-ray 0.90/1.00, 0.90/1.00 (planted pairs' ratio
# p95 0.76, max 0.90; the lowest other cross-class pair 0.757); NEU steel (while calibrating) 1.00/1.00,
# 1.00/0.96. While calibrating, at 0.70 chest fell to 0.85-0.90 recall, at 0.80 steel's cross-split
# precision to 0.89. An absolute cosine threshold does not carry across domains: distinct steel textures
# reach 0.94 in this view while planted copies of X-rays start at 0.91; the pooled top layer (the view
# before) did worse at its best ratio (steel 0.40 recall, chest 0.28 at precision 0.95).
# Where it misses (README, "Finders"): GTSRB, whose 32-px signs come in tracks of frames of one sign, and
# whose copies are 14-px JPEGs: at the common 8 px, 15 % of the copies are mutual nearest neighbours of
# their original; the rest sit among the sign's other frames (the finder pairs 640 same-class images among
# the originals, such as consecutive frames of one track: real near-duplicates). Copies of 8-px digits are
# 4-px JPEGs: none is a mutual nearest neighbour of its original in this view (median ratio 12.8); pixel by
# pixel at 4 px, 16 % (box-reduced originals, among 400) to 83 % (the benchmark's own bilinear filter, among
# all) are nearest to their original. Brain MRI holds many near-duplicates of its own (128 cross-split pairs
# among the originals, ratios down to 0.002), and 31 % of its copies are mutual nearest neighbours.
DUPLICATE_RATIO = 0.75
# The duplicate view: every image reduced to a short side of half the dataset's 5th-percentile short side
# (a copy at half size then holds as much detail as its original), floored to a multiple of 8 in
# [MIN_COARSE_SIDE, DUPLICATE_SIDE] (so that a few added images rarely change it and cached features
# stay valid), then read at DUPLICATE_SIDE px by the body up to its stride-8 stage, pooled to a
# DUPLICATE_GRID x DUPLICATE_GRID grid. Global pooling keeps what a texture is made of and drops where
# things are; the grid keeps that, and a stride-8 stage holds detail the top layer has already abstracted.
DUPLICATE_SIDE = 96
MIN_COARSE_SIDE = 8
DUPLICATE_GRID = 4
DUPLICATE_VIEW_VERSION = 2  # part of the cache key: bump when the duplicate view changes
# cleanlab's rule. prune_by_class (the paper's "C_confusion"-ranked pruning, per given class) had the best
# precision and recall together over the first four datasets the benchmark measured (README, "Finders").
FILTER_BY = "prune_by_class"
# The probe's C path for out-of-fold probabilities: the fit's path without its two weakest penalties, which
# the CV log loss never chose with noisy labels (more noise, more regularisation) and which are the slowest.
ISSUE_CS = (1e-4, 1e-3, 1e-2, 1e-1)
# Repeated k-fold: the chosen C's out-of-fold probabilities averaged over this many fold assignments.
# One assignment leaves an image's estimate to the luck of its fold; on hymenoptera with 10 % flipped, three
# single runs gave precision/recall 0.83/0.79, 0.78/0.75, 0.75/0.88 and their average 0.87/0.83 (NEU steel:
# 0.94/0.94, 0.90/0.98, 0.94/0.94 and 0.96/0.96). The extra runs fit one C, not the path: +50 % probe time.
REPEATS = 3
# Which representation the label finder reads: the probe's out-of-fold probabilities on each view (the top
# layer and every stage tap, at the probe's input size) and their mean, and the one whose log loss on the given
# labels is lowest (a proper scoring rule on held-out images: it needs no clean labels). On photos of ImageNet's
# kind the top layer wins; on X-rays, steel, digits and signs a stage tap or the mean of all views. 10 % flipped,
# precision / recall, top layer -> chosen (`bench_curate`, seed 0): chest X-ray 0.67/0.85 -> 0.80/0.80 (mean),
# digits 0.82/0.95 -> 0.96/0.94 (blocks.4), GTSRB 0.60/0.95 -> 0.86/0.89 (mean), NEU 0.94/0.94 -> 0.95/0.85
# (mean), brain MRI 0.62/0.88 -> 0.69/0.93 (mean); hymenoptera 0.80/0.83 and cats 0.99/0.91 stay on the top
# layer. NEU trades recall for precision (its mean view flags 43, not 48). Every view costs a probe: 2.5-6x the
# top layer alone (digits 16 -> 40 s, NEU 5 -> 16.5 s, brain MRI, 2,400 images, 6 -> 36 s).
MEAN_VIEW = "mean"
NEIGHBOURS = 5  # outliers: mean distance to this many nearest images of a class
MAX_OUTLIERS = 10
# An outlier's score lies beyond Tukey's far-out fence of the dataset's scores, Q3 + 3 x IQR: a rule about
# the dataset's own spread, so a dataset with nothing odd in it shows no outliers (the 10 largest of any
# dataset were shown before, scores of 1.1 among them).
OUTLIER_FENCE = 3.0
FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")


@dataclass(frozen=True)
class FinderConfig:
    backbone: str = DEFAULT_BACKBONE
    val_fraction: float = 0.2  # as the fit splits an upload that has no val/ folder
    seed: int = 0
    folds: int = 5  # of the cross-validated probe whose out-of-fold probabilities are ranked
    repeats: int = REPEATS  # k-fold runs (other fold assignments) whose probabilities are averaged
    filter_by: str = FILTER_BY
    duplicate_ratio: float = DUPLICATE_RATIO
    max_outliers: int = MAX_OUTLIERS
    batch_size: int = 64
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    ingest: IngestConfig = IngestConfig()

    def validate(self) -> None:
        if self.filter_by not in FILTERS:
            raise ConfigError(f"Unknown filter_by '{self.filter_by}'. Valid choices: {', '.join(FILTERS)}.")
        if not 0.0 < self.duplicate_ratio <= 1.0:
            raise ConfigError("duplicate_ratio must be in (0, 1].")
        if not 2 <= self.folds <= 20:
            raise ConfigError("folds must be between 2 and 20.")
        if not 1 <= self.repeats <= 10:
            raise ConfigError("repeats must be between 1 and 10.")
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
    similarity: float  # cosine similarity in the duplicate view


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
    probe: dict[str, Any] = field(default_factory=dict)  # view, C, cv_accuracy, cv_loss of what was ranked; views
    timings: dict[str, float] = field(default_factory=dict)
    embedded: int = 0  # images decoded and embedded by this run (the rest came from the cache)

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
            "embedded": self.embedded,
            "probe": self.probe,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


@dataclass(frozen=True)
class Embedding:
    """Every train and validation image: its member, class id, split and features in both views."""

    classes: list[str]
    members: list[str]
    labels: np.ndarray  # (N,) class ids
    splits: list[str]  # "train" or "val"
    features: np.ndarray  # (N, D) top-layer probe view: the backbone's own preprocessing; what the probe reads
    coarse: np.ndarray | None = None  # (N, D') duplicate view (see DUPLICATE_SIDE); None: use `features`
    embedded: int = 0  # images embedded to make this (not taken from a cache)
    stages: dict[str, np.ndarray] = field(default_factory=dict)  # stage tap -> (N, D_tap), at the probe's size

    def probe_views(self) -> dict[str, np.ndarray]:
        """Every view the label finder's probe reads: the top layer, then the stage taps."""
        return {TOP: self.features, **self.stages}


def find_issues(
    archive: Path,
    config: FinderConfig = FinderConfig(),
    *,
    index: DatasetIndex | None = None,
    cache: EmbeddingCache | None = None,
    progress: PhaseTick | None = None,
) -> Findings:
    """Index `archive` (unless `index` is given), embed the images `cache` does not hold yet (it holds
    every image of this run afterwards), and run the three finders."""
    config.validate()
    timings: dict[str, float] = {}
    if index is None:
        with _timed(timings, "index"):
            index = index_dataset(archive, config.ingest, _phase(progress, "decode"))
    with _timed(timings, "features"):
        emb = embed(archive, index, config, cache=cache, progress=progress)
    found = find_in_embedding(emb, config)
    return replace(found, timings={**timings, **found.timings}, embedded=emb.embedded)


def embed(
    archive: Path,
    index: DatasetIndex,
    config: FinderConfig = FinderConfig(),
    *,
    cache: EmbeddingCache | None = None,
    progress: PhaseTick | None = None,
) -> Embedding:
    """Both views of every train and val image, in the order a fit reads them (`split_for_fit`).

    The probe views are a fit's own measurement (`ml.measure.frozen_views`) at the smaller of its
    candidate input sizes: the top layer and every stage tap. Given a cache, everything a fit of this
    version measures is measured and kept there (every candidate size, every stage tap, the similarity):
    the fit that follows reads it instead of extracting it (`fit(..., known=Known(store=cache))`). Images
    the cache holds are not decoded at all."""
    train, val = split_for_fit(index, config.val_fraction, config.seed)
    samples = train + val
    spec = get_spec(config.backbone)
    sizes, _ = candidate_sizes(spec.preprocessing, train)
    side = coarse_side([min(s.width, s.height) for s in samples])
    dup_key = f"{config.backbone}/dup{DUPLICATE_VIEW_VERSION}@{DUPLICATE_SIDE}s{side}"
    # Without a cache to keep them in, the views only a fit reads would be thrown away: the probe size alone.
    keep = cache is not None
    cache = cache if cache is not None else EmbeddingCache()
    before = cache.images()
    tune_allocator()
    backbone = create_backbone(config.backbone)
    taps = stage_taps(backbone)  # the label finder reads them at the probe's size; a fit, at every size
    probe: dict[str, np.ndarray] | None = None
    for prep in sizes if keep else sizes[:1]:
        how = Pass(resolve_device(config.device), config.batch_size, _phase(progress, f"features@{prep.input_size}"))
        feats, _ = frozen_views(backbone, archive, (train, val), prep, taps=taps, how=how, store=cache)
        if probe is None:
            probe = feats
    todo = [s for s in samples if not cache.has(dup_key, s.sha256)]
    if todo:
        dup = _duplicate_view(backbone, archive, todo, side, config, _phase(progress, "duplicates"))
        for s, d in zip(todo, dup, strict=True):
            cache.put(dup_key, s.sha256, d)
    class_id = {c: i for i, c in enumerate(index.classes)}
    assert probe is not None
    return Embedding(
        classes=list(index.classes),
        members=[s.member for s in samples],
        labels=np.array([class_id[s.label] for s in samples], dtype=np.int64),
        splits=["train"] * len(train) + ["val"] * len(val),
        features=probe[TOP].astype(np.float32),
        coarse=cache.stack(dup_key, [s.sha256 for s in samples]),
        embedded=len({s.sha256 for s in samples} - before),
        stages={tap: probe[tap].astype(np.float32) for tap in taps},
    )


def coarse_side(short_sides: list[int]) -> int:
    """The short side every image is reduced to in the duplicate view: half the 5th-percentile short
    side (a copy at half size then holds as much detail as its original), floored to a multiple of 8,
    within [MIN_COARSE_SIDE, DUPLICATE_SIDE]."""
    p5 = float(np.percentile(short_sides, 5)) if short_sides else DUPLICATE_SIDE
    return int(min(DUPLICATE_SIDE, max(MIN_COARSE_SIDE, int(p5 // 2) // 8 * 8)))


def duplicate_stage(backbone: Backbone) -> str:
    """The last stage whose output keeps 1/8 of the input's side (blocks.2 of EfficientNet-Lite,
    layer2 of a ResNet): fine enough to tell two textures apart, coarse enough to ignore JPEG noise."""
    shapes: dict[str, int] = {}
    modules = dict(backbone.body.named_modules())
    hooks = [
        modules[name].register_forward_hook(lambda _m, _i, out, name=name: shapes.__setitem__(name, out.shape[-1]))
        for name in backbone.stages
    ]
    try:
        with torch.inference_mode():
            backbone.body(torch.zeros(1, 3, 64, 64))
    finally:
        for h in hooks:
            h.remove()
    return [name for name in backbone.stages if shapes[name] >= 64 // 8][-1]


def _duplicate_view(
    backbone: Backbone,
    archive: Path,
    samples: list[Sample],
    side: int,
    config: FinderConfig,
    progress: Callable[[int, int], None] | None,
) -> np.ndarray:
    """The duplicate view of `samples`, rounded to float16 as the cache keeps it: each image reduced
    to a short side of `side` (box filter), read at DUPLICATE_SIDE px up to the stride-8 stage, pooled
    to a DUPLICATE_GRID x DUPLICATE_GRID grid. JPEGs are decoded at the draft size that covers `side`."""
    device = resolve_device(config.device)
    stage = duplicate_stage(backbone)
    # torch's stubs lack the (device, memory_format) form of Module.to, which it accepts.
    backbone.eval().to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    head = backbone.truncated(stage)
    spec = backbone.spec.preprocessing
    to_dup = eval_transform(replace(spec, input_size=DUPLICATE_SIDE, resize_size=DUPLICATE_SIDE))

    def reduce(img: Image.Image) -> torch.Tensor:
        scale = side / max(1, min(img.size))
        if scale < 1:
            img = img.resize(
                (max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.Resampling.BOX
            )
        return to_dup(img)

    images = ZipImages(archive, reduce, min_side=side)
    out: np.ndarray | None = None
    done = 0
    with torch.inference_mode():
        for batch in iter_batches(images.load, [s.member for s in samples], config.batch_size):
            y = batch.to(device).contiguous(memory_format=torch.channels_last)
            grid = F.adaptive_avg_pool2d(head(y), DUPLICATE_GRID).flatten(1).float().cpu().numpy()
            if out is None:
                out = np.empty((len(samples), grid.shape[1]), dtype=np.float32)
            out[done : done + len(batch)] = grid
            done += len(batch)
            if progress:
                progress(done, len(samples))
    assert out is not None
    return out.astype(np.float16)


def find_in_embedding(emb: Embedding, config: FinderConfig = FinderConfig()) -> Findings:
    """The three finders on features already extracted."""
    config.validate()
    timings: dict[str, float] = {}
    with _timed(timings, "label_issues"):
        issues, probe = find_label_issues(emb, config)
    with _timed(timings, "near_duplicates"):
        dup_unit = _normalise(emb.coarse if emb.coarse is not None else emb.features)
        dups = find_near_duplicates(emb, nearest(dup_unit, k=2), config.duplicate_ratio)
    with _timed(timings, "outliers"):
        neighbours = Neighbours.compute(_normalise(emb.features), emb.labels, len(emb.classes))
        outliers = find_outliers(emb, neighbours, config.max_outliers)
    return Findings(tuple(issues), tuple(dups), tuple(outliers), len(emb.members), probe, timings, emb.embedded)


# --- label issues --------------------------------------------------------------------------------


def find_label_issues(emb: Embedding, config: FinderConfig = FinderConfig()) -> tuple[list[LabelIssue], dict[str, Any]]:
    """Confident learning on the out-of-fold probabilities of the view that predicts the labels best,
    most likely errors first."""
    from cleanlab.rank import get_label_quality_scores

    proba, probe = label_probabilities(emb, config)
    flagged = rank_label_issues(emb.labels, proba, config.filter_by)
    quality = get_label_quality_scores(emb.labels, proba, method="self_confidence")
    suggested = proba.argmax(1)
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


def label_probabilities(emb: Embedding, config: FinderConfig = FinderConfig()) -> tuple[np.ndarray, dict[str, Any]]:
    """Out-of-fold probabilities of the given labels: the probe's on each view and their mean, whichever has
    the lowest log loss (see MEAN_VIEW), and what was chosen: {view, C (None for the mean), cv_accuracy,
    cv_loss, views: {view: cv_loss}}."""
    from sklearn.metrics import log_loss

    candidates: dict[str, np.ndarray] = {}
    Cs: dict[str, float] = {}
    for name, X in emb.probe_views().items():  # one at a time: each run's per-C probabilities are dropped
        run = out_of_fold_proba(
            X, emb.labels, len(emb.classes), Cs=ISSUE_CS, folds=config.folds, seed=config.seed, repeats=config.repeats
        )
        candidates[name], Cs[name] = run.proba, run.C
    if len(candidates) > 1:
        candidates[MEAN_VIEW] = np.mean(list(candidates.values()), axis=0)
    labels = list(range(len(emb.classes)))
    losses = {name: float(log_loss(emb.labels, p, labels=labels)) for name, p in candidates.items()}
    view = min(losses, key=lambda name: losses[name])
    proba = candidates[view]
    probe = {
        "view": view,
        "C": Cs.get(view),
        "cv_accuracy": round(float((proba.argmax(1) == emb.labels).mean()), 4),
        "cv_loss": round(losses[view], 4),
        "views": {name: round(loss, 4) for name, loss in losses.items()},
    }
    return proba, probe


def rank_label_issues(labels: np.ndarray, proba: np.ndarray, filter_by: str = FILTER_BY) -> list[int]:
    """Positions cleanlab flags, least likely label first."""
    from cleanlab.filter import find_label_issues

    # n_jobs=1: no process pool. The app runs the finders in a Celery worker's child, a daemon process,
    # which may not start one (cleanlab's default is a pool over the physical cores).
    ranked = find_label_issues(labels, proba, filter_by=filter_by, return_indices_ranked_by="self_confidence", n_jobs=1)
    return [int(i) for i in ranked]


# --- near-duplicates -----------------------------------------------------------------------------

CHUNK = 1024  # rows of the similarity matrix held at once


def nearest(unit: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Each row's k most similar other rows (indices, cosine similarities), most similar first."""
    n = len(unit)
    k = max(0, min(k, n - 1))
    index = np.empty((n, k), dtype=np.int64)
    sim = np.empty((n, k), dtype=np.float32)
    if k == 0:
        return index, sim
    for start in range(0, n, CHUNK):
        rows = np.arange(start, min(n, start + CHUNK))
        s = unit[rows] @ unit.T
        s[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        top_s = np.take_along_axis(s, top, 1)
        order = np.argsort(-top_s, axis=1)
        index[rows] = np.take_along_axis(top, order, 1)
        sim[rows] = np.take_along_axis(top_s, order, 1)
    return index, sim


def find_near_duplicates(
    emb: Embedding, near: tuple[np.ndarray, np.ndarray], ratio: float = DUPLICATE_RATIO
) -> list[NearDuplicate]:
    """Mutual nearest neighbours whose distance is at most `ratio` times the distance from either
    one to its next nearest image (1 when there is none), most similar first."""
    index, sim = near
    if index.shape[1] == 0:
        return []
    found = []
    for a in range(len(index)):
        b = int(index[a, 0])
        if b <= a or index[b, 0] != a:
            continue
        distance = max(0.0, 1.0 - float(sim[a, 0]))
        runner_up = max(float(sim[a, 1]), float(sim[b, 1])) if index.shape[1] > 1 else 0.0
        if distance <= ratio * max(0.0, 1.0 - runner_up):
            found.append(NearDuplicate((emb.members[a], emb.members[b]), _kind(emb, a, b), float(sim[a, 0])))
    return sorted(found, key=lambda d: (-d.similarity, d.members))


def _kind(emb: Embedding, a: int, b: int) -> DuplicateKind:
    if emb.labels[a] != emb.labels[b]:
        return "cross-class"
    if emb.splits[a] != emb.splits[b]:
        return "cross-split"
    return "same-class"


# --- outliers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Neighbours:
    """Each image's mean cosine distance to the NEIGHBOURS nearest images of each class."""

    class_distance: np.ndarray  # (N, C)

    @classmethod
    def compute(cls, unit: np.ndarray, labels: np.ndarray, num_classes: int) -> Neighbours:
        n = len(unit)
        class_distance = np.full((n, num_classes), np.inf, dtype=np.float32)
        columns = [np.flatnonzero(labels == c) for c in range(num_classes)]
        for start in range(0, n, CHUNK):
            rows = np.arange(start, min(n, start + CHUNK))
            s = unit[rows] @ unit.T
            s[np.arange(len(rows)), rows] = -np.inf  # not its own neighbour
            for c, cols in enumerate(columns):
                m = min(NEIGHBOURS, len(cols) - 1)
                if m < 1:
                    continue
                near = -np.partition(-s[:, cols], m - 1, axis=1)[:, :m]
                class_distance[rows, c] = 1.0 - np.where(np.isfinite(near), near, np.nan).mean(1)
        return cls(class_distance)


def find_outliers(emb: Embedding, nb: Neighbours, top: int = MAX_OUTLIERS) -> list[Outlier]:
    """The images farthest from every class: distance to a class's nearest images over that class's own
    median neighbour distance, at the nearest class; the `top` largest beyond the far-out fence of
    these scores (OUTLIER_FENCE) and above 1."""
    own = nb.class_distance[np.arange(len(emb.labels)), emb.labels]
    typical = np.array(
        [np.nanmedian(own[emb.labels == c]) if (emb.labels == c).any() else np.nan for c in range(len(emb.classes))]
    )
    typical = np.where(np.isfinite(typical) & (typical > 0), typical, np.nan)
    ratio = nb.class_distance / typical[None, :]
    score = np.nanmin(np.where(np.isfinite(ratio), ratio, np.nan), axis=1)
    finite = score[np.isfinite(score)]
    q1, q3 = np.quantile(finite, [0.25, 0.75]) if len(finite) else (np.nan, np.nan)
    bar = max(1.0, float(q3 + OUTLIER_FENCE * (q3 - q1))) if len(finite) else np.inf
    order = [int(i) for i in np.argsort(-np.nan_to_num(score, nan=-np.inf)) if score[i] > bar][:top]
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


def _phase(progress: PhaseTick | None, phase: str) -> Callable[[int, int], None] | None:
    if progress is None:
        return None
    return lambda done, total: progress(phase, done, total)
