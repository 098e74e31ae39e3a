"""The whole pipeline: archive in, bundle and a result out.

    index -> split -> backbone -> features (once) -> linear probe -> evaluate -> export

`progress` receives `Progress` events; raising `ml.errors.Cancelled` from it
stops the fit cleanly (the web app does this when a user cancels).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.backbones import DEFAULT_BACKBONE, create_backbone, get_spec
from ml.bundle import write_bundle
from ml.dataset import DatasetIndex, IngestConfig, index_dataset, split_samples
from ml.errors import ConfigError
from ml.evaluate import classification_metrics
from ml.features import extract_features
from ml.probe import DEFAULT_CS, fit_probe
from ml.similarity import BatchNormStats, head_entropy, similarity_score
from ml.strategy import SIZE_BOUNDARY, STRATEGIES, decide

# Strategies this build can run; the rest of the matrix falls back to the linear probe, saying so.
IMPLEMENTED = ("linear",)
# Share of the overall progress bar each phase takes (feature extraction dominates).
PHASE_WEIGHTS = {"index": 0.10, "features": 0.70, "fit": 0.15, "export": 0.05}


@dataclass
class FitConfig:
    strategy: str = "auto"  # auto picks from the data; see ml.strategy.STRATEGIES
    backbone: str = DEFAULT_BACKBONE
    size_boundary: int = SIZE_BOUNDARY  # training images per class where "small" becomes "large"
    val_fraction: float = 0.2  # used only when the upload has no val/ folder
    seed: int = 0
    batch_size: int = 64  # feature-extraction batch
    device: str = "auto"  # "auto" -> cuda when available, else cpu

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown strategy '{self.strategy}'. Valid choices: {', '.join(STRATEGIES)}.")
        if self.size_boundary < 1:
            raise ConfigError("size_boundary must be at least 1 image per class.")
        get_spec(self.backbone)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction must be between 0 and 1.")


@dataclass(frozen=True)
class Progress:
    phase: str  # index | features | fit | export
    done: int
    total: int
    fraction: float  # overall, 0..1
    row: dict | None = None  # a history row, when this event completes one


@dataclass
class FitResult:
    classes: list[str]
    strategy: dict
    metrics: dict
    timings: dict
    artifacts: dict
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


ProgressFn = Callable[[Progress], None]


def fit(
    archive: Path,
    out_dir: Path,
    config: FitConfig | None = None,
    *,
    index: DatasetIndex | None = None,
    progress: ProgressFn | None = None,
) -> FitResult:
    config = config or FitConfig()
    config.validate()
    report = _reporter(progress)
    timings: dict[str, float] = {}
    out_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    if index is None:
        index = index_dataset(archive, IngestConfig(), lambda d, n: report("index", d, n))
    report("index", 1, 1)
    train, val = split_samples(index, config.val_fraction, config.seed)
    class_id = {c: i for i, c in enumerate(index.classes)}
    y_train = np.array([class_id[s.label] for s in train])
    y_val = np.array([class_id[s.label] for s in val])
    timings["index"] = time.perf_counter() - t

    t = time.perf_counter()
    device = _device(config.device)
    backbone = create_backbone(config.backbone)
    members = [s.member for s in train] + [s.member for s in val]
    # BN statistics are gathered during the one feature pass: the similarity costs no extra pass.
    with BatchNormStats(backbone.body) as bn_stats:
        feats = extract_features(
            backbone,
            archive,
            members,
            batch_size=config.batch_size,
            device=device,
            progress=lambda d, n: report("features", d, n),
        )
    X_train, X_val = feats[: len(train)], feats[len(train) :]
    with torch.no_grad():
        entropy = head_entropy(backbone.imagenet_head(torch.from_numpy(X_train)))
    similarity = similarity_score(bn_stats.divergence(), entropy)
    images_per_class = len(train) / len(index.classes)
    plan = decide(
        images_per_class, similarity, override=config.strategy, boundary=config.size_boundary, available=IMPLEMENTED
    )
    timings["features"] = time.perf_counter() - t

    t = time.perf_counter()
    n_cs = len(DEFAULT_CS)
    probe = fit_probe(
        X_train,
        y_train,
        len(index.classes),
        seed=config.seed,
        on_step=lambda row: report("fit", row["step"], n_cs, row),
    )
    with torch.no_grad():
        val_logits = probe.linear(torch.from_numpy(X_val))
        train_logits = probe.linear(torch.from_numpy(X_train))
    metrics = classification_metrics(val_logits, y_val, index.classes)
    metrics["train_accuracy"] = float((train_logits.argmax(1).numpy() == y_train).mean())
    metrics["num_train"] = len(train)
    timings["fit"] = time.perf_counter() - t

    t = time.perf_counter()
    strategy = plan.to_dict()
    classifier = nn.Sequential(backbone.body, probe.linear).eval()
    bundle_zip = write_bundle(
        out_dir,
        model=classifier,
        classes=index.classes,
        preprocessing=backbone.spec.preprocessing,
        metrics=metrics,
        card={
            "backbone": backbone.spec.name,
            "weights_tag": backbone.spec.weights_tag,
            "strategy": strategy,
            "hyperparameters": {"C": probe.C, "class_weight": "balanced"},
            "data_hash": index.content_hash,
            "seed": config.seed,
            "num_train": len(train),
            "num_val": len(val),
        },
    )
    report("export", 1, 1)
    timings["export"] = time.perf_counter() - t
    timings["total"] = sum(timings.values())
    return FitResult(
        classes=index.classes,
        strategy=strategy,
        metrics=metrics,
        timings={k: round(v, 3) for k, v in timings.items()},
        artifacts={"bundle": str(bundle_zip), "bundle_dir": str(out_dir / "bundle")},
        history=probe.history,
    )


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _reporter(progress: ProgressFn | None) -> Callable[..., None]:
    order = list(PHASE_WEIGHTS)

    def report(phase: str, done: int, total: int, row: dict | None = None) -> None:
        if progress is None:
            return
        before = sum(PHASE_WEIGHTS[p] for p in order[: order.index(phase)])
        frac = before + PHASE_WEIGHTS[phase] * (done / total if total else 1.0)
        progress(Progress(phase, done, total, round(min(frac, 1.0), 4), row))

    return report


__all__ = ["FitConfig", "FitResult", "Progress", "fit"]
