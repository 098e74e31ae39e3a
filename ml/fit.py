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
from ml.features import TOP, GridPool, ZipImages, extract_stage_features, iter_batches
from ml.finetune import Batches, FinetuneConfig, finetune, lr_range_test
from ml.preprocess import choose_preprocessing, eval_transform
from ml.probe import DEFAULT_CS, ProbeFit, fit_probe
from ml.runtime import tune_allocator
from ml.similarity import BatchNormStats, head_entropy, similarity_score
from ml.strategy import SIZE_BOUNDARY, STRATEGIES, decide

# Share of the overall progress bar each phase takes.
PHASE_WEIGHTS = {"decode": 0.05, "features": 0.35, "fit": 0.55, "export": 0.05}
SIMILARITY_SAMPLE = 256  # images whose BN statistics measure similarity (train split first)
# A stage must beat the top layer's cross-validated accuracy by this much to be preferred:
# the top layer is the default, and ties go to it.
STAGE_MARGIN = 0.005
MAX_CACHED_PIXELS = 600_000_000  # decoded images kept in memory for fine-tuning (~1.8 GB of RGB)


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
        if self.budget is not None and self.budget <= 0:
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
    log: list[str] = []
    out_dir.mkdir(parents=True, exist_ok=True)

    t = time.perf_counter()
    if index is None:
        index = index_dataset(archive, IngestConfig(), lambda d, n: report("decode", d, n))
    report("decode", 1, 1)
    train, val = split_samples(index, config.val_fraction, config.seed)
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
    taps = _stage_taps(backbone)
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
        bn_stats = BatchNormStats(backbone.body)
        sample = random.Random(config.seed).sample(train, min(len(train), SIMILARITY_SAMPLE))
        with bn_stats:
            sim_top = extract_stage_features(
                backbone, archive, [s.member for s in sample], batch_size=config.batch_size, device=device
            )[TOP]
        log.append(f"similarity measured at the native {native.input_size} px on {len(sample)} training images")
    with torch.no_grad():
        entropy = head_entropy(backbone.imagenet_head.cpu()(torch.from_numpy(sim_top)))
    similarity = similarity_score(bn_stats.divergence(), entropy)
    images_per_class = len(train) / num_classes
    plan = decide(images_per_class, similarity, override=config.strategy, boundary=config.size_boundary)
    log.append(plan.reason)
    timings["features"] = time.perf_counter() - t

    # --- fit -------------------------------------------------------------------------------------
    t = time.perf_counter()
    fit_steps = len(DEFAULT_CS) * (len(taps) + 1 if plan.name == "stages" else 1)
    done_steps = [0]

    def probe_step(row: dict, stage: str) -> None:
        done_steps[0] += 1
        report("fit", done_steps[0], fit_steps, {"phase": "probe", "stage": stage, **row})

    X_train, X_val = feats[TOP][: len(train)], feats[TOP][len(train) :]
    probe = fit_probe(X_train, y_train, num_classes, seed=config.seed, on_step=lambda r: probe_step(r, TOP))
    _sanity_probe = _probe_sanity(probe, X_train, y_train, num_classes)
    history = [{"phase": "probe", "stage": TOP, **r} for r in probe.history]
    hyper: dict = {"probe": {"stage": TOP, "C": probe.C, "class_weight": "balanced", "cv_folds": 5}}
    sanity = _sanity_probe
    lr_range = None
    classifier: nn.Module = nn.Sequential(backbone.body, probe.linear)

    if plan.name == "stages":
        stage, stage_probe, table = _best_stage(
            feats, taps, probe, len(train), y_train, num_classes, config.seed, probe_step
        )
        history += table
        table = [{"stage": TOP, **r} for r in probe.history] + table
        hyper["probe"] = {"stage": stage, "C": stage_probe.C, "class_weight": "balanced", "cv_folds": 5}
        hyper["stages"] = _stage_summary(table, stage)
        log.append(f"stage probes (cross-validated accuracy): {hyper['stages']['cv_accuracy']}; kept {stage}")
        if stage != TOP:
            X_train, X_val = feats[stage][: len(train)], feats[stage][len(train) :]
            probe = stage_probe
            classifier = nn.Sequential(backbone.truncated(stage), GridPool(), probe.linear)
    elif plan.name in ("partial", "full"):
        train_batches, val_batches = _image_batches(archive, train, val, y_train, y_val, prep, plan, config)
        ft_config = FinetuneConfig(
            depth=plan.name, max_epochs=config.max_epochs, patience=config.patience, budget=config.budget
        )
        fit_steps = config.max_epochs * len(train)

        def on_epoch(row: dict) -> None:
            history.append({"phase": "finetune", **row})
            report("fit", row["epoch"] * len(train), fit_steps, history[-1])
            log.append(
                f"epoch {row['epoch']}: val accuracy {row['val_accuracy']:.4f}, val loss {row['val_loss']:.4f}"
                + (f", train loss {row['train_loss']:.4f}" if row["train_loss"] is not None else " (probe head)")
            )

        def on_step(seen: int, total: int) -> None:
            epoch = sum(1 for r in history if r.get("phase") == "finetune")
            report("fit", (epoch - 1) * total + seen, fit_steps)

        if config.lr_find:
            lr_range = lr_range_test(nn.Sequential(backbone.body, probe.linear), train_batches, device)
            log.append(f"LR range test: steepest descent at {lr_range['suggested_lr']:.2e}")
        result = finetune(
            backbone,
            probe.linear,
            train_batches,
            val_batches,
            num_classes,
            ft_config,
            device=device,
            seed=config.seed,
            on_epoch=on_epoch,
            on_step=on_step,
        )
        classifier = result.model.cpu()
        sanity = sanity + result.sanity
        hyper["finetune"] = {**result.hyperparameters, "best_epoch": result.best_epoch, "stopped": result.stopped}
        log.append(f"fine-tuning stopped: {result.stopped}; best epoch {result.best_epoch} restored")

    classifier = classifier.eval().cpu()
    for check in sanity:
        log.append(f"sanity {check['check']}: {'ok' if check['ok'] else 'FAILED'} ({check['detail']})")
    val_logits, train_accuracy = _evaluate(classifier, plan.name, probe, X_train, X_val, y_train, archive, val, prep)
    metrics = classification_metrics(val_logits, y_val, index.classes, names=[s.member for s in val])
    if train_accuracy is not None:
        metrics["train_accuracy"] = train_accuracy
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
        log=log,
    )


