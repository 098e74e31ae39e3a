"""The whole pipeline: archive in, bundle and a result out.

    index -> split -> input resolution -> one frozen pass (top + stage features,
    BatchNorm statistics) -> similarity -> plan -> linear probe ->
    [stage probes | fine-tune] -> evaluate -> export (TorchScript + ONNX)

`progress` receives `Progress` events; raising `ml.errors.Cancelled` from it
stops the fit cleanly (the web app does this when a user cancels).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ml.augment import train_transform
from ml.backbones import DEFAULT_BACKBONE, Backbone, Preprocessing, create_backbone, get_spec
from ml.bundle import write_bundle
from ml.dataset import DatasetIndex, IngestConfig, Sample, index_dataset, split_samples
from ml.errors import ConfigError
from ml.evaluate import classification_metrics
from ml.features import TOP, GridPool, ZipImages, extract_stage_features
from ml.finetune import (
    Batches,
    FinetuneConfig,
    SanityReport,
    check_initial_loss,
    finetune,
    lr_range_test,
    predict_logits,
)
from ml.preprocess import choose_preprocessing, eval_transform
from ml.probe import DEFAULT_CS, ProbeFit, fit_probe
from ml.runtime import tune_allocator
from ml.similarity import BatchNormStats, head_entropy, similarity_score
from ml.strategy import SIZE_BOUNDARY, STRATEGIES, Plan, decide

# Share of the overall progress bar each phase takes.
PHASE_WEIGHTS = {"decode": 0.05, "features": 0.35, "fit": 0.55, "export": 0.05}
SIMILARITY_SAMPLE = 256  # images whose BN statistics measure similarity (train split first)
# A stage must beat the top layer's cross-validated accuracy by this much to be preferred:
# the top layer is the default, and ties go to it.
STAGE_MARGIN = 0.005
MAX_CACHED_BYTES = 2 * 1024**3  # decoded images kept in memory for fine-tuning; beyond, decode per epoch


@dataclass
class FitConfig:
    strategy: str = "auto"  # auto picks from the data; see ml.strategy.STRATEGIES
    backbone: str = DEFAULT_BACKBONE
    size_boundary: int = SIZE_BOUNDARY  # training images per class where "small" becomes "large"
    val_fraction: float = 0.2  # used only when the upload has no val/ folder
    seed: int = 0
    batch_size: int = 64  # feature-extraction batch
    device: str = "auto"  # "auto" -> cuda when available, else cpu
    budget: float | None = None  # seconds allowed for fine-tuning (None: epochs and early stopping bound it)
    max_epochs: int = 15
    patience: int = 3
    hflip: bool = True  # horizontal flips are a valid augmentation for this data
    lr_find: bool = False  # run a learning-rate range test before fine-tuning and return its curve
    resolution: str = "auto"  # auto: follows the data; native: the backbone's own input size

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"Unknown strategy '{self.strategy}'. Valid choices: {', '.join(STRATEGIES)}.")
        if self.size_boundary < 1:
            raise ConfigError("size_boundary must be at least 1 image per class.")
        get_spec(self.backbone)
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError("val_fraction must be between 0 and 1.")
        if self.budget is not None and not (0 < self.budget < float("inf")):  # also refuses NaN
            raise ConfigError("budget must be a positive number of seconds.")
        if self.max_epochs < 1 or self.patience < 1:
            raise ConfigError("max_epochs and patience must be at least 1.")
        if self.resolution not in ("auto", "native"):
            raise ConfigError("resolution must be 'auto' or 'native'.")


@dataclass(frozen=True)
class Progress:
    phase: str  # decode | features | fit | export
    done: int
    total: int
    fraction: float  # overall, 0..1
    row: dict | None = None  # a history row, when this event completes one
    message: str | None = None  # a log line, as it is written (the event carries nothing else new)


@dataclass
class FitResult:
    classes: list[str]
    strategy: dict
    metrics: dict
    timings: dict
    artifacts: dict
    preprocessing: dict
    device: str
    history: list[dict] = field(default_factory=list)
    sanity: list[dict] = field(default_factory=list)
    hyperparameters: dict = field(default_factory=dict)
    lr_range: dict | None = None
    log: list[str] = field(default_factory=list)

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
    tune_allocator()
    _seed_everything(config.seed)
    report = _reporter(progress)
    timings: dict[str, float] = {}
    log = _Log(report.say)
    out_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    if index is None:
        index = index_dataset(archive, IngestConfig(), lambda d, n: report("decode", d, n))
    report("decode", 1, 1)
    train, val = _split(index, config.val_fraction, config.seed)
    num_classes = len(index.classes)
    class_id = {c: i for i, c in enumerate(index.classes)}
    y_train = np.array([class_id[s.label] for s in train])
    y_val = np.array([class_id[s.label] for s in val])
    log.append(f"{len(train)} training and {len(val)} validation images in {num_classes} classes")
    timings["decode"] = time.perf_counter() - t

    # --- one frozen pass: top-layer and stage features, BN statistics ---------------------------
    t = time.perf_counter()
    device = _device(config.device)
    backbone = create_backbone(config.backbone)
    native = backbone.spec.preprocessing
    if config.resolution == "native":
        prep, why_prep = native, "the backbone's native input (asked for)"
    else:
        prep, why_prep = choose_preprocessing(native, [min(s.width, s.height) for s in train])
    log.append(f"input {prep.input_size} px: {why_prep}")
    small = len(train) / num_classes < config.size_boundary
    # Stage taps cost hooks and copies; only a stage plan (chosen or likely) needs them.
    taps = _stage_taps(backbone) if config.strategy == "stages" or (config.strategy == "auto" and small) else []
    members = [s.member for s in train] + [s.member for s in val]
    with BatchNormStats(backbone.body, max_images=SIMILARITY_SAMPLE) as bn_stats:
        feats = extract_stage_features(
            backbone,
            archive,
            members,
            taps=taps,
            batch_size=config.batch_size,
            device=device,
            preprocessing=prep,
            progress=lambda d, n: report("features", d, n),
        )
        if prep == native:
            sim_top = feats[TOP][: len(train)]
    if prep != native:
        # The similarity is calibrated at the native input: measure it there, on a sample.
        sample = train[:SIMILARITY_SAMPLE]
        bn_stats, sim_top = _native_pass(backbone, archive, sample, device, config.batch_size)
        log.append(f"similarity measured at the native {native.input_size} px on {len(sample)} training images")
    similarity = _similarity(backbone, bn_stats, sim_top[:SIMILARITY_SAMPLE])
    images_per_class = len(train) / num_classes
    plan = decide(images_per_class, similarity, override=config.strategy, boundary=config.size_boundary)
    log.append(plan.reason)
    timings["features"] = time.perf_counter() - t

    # --- fit -------------------------------------------------------------------------------------
    t = time.perf_counter()
    # Progress in work units: each probe is len(DEFAULT_CS) units (ticking per fold inside),
    # each fine-tuning epoch one unit per training image, the LR range test one per step.
    n_cs = len(DEFAULT_CS)
    finetuning = plan.name in ("partial", "full")
    units = n_cs * (1 + len(taps) if plan.name == "stages" else 1)
    lr_steps = 40 if config.lr_find and finetuning else 0
    units += (lr_steps + config.max_epochs * len(train)) if finetuning else 0
    probes_done = [0]

    def on_probe_fit(done: int, total: int) -> None:
        report("fit", probes_done[0] * n_cs + n_cs * done / total, units)

    def on_probe_row(row: dict, stage: str) -> None:
        report("fit", probes_done[0] * n_cs + row["step"], units, {"phase": "probe", "stage": stage, **row})
        if row["step"] == n_cs:
            probes_done[0] += 1

    def probe(X: np.ndarray, stage: str) -> ProbeFit:
        return fit_probe(
            X, y_train, num_classes, seed=config.seed, on_step=lambda r: on_probe_row(r, stage), on_fit=on_probe_fit
        )

    X_train, X_val = feats[TOP][: len(train)], feats[TOP][len(train) :]
    top_probe = probe(X_train, TOP)
    chosen = top_probe
    sanity = _probe_sanity(top_probe, X_train, y_train, num_classes)
    history = [{"phase": "probe", "stage": TOP, **r} for r in top_probe.history]
    hyper: dict = {"probe": {"stage": TOP, "C": top_probe.C, "class_weight": "balanced", "cv_folds": 5}}
    lr_range = None
    classifier: nn.Module = nn.Sequential(backbone.body, top_probe.linear)
    val_logits = None

    if plan.name == "stages":
        stage, chosen, table, scores = _best_stage(feats, taps, top_probe, len(train), probe)
        history += table
        hyper["probe"] = {"stage": stage, "C": chosen.C, "class_weight": "balanced", "cv_folds": 5}
        hyper["stages"] = {
            "chosen": stage,
            "cv_accuracy": {k: round(v, 4) for k, v in scores.items() if v is not None},
        }
        log.append(f"stage probes (cross-validated accuracy): {hyper['stages']['cv_accuracy']}; kept {stage}")
        if stage != TOP:
            X_train, X_val = feats[stage][: len(train)], feats[stage][len(train) :]
            classifier = nn.Sequential(backbone.truncated(stage), GridPool(), chosen.linear)
    elif finetuning:
        ft_config = FinetuneConfig(
            depth=plan.name, max_epochs=config.max_epochs, patience=config.patience, budget=config.budget
        )
        train_batches, val_batches, augmentation = _image_batches(
            archive, train, val, y_train, y_val, prep, plan, config, ft_config
        )
        start = n_cs + lr_steps

        def on_epoch(row: dict) -> None:
            history.append({"phase": "finetune", **row})
            report("fit", start + row["epoch"] * len(train), units, history[-1])
            log.append(
                f"epoch {row['epoch']}: val accuracy {row['val_accuracy']:.4f}, val loss {row['val_loss']:.4f}"
                + (f", train loss {row['train_loss']:.4f}" if row["train_loss"] is not None else " (probe head)")
            )

        def on_step(seen: int, total: int) -> None:
            epoch = sum(1 for r in history if r.get("phase") == "finetune")
            report("fit", start + (epoch - 1) * total + seen, units)

        if config.lr_find:
            lr_range = lr_range_test(
                backbone,
                top_probe.linear,
                train_batches,
                num_classes,
                ft_config,
                device,
                steps=lr_steps,
                seed=config.seed,
                on_step=lambda d, n: report("fit", n_cs + d, units),
            )
            log.append(
                f"LR range test: steepest descent at {lr_range['suggested_lr']:.2e} "
                f"(the recipe's rule gives {lr_range['recipe_lr']:.2e})"
            )
        result = finetune(
            backbone,
            top_probe.linear,
            train_batches,
            val_batches,
            num_classes,
            ft_config,
            device=device,
            seed=config.seed,
            on_epoch=on_epoch,
            on_step=on_step,
        )
        classifier = result.model
        val_logits, _ = predict_logits(classifier, val_batches, device)  # on the device, images already cached
        sanity = sanity + result.sanity
        hyper["finetune"] = {
            **result.hyperparameters,
            "augmentation": augmentation,
            "best_epoch": result.best_epoch,
            "stopped": result.stopped,
        }
        log.append(f"fine-tuning stopped: {result.stopped}; best epoch {result.best_epoch} restored")
    if config.lr_find and not finetuning:
        log.append(f"LR range test skipped: the '{plan.name}' plan fits a probe, with no learning rate to choose")

    classifier = classifier.eval().cpu()
    for check in sanity:
        log.append(f"sanity {check['check']}: {'ok' if check['ok'] else 'FAILED'} ({check['detail']})")
    if val_logits is None:  # a probe: logits straight from the cached features
        with torch.no_grad():
            val_logits = chosen.linear(torch.from_numpy(X_val))
            train_logits = chosen.linear(torch.from_numpy(X_train))
    metrics = classification_metrics(val_logits, y_val, index.classes, names=[s.member for s in val])
    if not finetuning:
        metrics["train_accuracy"] = float((train_logits.argmax(1).numpy() == y_train).mean())
    metrics["num_train"] = len(train)
    timings["fit"] = time.perf_counter() - t

    # --- export ----------------------------------------------------------------------------------
    t = time.perf_counter()
    strategy = plan.to_dict()
    hyper["input"] = {"size": prep.input_size, "reason": why_prep}
    bundle_zip = write_bundle(
        out_dir,
        model=classifier,
        classes=index.classes,
        preprocessing=prep,
        metrics=metrics,
        card={
            "backbone": backbone.spec.name,
            "weights_tag": backbone.spec.weights_tag,
            "strategy": strategy,
            "hyperparameters": hyper,
            "sanity": sanity,
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
        preprocessing=asdict(prep),
        device=str(device),
        history=history,
        sanity=sanity,
        hyperparameters=hyper,
        lr_range=lr_range,
        log=list(log),
    )


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
    train, _ = _split(index, val_fraction, seed)
    bb = create_backbone(backbone)
    stats, top = _native_pass(bb, archive, train[:SIMILARITY_SAMPLE], _device(device), 64)
    return decide(len(train) / len(index.classes), _similarity(bb, stats, top), boundary=size_boundary)


def _split(index: DatasetIndex, val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """The stratified split, with the training images in a seeded random order.

    The order matters: BatchNorm statistics are taken from the first
    `SIMILARITY_SAMPLE` training images, which must not all be one class.
    """
    train, val = split_samples(index, val_fraction, seed)
    return random.Random(seed).sample(train, len(train)), val


def _native_pass(backbone: Backbone, archive: Path, samples: list[Sample], device, batch_size: int):
    with BatchNormStats(backbone.body) as stats:
        top = extract_stage_features(
            backbone, archive, [s.member for s in samples], batch_size=batch_size, device=device
        )[TOP]
    return stats, top


def _similarity(backbone: Backbone, stats: BatchNormStats, top: np.ndarray):
    with torch.no_grad():
        entropy = head_entropy(backbone.imagenet_head.cpu()(torch.from_numpy(top)))
    return similarity_score(stats.divergence(), entropy)


def _stage_taps(backbone: Backbone) -> list[str]:
    """Intermediate stages worth a probe: from a third of the way up to just below the top."""
    stages = backbone.stages
    return stages[len(stages) // 3 : -1]


def _best_stage(
    feats: dict[str, np.ndarray],
    taps: list[str],
    top: ProbeFit,
    n_train: int,
    probe: Callable[[np.ndarray, str], ProbeFit],
) -> tuple[str, ProbeFit, list[dict], dict[str, float | None]]:
    """Probe every tapped stage; keep the best by cross-validated accuracy.

    Returns (chosen stage, its probe, the tapped stages' history rows, best CV
    accuracy per stage including the top layer; None where nothing could be
    cross-validated).

    Selection uses cross-validation on the training split, like the choice of C,
    so the validation split stays an honest estimate of the chosen model. The
    top layer is the incumbent: another stage must beat it by `STAGE_MARGIN`.
    """
    fits = {TOP: top}
    table: list[dict] = []
    for stage in taps:
        fits[stage] = probe(feats[stage][:n_train], stage)
        table += [{"phase": "probe", "stage": stage, **r} for r in fits[stage].history]
    scores = {name: _cv_best(f) for name, f in fits.items()}
    score = {name: -1.0 if v is None else v for name, v in scores.items()}
    best = max(taps, key=score.__getitem__, default=TOP)
    chosen = best if score[best] >= score[TOP] + STAGE_MARGIN else TOP
    return chosen, fits[chosen], table, scores


def _cv_best(probe: ProbeFit) -> float | None:
    """Best cross-validated accuracy over the C path; None when every fold was NaN (too few images)."""
    return max((r["cv_accuracy"] for r in probe.history if r["cv_accuracy"] == r["cv_accuracy"]), default=None)


def _probe_sanity(probe: ProbeFit, X: np.ndarray, y: np.ndarray, num_classes: int) -> list[dict]:
    report = SanityReport()
    mean, std = X.mean(0), X.std(0) + 1e-6
    Xs = torch.from_numpy((X - mean) / std).float()
    fresh = nn.Linear(X.shape[1], num_classes)
    nn.init.normal_(fresh.weight, std=0.01)
    nn.init.zeros_(fresh.bias)
    yt = torch.as_tensor(y, dtype=torch.long)
    with torch.no_grad():
        initial = nn.functional.cross_entropy(fresh(Xs), yt).item()
        final = nn.functional.cross_entropy(probe.linear(torch.from_numpy(X)), yt).item()
    check_initial_loss(report, initial, num_classes, 0.25)
    report.add("loss_decreases", final < initial, f"probe train loss {initial:.4f} (fresh head) -> {final:.4f}")
    report.add("finite_loss", bool(np.isfinite(final) and np.isfinite(X).all()), "features and probe loss finite")
    return report.checks


def _image_batches(archive, train, val, y_train, y_val, prep: Preprocessing, plan, config: FitConfig, ft):
    """(train, val) batch sources for fine-tuning, and the augmentation's description for the model card.

    Decoded images are cached in memory when they fit."""
    similar = plan.cell.endswith("similar")
    large = plan.cell.startswith("large")
    augment, augmentation = train_transform(prep, similar=similar, large=large, hflip=config.hflip)
    evaluate = eval_transform(prep)
    source = _ImageSource(archive, train + val, prep)
    n = len(train)
    return (
        Batches(lambda i: augment(source.image(i)), y_train, ft.batch_size),
        Batches(lambda i: evaluate(source.image(n + i)), y_val, 64),
        augmentation,
    )


class _ImageSource:
    """Decoded, size-reduced RGB images by position; kept in memory when they fit."""

    def __init__(self, archive: Path, samples: list[Sample], prep: Preprocessing) -> None:
        self.images = ZipImages(archive, lambda img: img, min_side=prep.resize_size)
        self.members = [s.member for s in samples]
        self.min_side = prep.resize_size
        # Kept images have a short side of at most 2 x resize_size; PIL holds RGB in 4 bytes/pixel.
        cap = 2 * prep.resize_size
        est = sum(
            4 * min(s.width * s.height, cap * cap * max(s.width, s.height) / max(1, min(s.width, s.height)))
            for s in samples
        )
        self.cache: dict[int, object] | None = {} if est <= MAX_CACHED_BYTES else None

    def image(self, i: int):
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = self.images.load(self.members[i])
        short = min(img.size)
        if short > 2 * self.min_side:  # keep the cache small: crops never need more than ~2x
            scale = 2 * self.min_side / short
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        if self.cache is not None:
            self.cache[i] = img
        return img


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _reporter(progress: ProgressFn | None) -> Callable[..., None]:
    """report(phase, done, total, row) -> Progress events whose overall fraction never goes back."""
    order = list(PHASE_WEIGHTS)
    last = [0.0]

    current = ["decode", 0, 1]

    def report(phase: str, done: float, total: float, row: dict | None = None) -> None:
        if progress is None:
            return
        before = sum(PHASE_WEIGHTS[p] for p in order[: order.index(phase)])
        frac = before + PHASE_WEIGHTS[phase] * (min(done, total) / total if total else 1.0)
        last[0] = max(last[0], min(frac, 1.0))
        current[:] = [phase, round(done), round(total)]
        progress(Progress(phase, round(done), round(total), round(last[0], 4), row))

    def say(message: str) -> None:
        if progress is not None:
            phase, done, total = current
            progress(Progress(phase, done, total, round(last[0], 4), message=message))

    report.say = say
    return report


class _Log(list):
    """The fit's log lines; each is also sent to the progress callback as it is written."""

    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__()
        self._say = say

    def append(self, line: str) -> None:
        super().append(line)
        self._say(line)


__all__ = ["FitConfig", "FitResult", "Progress", "assess", "fit"]