def _stage_taps(backbone: Backbone) -> list[str]:
    """Intermediate stages worth a probe: from a third of the way up to just below the top."""
    stages = backbone.stages
    return stages[len(stages) // 3 : -1]


def _best_stage(
    feats: dict[str, np.ndarray],
    taps: list[str],
    top: ProbeFit,
    n_train: int,
    y_train: np.ndarray,
    num_classes: int,
    seed: int,
    on_step: Callable[[dict, str], None],
) -> tuple[str, ProbeFit, list[dict]]:
    """Probe every tapped stage; keep the best by cross-validated accuracy.

    Selection uses cross-validation on the training split, like the choice of C,
    so the validation split stays an honest estimate of the chosen model. The
    top layer is the incumbent: another stage must beat it by `STAGE_MARGIN`.
    """
    fits = {TOP: top}
    table: list[dict] = []
    for stage in taps:
        fits[stage] = fit_probe(
            feats[stage][:n_train], y_train, num_classes, seed=seed, on_step=lambda r, s=stage: on_step(r, s)
        )
        table += [{"phase": "probe", "stage": stage, **r} for r in fits[stage].history]
    scores = {name: _cv_best(f) for name, f in fits.items()}
    best = max(taps, key=lambda s: scores[s], default=TOP)
    chosen = best if scores[best] >= scores[TOP] + STAGE_MARGIN else TOP
    return chosen, fits[chosen], table


def _cv_best(probe: ProbeFit) -> float:
    return max((r["cv_accuracy"] for r in probe.history if r["cv_accuracy"] == r["cv_accuracy"]), default=0.0)


def _stage_summary(table: list[dict], chosen: str) -> dict:
    stages: dict[str, float] = {}
    for r in table:
        if r["cv_accuracy"] != r["cv_accuracy"]:  # NaN: too few images per class to cross-validate
            continue
        stages[r["stage"]] = max(stages.get(r["stage"], 0.0), r["cv_accuracy"])
    return {"chosen": chosen, "cv_accuracy": {k: round(v, 4) for k, v in stages.items()}}


def _probe_sanity(probe: ProbeFit, X: np.ndarray, y: np.ndarray, num_classes: int) -> list[dict]:
    from ml.finetune import SanityReport, check_initial_loss

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


def _image_batches(archive, train, val, y_train, y_val, prep: Preprocessing, plan, config: FitConfig):
    """Train/val batch sources for fine-tuning; decoded images cached in memory when they fit."""
    similar = plan.cell.endswith("similar")
    large = plan.cell.startswith("large")
    augment, _ = train_transform(prep, similar=similar, large=large, hflip=config.hflip)
    evaluate = eval_transform(prep)
    source = _ImageSource(archive, train + val, prep)
    n = len(train)
    return (
        Batches(lambda i: augment(source.image(i)), y_train, 32),
        Batches(lambda i: evaluate(source.image(n + i)), y_val, 64),
    )


class _ImageSource:
    """Decoded, size-reduced RGB images by position; kept in memory when they fit."""

    def __init__(self, archive: Path, samples: list[Sample], prep: Preprocessing) -> None:
        self.images = ZipImages(archive, lambda img: img, min_side=prep.resize_size)
        self.members = [s.member for s in samples]
        self.min_side = prep.resize_size
        side = max(prep.resize_size, prep.input_size)
        est = sum(min(s.width * s.height, side * side * 2) for s in samples)
        self.cache: dict[int, object] | None = {} if est <= MAX_CACHED_PIXELS else None

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


def _evaluate(classifier, strategy, probe, X_train, X_val, y_train, archive, val, prep):
    """Validation logits of the final model (and train accuracy where it is cheap)."""
    if strategy in ("partial", "full"):
        images = ZipImages(archive, eval_transform(prep), min_side=prep.resize_size)
        batches = iter_batches(images.load, [s.member for s in val], 64)
        with torch.no_grad():
            logits = [classifier(x.contiguous(memory_format=torch.channels_last)) for x in batches]
        return torch.cat(logits), None
    with torch.no_grad():
        val_logits = probe.linear(torch.from_numpy(X_val))
        train_logits = probe.linear(torch.from_numpy(X_train))
    return val_logits, float((train_logits.argmax(1).numpy() == y_train).mean())


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
        frac = before + PHASE_WEIGHTS[phase] * (min(done, total) / total if total else 1.0)
        progress(Progress(phase, done, total, round(min(frac, 1.0), 4), row))

    return report


__all__ = ["FitConfig", "FitResult", "Progress", "fit"]
