"""The whole pipeline: archive in, bundle and a result out.

    load and split -> measure (one frozen pass at the backbone's native input, plus one at a
    size that follows small images; BatchNorm statistics -> similarity -> the matrix's prior)
    -> choose the probe (input size x stage, by cross-validation on train) -> fine-tune where
    the matrix allows it and a pilot says it pays (flips and augmentation strength measured
    first) -> evaluate on the validation split -> export (TorchScript + ONNX)

Every choice is a `Decision` with its candidates and their scores, all measured on the
training split; the validation split is only reported. `progress` receives `Progress`
events; raising `ml.errors.Cancelled` from it stops the fit cleanly.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.augment import train_transform
from ml.backbones import Backbone, Preprocessing, create_backbone, get_spec
from ml.bundle import write_bundle
from ml.checkpoint import Checkpoints
from ml.config import MAX_BUDGET as MAX_BUDGET
from ml.config import MAX_EPOCHS as MAX_EPOCHS
from ml.config import MAX_SEARCH as MAX_SEARCH
from ml.config import MAX_SEED as MAX_SEED
from ml.config import FitConfig as FitConfig
from ml.dataset import DatasetIndex, IngestConfig, Sample, index_dataset
from ml.decisions import HeldOut, augmentation_decision, flip_decision, tta_decision
from ml.evaluate import classification_metrics
from ml.features import TOP, EmbeddingCache, ImageSource, Pass
from ml.finetune import (
    Batches,
    CheckpointFn,
    FinetuneConfig,
    FinetuneResult,
    Hooks,
    RangeSpan,
    SanityReport,
    Start,
    check_initial_loss,
    finetune,
    lr_range_test,
    predict_logits,
    probe_model,
)
from ml.measure import (
    Representation,
    candidate_sizes,
    frozen_views,
    held,
    split_for_fit,
    stage_taps,
)
from ml.preprocess import eval_transform
from ml.probe import DEFAULT_CS, ProbeFit, fit_probe, fit_probe_at
from ml.report import (
    Augmentation,
    AugmentLevel,
    Crop,
    EpochRow,
    FinetuneSettings,
    FitResult,
    HistoryRow,
    Hyperparameters,
    InputSize,
    Metrics,
    ProbeRow,
    ProbeSettings,
    RangeTest,
    SanityCheck,
)
from ml.run import FEATURES, STORED, Progress, ProgressFn, Run, about, timer
from ml.runtime import tune_allocator
from ml.search import search
from ml.selection import Candidate, Decision, best_by_paired_loss, keep_if_better, significance_margin
from ml.splits import stratified_draw
from ml.strategy import REGISTRY as PLAN_REGISTRY
from ml.strategy import Plan, decide, finetune_depth

# Another input size or stage replaces the plain top-layer probe at the native input only when its
# out-of-fold log loss is lower, on the same images, by more than this many paired standard errors.
PROBE_Z = 2.0
PILOT_IMAGES = 1500  # candidate probes are ranked on at most this many training images (3-fold CV)
HOLDOUT_FRACTION = 0.1  # of train, held out for the fine-tune's selection and the invariance tests
MIN_HOLDOUT = 50  # held-out images at least (where train has 200+)
LR_MULTIPLIERS = (1.0, 0.25)  # fine-tune learning rates tried, on the measured start, until a pilot pays
LR_TEST_FROM, LR_TEST_STEPS = 0.1, 20  # the automatic range test: from 0.1x the rule, growing 1.41x a step
# Fine-tuning batch per device: small on the CPU (steps are slow, more of them converge sooner),
# large enough to keep a GPU busy; the learning rate follows the batch (ml.finetune.backbone_lr).
TRAIN_BATCH = {"cpu": 32, "cuda": 128}
INVARIANCE_SAMPLE = 256  # held-out images the flip and augmentation tests read


@dataclass
class _Report:
    """What `train` reports as it goes: the history rows, the sanity checks, how each part was trained."""

    history: list[HistoryRow]
    sanity: list[SanityCheck]
    probe: ProbeSettings
    augmentation: Augmentation | None = None  # the fine-tune's, while it is a candidate or kept
    finetune: FinetuneSettings | None = None
    lr_range: RangeTest | None = None
    input: InputSize | None = None  # the kept model's input size

    @property
    def hyperparameters(self) -> Hyperparameters:
        return Hyperparameters(self.probe, self.input, self.augmentation, self.finetune)


@dataclass(frozen=True)
class Data:
    archive: Path
    classes: list[str]
    train: list[Sample]  # in a seeded random order
    val: list[Sample]
    y_train: np.ndarray
    y_val: np.ndarray
    content_hash: str


@dataclass(frozen=True)
class ChosenProbe:
    rep: Representation
    stage: str
    probe: ProbeFit  # fitted on the whole training split
    n_train: int
    # Every candidate (input size, stage) and its pilot score: the fine-tune may start from another.
    ranking: dict[str, tuple[Representation, str, Candidate]] = field(default_factory=dict)
    rows: list[ProbeRow] = field(default_factory=list)  # every candidate's cross-validation, in the history

    @property
    def X_train(self) -> np.ndarray:
        return self.rep.feats[self.stage][: self.n_train]

    @property
    def X_val(self) -> np.ndarray:
        return self.rep.feats[self.stage][self.n_train :]


@dataclass(frozen=True)
class Known:
    """What the caller already holds about a dataset, each optional: what it is to the caller (`about`:
    a dataset's name and version, which the model card records), its `index` (as ml.dataset.index_dataset
    makes it: the fit does not read the archive again to make its own), and a `store` of frozen features
    by image content (ml.measure: those it holds are read, not extracted again; those extracted are kept
    there)."""

    about: dict[str, Any] = field(default_factory=dict)
    index: DatasetIndex | None = None
    store: EmbeddingCache | None = None


def fit(
    archive: Path | str,
    out_dir: Path | str,
    config: FitConfig | None = None,
    *,
    known: Known = Known(),
    progress: ProgressFn | None = None,
    checkpoints: Checkpoints | None = None,
) -> FitResult:
    """Train a classifier on `archive` into `out_dir` (the bundle, and bundle.zip). `progress` receives
    `Progress` events; raising ml.errors.Cancelled from it stops the fit. `checkpoints` (ml.checkpoint):
    the fine-tune saves its state there after each epoch, and a fit that finds a state of the same
    inputs there goes on from it."""
    archive, out_dir = Path(archive), Path(out_dir)
    config = config or FitConfig()
    config.validate()
    tune_allocator()
    _seed_everything(config.seed)
    run = Run(progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run.phase("decode"):
        data = _load(run, archive, known.index, config)
    _plan_fit(run, len(data.train), len(data.val), config)
    run.resume_from(checkpoints, _fit_key(config, data))
    with run.phase("features"):
        device = _device(config.device)
        backbone = create_backbone(config.backbone)
        run.advance("load", 1)
        reps, plan = measure(run, backbone, data, config, device, known.store)
    with run.phase("fit"):
        chosen = choose_probe(run, reps, data, plan, config)
        model, prep, val_logits, report = train(run, backbone, chosen, data, plan, config, device)
        metrics = classification_metrics(val_logits, data.y_val, data.classes, names=[s.member for s in data.val])
        metrics = replace(metrics, num_train=len(data.train))
    for check in report.sanity:
        run.say(f"sanity {check.check}: {'ok' if check.ok else 'FAILED'} ({check.detail})")
    report.input = InputSize(prep.input_size)
    with run.phase("export"):
        card = _card(backbone, plan, report, data, run.decisions, config, known.about)
        bundle_zip = _export(out_dir, model, prep, data.classes, metrics, card, run)
        run.advance("export", 1)
    run.timings["total"] = sum(run.timings.values())
    return FitResult(
        classes=data.classes,
        strategy=plan,
        metrics=metrics,
        timings={k: round(v, 3) for k, v in run.timings.items()},
        artifacts={"bundle": str(bundle_zip), "bundle_dir": str(out_dir / "bundle")},
        preprocessing=prep,
        device=str(device),
        history=report.history,
        sanity=report.sanity,
        hyperparameters=report.hyperparameters,
        lr_range=report.lr_range,
        log=run.log,
        decisions=list(run.decisions),
        peak_rss_mib=run.peak_rss_mib,
    )


# --- load -------------------------------------------------------------------------------------


def _load(run: Run, archive: Path, index: DatasetIndex | None, config: FitConfig) -> Data:
    if index is None:

        def decoded(done: int, total: int) -> None:
            if "decode" not in run.work.steps:  # the fit's plan, from the upload's size (refined once split)
                run.plan("decode", "Reading images", total, passes=DECODE_PASSES)
                n_val = round(total * config.val_fraction)
                _plan_fit(run, total - n_val, n_val, config)
            run.advance("decode", done, label=f"Reading images · {done} of {total}")

        index = index_dataset(archive, IngestConfig(), decoded)
        run.finish("decode")
    train, val = split_for_fit(index, config.val_fraction, config.seed)
    class_id = {c: i for i, c in enumerate(index.classes)}
    run.say(f"{len(train)} training and {len(val)} validation images in {len(index.classes)} classes")
    return Data(
        archive=archive,
        classes=index.classes,
        train=train,
        val=val,
        y_train=np.array([class_id[s.label] for s in train]),
        y_val=np.array([class_id[s.label] for s in val]),
        content_hash=index.content_hash,
    )


# --- measure ----------------------------------------------------------------------------------


def measure(
    run: Run,
    backbone: Backbone,
    data: Data,
    config: FitConfig,
    device: torch.device,
    store: EmbeddingCache | None = None,
) -> tuple[list[Representation], Plan]:
    """Frozen features at each candidate input size, the similarity, and the matrix's plan.

    The native input is always a candidate (and where similarity is measured, as calibrated);
    images smaller than it add a candidate size that follows them (at most 2x upscaled).
    Stage taps come along in the same passes: they cost little, and the probe choice reads them.
    Features `store` holds (the finders measured them when the version was made) are read, not extracted.
    """
    native = backbone.spec.preprocessing
    sizes, why = candidate_sizes(native, data.train, config.resolution)
    if len(sizes) > 1:
        run.say(f"input size candidates: {sizes[0].input_size} px ({why}) and the native {native.input_size} px")
    n = len(data.train) + len(data.val)
    taps = stage_taps(backbone)
    stored = {
        prep: held(store, backbone.spec.name, prep, taps, data.train, data.val, native=prep == native) for prep in sizes
    }
    for prep in sizes:  # all planned before the first pass, so the ETA counts them all
        if stored[prep]:
            run.plan(
                _features_key(prep), f"Reading the stored features at {prep.input_size} px", n, passes=0.0, kind=STORED
            )
        elif prep != native:
            run.plan(
                _features_key(prep), _features_label(prep), n, passes=_passes(prep, native), kind=FEATURES,
                note=f"features are extracted at a second input size too, {prep.input_size} px: {why}",
            )  # fmt: skip
    reps: list[Representation] = []
    similarity = None
    for prep in sizes:
        key = _features_key(prep)

        def tick(done: int, total: int, key: str = key, prep: Preprocessing = prep) -> None:
            label = "Reading the stored features" if stored[prep] else _features_label(prep)
            run.advance(key, done, label=f"{label} · {done} of {total} images")

        how = Pass(device, config.batch_size, tick)
        feats, measured = frozen_views(
            backbone, data.archive, (data.train, data.val), prep, taps=taps, how=how, store=store
        )
        if stored[prep]:
            run.say(
                f"features at {prep.input_size} px: read from the store (measured when the dataset version was made)"
            )
        similarity = measured or similarity
        reps.append(Representation(prep, feats))
    assert similarity is not None  # the native input is always among the sizes
    plan = decide(
        len(data.train) / len(data.classes), similarity, override=config.strategy, boundary=config.size_boundary
    )
    run.say(plan.reason)
    _plan_after_measuring(run, reps, data, plan, config, native)
    return reps, plan


def choose_probe(run: Run, reps: list[Representation], data: Data, plan: Plan, config: FitConfig) -> ChosenProbe:
    """The probe on the input size and stage that cross-validate best on the training split.

    Candidates: the top layer at every candidate size, and for data unlike ImageNet (or when
    asked) the intermediate stages too. The plain top-layer probe at the native input is the
    incumbent; the candidate with the lowest out-of-fold log loss replaces it only when its loss is
    lower image by image by more than PROBE_Z paired standard errors (every candidate is
    cross-validated on the same images and folds), and then the smallest input size the measurement
    cannot tell from the best is kept (`best_by_paired_loss`). With many images, candidates are ranked on a
    stratified subsample with 3-fold CV (a pilot), and only the winner gets the full 5-fold search for C.
    """
    n, k = len(data.train), len(data.classes)
    stages = [TOP]
    if PLAN_REGISTRY[plan.name].stage_probes:
        stages += [s for s in reps[-1].feats if s != TOP]
    options = {_name(stage, rep): (rep, stage) for rep in reps for stage in stages}
    incumbent = _name(TOP, reps[-1])  # the native size is always last
    history: list[ProbeRow] = []
    probes = _ProbeProgress(run, data, options)
    if len(options) > 1:
        idx = _subsample(data.y_train, PILOT_IMAGES, config.seed)
        pilot = len(idx) < n
        candidates: list[Candidate] = []
        losses: dict[str, np.ndarray | None] = {}  # each image's out-of-fold log loss: the same images and folds
        for i, (name, (rep, stage)) in enumerate(options.items()):
            with timer() as t:
                fitted = fit_probe(
                    rep.feats[stage][idx], data.y_train[idx], k, folds=3 if pilot else 5, seed=config.seed,
                    on_fit=probes.candidate(i, name, len(idx)),
                )  # fmt: skip
            loss = None if fitted.oof_loss is None else round(float(fitted.oof_loss.mean()), 4)
            candidates.append(Candidate(name, _cv_best(fitted), t.seconds, {"C": fitted.C, "cv_loss": loss}))
            losses[name] = fitted.oof_loss
            history += _report_rows(run, fitted, name)
        cost = {name: float(rep.prep.input_size**2) for name, (rep, _) in options.items()}  # a pass's compute
        chosen_name, zs = best_by_paired_loss(losses, incumbent=incumbent, z=PROBE_Z, cost=cost)
        candidates = [
            replace(c, detail={**c.detail, "z": round(min(max(zs[c.name], -99.0), 99.0), 2)}) if c.name in zs else c
            for c in candidates
        ]
        run.decide(
            Decision(
                "representation",
                chosen_name,
                tuple(candidates),
                "the plain top-layer probe at the native input stays unless the candidate with the lowest "
                f"out-of-fold log loss beats it image by image, by more than {PROBE_Z:g} standard errors of the "
                f"difference (z below -{PROBE_Z:g}); then the smallest input that also beats it and is not "
                "that much worse than the best is kept",
                metric=f"{'3' if pilot else '5'}-fold CV accuracy on {len(idx)} training images; log loss decides",
            )
        )
    else:
        chosen_name = incumbent
        candidates = [Candidate(incumbent, None)]
    rep, stage = options[chosen_name]
    probe = fit_probe(rep.feats[stage][:n], data.y_train, k, seed=config.seed, on_fit=probes.final(chosen_name, n))
    run.advance("probe", math.inf)  # the refit at the chosen C: the search's last work
    history += _report_rows(run, probe, chosen_name)
    run.finish("probe")
    run.say(f"probe: {chosen_name}, C={probe.C:g}")
    ranking = {c.name: (*options[c.name], c) for c in candidates}
    return ChosenProbe(rep, stage, probe, n, ranking, history)


def _report_rows(run: Run, probe: ProbeFit, name: str) -> list[ProbeRow]:
    """A probe's C path as history rows, each sent with the progress (the job page plots them live)."""
    rows = [ProbeRow(name, r["step"], r["C"], r["cv_accuracy"], r["cv_loss"]) for r in probe.history]
    for row in rows:
        run.advance("probe", run.work.steps["probe"].done, row=row.to_json())
    return rows


def _name(stage: str, rep: Representation) -> str:
    return f"{stage} @ {rep.prep.input_size} px"


def _subsample(y: np.ndarray, cap: int, seed: int) -> np.ndarray:
    """Positions of a stratified random subsample of at most about `cap` items (all of them when fewer)."""
    if len(y) <= cap:
        return np.arange(len(y))
    return stratified_draw(y, cap / len(y), seed, keep_one=False)


def _cv_best(probe: ProbeFit) -> float | None:
    """Best cross-validated accuracy over the C path; None when every fold was NaN (too few images)."""
    return max((r["cv_accuracy"] for r in probe.history if r["cv_accuracy"] == r["cv_accuracy"]), default=None)


# --- train: the probe, or a fine-tune that earns its time ------------------------------------------


def train(
    run: Run, backbone: Backbone, chosen: ChosenProbe, data: Data, plan: Plan, config: FitConfig, device: torch.device
) -> tuple[nn.Module, Preprocessing, torch.Tensor, _Report]:
    """(model, its preprocessing, validation logits, report): the chosen probe, or a fine-tune that beats it
    on a held-out slice of the training split."""
    report = _Report(
        history=list(chosen.rows),
        sanity=_probe_sanity(chosen.probe, chosen.X_train, data.y_train, len(data.classes)),
        probe=ProbeSettings(chosen.stage, chosen.probe.C, "balanced"),
    )
    probe_net = probe_model(backbone, chosen.probe.linear, chosen.stage).eval()
    with torch.no_grad():
        probe_logits = chosen.probe.linear(torch.from_numpy(chosen.X_val))
    depth = finetune_depth(plan, config.strategy)
    if depth is None:
        if run.replaying:
            run.end_replay()
            run.discard_checkpoint(everything=False)
        if config.lr_find or config.search:
            run.say(f"no LR range test or search: the '{plan.name}' plan fits a probe, with no learning rate to choose")
        return probe_net, chosen.rep.prep, probe_logits, report

    setup = _finetune_setup(run, backbone, chosen, data, depth, config, device)
    report.augmentation = setup.augmentation
    result = _Tries(run, backbone, setup, config, device, report).best()
    explicit = config.strategy != "auto"  # the user's choice is what is trained and served
    if not _keep_finetune(run, chosen, setup, result, depth, explicit):  # the chosen probe, fitted on all of train
        report.augmentation = None
        run.finish("evaluate")  # the probe's validation scores come from its cached features
        return probe_net, chosen.rep.prep, probe_logits, report
    model = tta_decision(run, result.model, setup.hold, device) if setup.flip else result.model
    _scoring(
        run, len(setup.hold_idx) * (3 if setup.flip else 0), len(data.val) * (2 if model is not result.model else 1)
    )
    val = Batches(lambda i: setup.clean(setup.source.image(len(data.train) + i)), data.y_val, 64, setup.norm)
    val_logits, _ = predict_logits(model, val, device)
    run.advance("evaluate", math.inf)
    return model, setup.rep.prep, val_logits, report


@dataclass
class _FinetuneSetup:
    rep: Representation  # the fine-tune's input size and starting features
    stage: str
    head: nn.Linear  # the probe it starts from, fitted without the held-out slice
    fit_idx: np.ndarray  # the training images it trains on (positions in train)
    y_fit: np.ndarray
    hold_idx: np.ndarray  # and the held-out slice it is scored on
    probe_hold: float  # the chosen probe's accuracy on the held-out slice (refitted without it)
    source: ImageSource
    clean: Callable[[Image.Image], torch.Tensor]  # the eval transform, to uint8
    norm: tuple[Sequence[float], Sequence[float]]  # (mean, std) applied on the device
    hold: Batches
    flip: bool
    augments: dict[
        str, tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]
    ]  # "first", "after": (transform, about)
    config: FinetuneConfig

    @property
    def augmentation(self) -> Augmentation:
        first, after = (self.augments[part][1] for part in ("first", "after"))
        return Augmentation(_augment_level(first), _augment_level(after))

    def batches_for(self, epoch: int) -> Batches:
        """Epoch `epoch`'s training batches: light augmentation on the first pass (no shock), then the measured."""
        augment = self.augments["first" if epoch == 1 else "after"][0]
        fit_idx, source = self.fit_idx, self.source
        return Batches(lambda i: augment(source.image(fit_idx[i])), self.y_fit, self.config.batch_size, self.norm)


def _augment_level(about: dict[str, Any]) -> AugmentLevel:
    """ml.augment's description of a level, typed."""
    return AugmentLevel(**{**about, "random_resized_crop": Crop(**about["random_resized_crop"])})


def _finetune_setup(
    run: Run, backbone: Backbone, chosen: ChosenProbe, data: Data, depth: str, config: FitConfig, device: torch.device
) -> _FinetuneSetup:
    """The fine-tune candidate: its held-out slice, starting probe, invariances and training batches.

    It starts from the best probe at the cheapest input size (fine-tuning adapts the filters to
    the scale, and compute grows with its square), refitted without the held-out images; the
    chosen probe is scored on the same slice.
    """
    k = len(data.classes)
    fit_idx, hold_idx = _holdout(data.y_train, config.seed)
    checks = _Checks(run, min(INVARIANCE_SAMPLE, len(hold_idx)))
    y_fit, y_hold = data.y_train[fit_idx], data.y_train[hold_idx]
    probe_hold = _holdout_accuracy(chosen.X_train, data.y_train, fit_idx, hold_idx, k, chosen.probe.C, config.seed)
    rep, stage, C = _finetune_start(chosen)
    head = fit_probe_at(rep.feats[stage][fit_idx], y_fit, k, C=C, seed=config.seed)
    run.decide(_start_decision(chosen, rep, stage))
    checks.done("refit")
    source = ImageSource(data.archive, data.train + data.val, rep.prep)
    norm = (rep.prep.mean, rep.prep.std)  # the batches stay uint8 until they reach the device
    clean = eval_transform(rep.prep, uint8=True)
    hold = Batches(lambda i: clean(source.image(hold_idx[i])), y_hold, 64, norm)

    # torch's stubs lack the (device, memory_format) form of Module.to, which it accepts.
    start = probe_model(backbone, head, stage).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    sample = hold_idx[:INVARIANCE_SAMPLE]

    held = HeldOut(lambda i: source.image(sample[i]), data.y_train[sample])
    flip = config.hflip and flip_decision(run, start, held, eval_transform(rep.prep), checks.within("flip"))
    if not config.hflip:
        run.say("horizontal flips: off (asked for)")
    checks.done("flip")
    level = augmentation_decision(
        run, start, held, rep.prep, flip, seed=config.seed, on_step=checks.within("augmentation")
    )
    checks.done("augmentation")
    augments = {lv: train_transform(rep.prep, lv, hflip=flip, uint8=True) for lv in {"light", level}}
    ft_config = FinetuneConfig(
        depth=depth, max_epochs=config.max_epochs, patience=config.patience, budget=config.budget,
        batch_size=TRAIN_BATCH.get(device.type, TRAIN_BATCH["cpu"]), seed=config.seed,
    )  # fmt: skip
    return _FinetuneSetup(
        rep, stage, head, fit_idx, y_fit, hold_idx, probe_hold, source, clean, norm, hold, flip,
        {"first": augments["light"], "after": augments[level]}, ft_config,
    )  # fmt: skip


class _Tries:
    """The fine-tune's tries from one setup, and the one kept: the recipe's learning rate capped by a
    range test, then a quarter of it while the pilot cannot beat the probe (dissimilar data often
    wants a gentler start); or, with `config.search`, a random search over learning rate and weight
    decay. Each try's epochs go into the report, the log and the progress; each epoch of the ladder
    is checkpointed, and a resumed fit goes on from the try it was in."""

    def __init__(
        self,
        run: Run,
        backbone: Backbone,
        setup: _FinetuneSetup,
        config: FitConfig,
        device: torch.device,
        report: _Report,
    ) -> None:
        self.run, self.backbone, self.setup, self.config, self.device, self.report = (
            run, backbone, setup, config, device, report,
        )  # fmt: skip

    def best(self) -> FinetuneResult:
        if self.config.search:
            result, seconds = self._search()
        else:
            saved = self._saved()
            start, rt = (saved["start"], RangeTest.from_json(saved["rt"])) if saved else self._lr_cap()
            self.run.finish("lr_test")
            self.report.lr_range = rt
            result, seconds = self._ladder(start, rt, saved)
            seconds += rt.seconds
        self.report.sanity += result.sanity
        self.report.finetune = replace(
            result.hyperparameters,
            start=_name(self.setup.stage, self.setup.rep),
            input_size=self.setup.rep.prep.input_size,
            best_epoch=result.best_epoch,
            stopped=result.stopped,
            seconds_all_tries=round(seconds, 2),
        )
        for decision in result.decisions:
            self.run.decide(decision)
        self.run.say(f"fine-tuning stopped: {result.stopped}; best epoch {result.best_epoch} restored")
        return result

    def one(
        self,
        cfg: FinetuneConfig,
        *,
        trial: int | None = None,
        checkpoint: CheckpointFn | None = None,
        resume: dict[str, Any] | None = None,
        why: str | None = None,
    ) -> FinetuneResult:
        """One fine-tune from the probe, on copies (the chosen probe shares the pretrained body and the
        head may be tried again), with its epochs in the history and the log (a search `trial`'s tagged);
        `checkpoint` and `resume` as in ml.finetune.finetune. `why` says why this try was not in the plan."""
        run, setup, history = self.run, self.setup, self.report.history
        tag: dict[str, Any] = {"lr_multiplier": cfg.lr_multiplier}
        if trial:
            tag |= {"phase": "search", "trial": trial, "weight_decay": cfg.weight_decay}
        if resume is not None:  # the epochs the earlier attempt trained, in this fit's history too
            history += [replace(EpochRow.from_json(row), **tag) for row in resume["history"]]
            run.say(f"fine-tune at {cfg.lr_multiplier:.2g}x resumed after epoch {resume['epoch']}")
        tracker = _TryProgress(run, setup, cfg, trial, self.config.search, resume, why)

        def on_epoch(row: EpochRow) -> None:
            tagged = replace(row, **tag)
            history.append(tagged)
            tracker.epoch(tagged)
            run.say(
                f"epoch {row.epoch}: held-out accuracy {row.heldout_accuracy:.4f}, loss {row.heldout_loss:.4f}"
                + (f", train loss {row.train_loss:.4f}" if row.train_loss is not None else " (the probe)")
            )

        start = Start(copy.deepcopy(self.backbone), copy.deepcopy(setup.head), setup.stage)
        hooks = Hooks(on_epoch, tracker.step, tracker.check, checkpoint)
        result = finetune(start, setup.batches_for, setup.hold, cfg, device=self.device, hooks=hooks, resume=resume)
        tracker.end()
        return result

    def _search(self) -> tuple[FinetuneResult, float]:
        run, config = self.run, self.config
        if run.replaying:
            run.say("search trials are not checkpointed: the search starts over")
            run.end_replay()
            run.discard_checkpoint(everything=False)

        def trial(cfg: FinetuneConfig, number: int) -> FinetuneResult:
            return self.one(cfg, trial=number)

        n_hold = len(self.setup.hold_idx)
        cfg, searched = search(run, config.search, self.setup.config, trial, n_hold, config.budget, config.seed)
        if config.budget is not None:  # the full run gets what the trials left of the budget
            cfg = replace(cfg, budget=max(1.0, config.budget - searched))
        _plan_full_run(run, self.setup, cfg)
        result = self.one(cfg)
        return result, searched + result.hyperparameters.train_seconds

    def _lr_cap(self) -> tuple[float, RangeTest]:
        """(start, the range test): the learning rate the fine-tune starts at, as a multiple of the recipe's
        rule: the rule, unless a range test (the fine-tune's own setup, on copies, the LR growing each
        step) sees the loss blow up within 10x of it; then a tenth of where it blew up. With frozen
        BatchNorm nothing renormalises an update that is too large, and how large is too large depends
        on the data and the input size (brain MRI, the whole network at 240 px: the loss blew up at
        0.6x the rule within a few steps, and a fine-tune at the rule collapsed to chance in its second
        epoch; traffic signs at 64 px: 3.8x, so a 0.38x start)."""
        run, setup = self.run, self.setup
        wide = self.config.lr_find  # asked for: the whole curve, from 1/1000 of the rule
        span = RangeSpan(factor_min=1e-3, steps=40) if wide else RangeSpan(factor_min=LR_TEST_FROM, steps=LR_TEST_STEPS)
        batch = setup.config.batch_size

        def tested(done: int, steps: int) -> None:
            run.advance(
                "lr_test", done * batch * TRAIN_PASSES, label=f"Finding the learning rate · step {done} of {steps}"
            )

        start = Start(self.backbone, setup.head, setup.stage)
        rt = lr_range_test(start, setup.batches_for(2), setup.config, self.device, span, on_step=tested)
        blown = rt.diverged_lr
        multiplier = 1.0 if blown is None else min(1.0, blown / 10 / rt.recipe_lr)
        run.say(
            f"LR range test ({len(rt.curve)} steps, {rt.seconds:.0f} s): "
            + (f"the loss blew up at {blown:.2e}" if blown else "the loss never blew up")
            + f"; the recipe's rule gives {rt.recipe_lr:.2e}, so the fine-tune starts at {multiplier:.2g}x it"
        )
        return multiplier, rt

    def _ladder(self, start: float, rt: RangeTest, saved: dict[str, Any] | None) -> tuple[FinetuneResult, float]:
        """(best fine-tune, seconds of all of them): from `start` x the recipe's rate, then lower while the
        pilot fails. Each epoch checkpoints the ladder (its start, range test and finished tries) with the
        fine-tune's state; from `saved`, the finished tries are not run again and the one it was in goes on.
        """
        done: list[dict[str, Any]] = []  # finished tries: multiplier, score, seconds, history rows
        results: list[tuple[float, FinetuneResult]] = []
        history = self.report.history
        for i, step in enumerate(LR_MULTIPLIERS):
            multiplier = start * step
            if saved is not None and i < saved["try"]:  # finished before the checkpoint: a pilot that failed
                done.append(saved["done"][i])
                history += [EpochRow.from_json(row) for row in saved["done"][i]["rows"]]
                continue
            resume = saved["state"] if saved is not None and i == saved["try"] else None
            retry = None
            if done and resume is None:
                self.run.say(f"retrying the fine-tune at {multiplier:.2g}x the recipe's learning rate")
                retry = (
                    f"the fine-tune at {done[-1]['multiplier']:.2g}x the recipe's learning rate did not beat the "
                    f"probe in its pilot, so it is tried again at {multiplier:.2g}x"
                )
            ladder = {"start": start, "rt": rt.to_json(), "try": i, "done": list(done)}
            rows_before = len(history)
            cfg = replace(self.setup.config, lr_multiplier=multiplier)
            result = self.one(cfg, checkpoint=self._saver(ladder), resume=resume, why=retry)
            results.append((multiplier, result))
            seconds = result.hyperparameters.train_seconds
            done.append(
                {"multiplier": multiplier, "score": _best_score(result)[0], "seconds": seconds,
                 "rows": [row.to_json() for row in history[rows_before:]]}
            )  # fmt: skip
            if result.best_epoch > 0:
                break
        multiplier, result = max(results, key=lambda t: _best_score(t[1]))
        self.run.decide(_lr_decision(multiplier, rt, done, len(self.setup.hold_idx)))
        return result, sum(d["seconds"] for d in done)

    # --- the checkpoint: the ladder's state with the fine-tune's, for this very fine-tune ---------------

    def _fingerprint(self) -> dict[str, Any]:
        """What a checkpoint's fine-tune was measured to be; a resumed fit must measure the same."""
        setup = self.setup
        return {
            "start": _name(setup.stage, setup.rep),
            "depth": setup.config.depth,
            "batch_size": setup.config.batch_size,
            "flip": setup.flip,
            "augmentation": setup.augmentation.to_json(),
            "held_out": len(setup.hold_idx),
        }

    def _saver(self, ladder: dict[str, Any]) -> CheckpointFn:
        def save(state: dict[str, Any]) -> None:
            self.run.checkpoint({"setup": self._fingerprint(), "ladder": ladder, "state": state})

        return save

    def _saved(self) -> dict[str, Any] | None:
        """The resumed checkpoint's ladder and fine-tune state, when it is of this very fine-tune."""
        run = self.run
        saved = run.resumed
        run.end_replay()
        if saved is None:
            return None
        if saved["setup"] != self._fingerprint():
            run.say("the checkpoint's fine-tune differs from the one measured now: fine-tuning starts over")
            run.discard_checkpoint(everything=False)
            return None
        run.say(f"LR range test and {saved['ladder']['try']} finished tries taken from the checkpoint")
        return {**saved["ladder"], "state": saved["state"]}


def _lr_decision(multiplier: float, rt: RangeTest, done: list[dict[str, Any]], n_hold: int) -> Decision:
    blown = rt.diverged_lr
    return Decision(
        "learning_rate",
        f"{multiplier:.2g}x",
        (
            Candidate("range test", None, rt.seconds, {"blew_up_at": blown}),
            *(Candidate(f"{d['multiplier']:.2g}x", d["score"], d["seconds"]) for d in done),
        ),
        "the recipe's rule (1/10 of the original, batch-scaled), capped at a tenth of where a range test's "
        f"loss blew up ({'at ' + format(blown, '.2e') if blown else 'it never did'}); a quarter of that "
        "when the pilot cannot beat the probe",
        metric=f"best accuracy on {n_hold} held-out training images",
    )


def _keep_finetune(
    run: Run, chosen: ChosenProbe, setup: _FinetuneSetup, result: FinetuneResult, depth: str, explicit: bool = False
) -> bool:
    """Whether the fine-tune beats the chosen probe on the held-out slice by more than twice the
    standard error of the probe's score there: its best epoch is the best of many tries on the
    same few images, and a smaller lead is what luck alone gives it. A fine-tune the user asked for
    (`explicit`) is kept whatever the scores: they are reported beside it as advice."""
    tuned = result.best_epoch > 0
    tuned_acc = result.history[result.best_epoch].heldout_accuracy if tuned else None
    margin = significance_margin(setup.probe_hold, len(setup.hold_idx))
    better = tuned_acc is not None and keep_if_better(setup.probe_hold, tuned_acc, margin=margin)
    keep = better or explicit
    if explicit:
        best = result.history[result.best_epoch] if result.history and result.best_epoch >= 0 else None
        tuned_score = f"{best.heldout_accuracy:.1%}" if best is not None else "not measured"
        advice = (
            f"; you chose the {depth} fine-tune, so it is what is trained and served: on these images the probe "
            f"scored {setup.probe_hold:.1%} and this fine-tune {tuned_score}"
            + ("" if better else " (on one click, auto would have kept the probe)")
        )
        run.say(f"advice: {advice[2:]}")
    run.decide(
        Decision(
            "finetune",
            f"{depth} fine-tune" if keep else "probe",
            (
                Candidate("probe", setup.probe_hold, 0.0, {"model": _name(chosen.stage, chosen.rep)}),
                Candidate(
                    f"{depth} fine-tune",
                    tuned_acc,
                    result.hyperparameters.train_seconds,
                    {"model": _name(setup.stage, setup.rep), "best_epoch": result.best_epoch},
                ),
            ),  # fmt: skip
            result.stopped
            + (
                advice
                if explicit
                else ""
                if keep or not tuned
                else f"; its best epoch did not beat the chosen probe by more than {margin:.1%} "
                "(twice the standard error on these images), so the probe is kept"
            ),
            metric=f"accuracy on {len(setup.hold_idx)} held-out training images",
        )
    )
    return keep


def _best_score(result: FinetuneResult) -> tuple[float, float]:
    """(held-out accuracy, -loss) of a fine-tune's best epoch."""
    row = result.history[result.best_epoch]
    return row.heldout_accuracy, -row.heldout_loss


def _finetune_start(chosen: ChosenProbe) -> tuple[Representation, str, float]:
    """(features, stage, C) of the best-ranked probe at the smallest candidate input size: the lowest out-of-fold
    log loss, as the representation is ranked (CV accuracy where no loss was measured)."""
    smallest = min(rep.prep.input_size for rep, _, _ in chosen.ranking.values()) if chosen.ranking else None
    if smallest is None or smallest == chosen.rep.prep.input_size:
        return chosen.rep, chosen.stage, chosen.probe.C
    here = [(rep, stage, c) for rep, stage, c in chosen.ranking.values() if rep.prep.input_size == smallest]
    rep, stage, c = min(here, key=lambda o: _rank(o[2]))
    return rep, stage, c.detail.get("C", chosen.probe.C)


def _rank(c: Candidate) -> tuple[float, float]:
    """A probe candidate's rank, best first: its out-of-fold log loss, then its CV accuracy."""
    loss = c.detail.get("cv_loss")
    return (math.inf if loss is None else float(loss), -(c.score if c.score is not None else -1.0))


def _start_decision(chosen: ChosenProbe, rep: Representation, stage: str) -> Decision:
    """Which probe the fine-tune candidate starts from, among those at its input size."""
    size = rep.prep.input_size
    here = tuple(c for r, _, c in chosen.ranking.values() if r.prep.input_size == size)
    return Decision(
        "finetune_start",
        _name(stage, rep),
        here or (Candidate(_name(stage, rep), None),),
        f"the best-ranked probe at the smallest candidate input size ({size} px): fine-tuning adapts the "
        "filters to the scale, and its compute grows with the square of the size",
        metric="the probes' cross-validated accuracy on training images; their out-of-fold log loss ranks them",
    )


def _holdout_accuracy(
    X: np.ndarray, y: np.ndarray, fit_idx: np.ndarray, hold_idx: np.ndarray, num_classes: int, C: float, seed: int
) -> float:
    """Accuracy on the held-out slice of a probe refitted without it (features already cached)."""
    linear = fit_probe_at(X[fit_idx], y[fit_idx], num_classes, C=C, seed=seed)
    with torch.no_grad():
        pred = linear(torch.from_numpy(X[hold_idx])).argmax(1).numpy()
    return float((pred == y[hold_idx]).mean())


def _holdout(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(fit, held-out) positions: a stratified slice of the training split.

    10%, but at least `MIN_HOLDOUT` images where the split allows (a quarter at most): below
    that, one image moves the score by several points."""
    n_hold = min(max(round(len(y) * HOLDOUT_FRACTION), MIN_HOLDOUT), len(y) // 4)
    hold_idx = stratified_draw(y, n_hold / len(y), seed, keep_one=True)
    return np.setdiff1d(np.arange(len(y)), hold_idx), hold_idx


def _probe_sanity(probe: ProbeFit, X: np.ndarray, y: np.ndarray, num_classes: int) -> list[SanityCheck]:
    """The recipe's checks on the probe: a fresh small head starts near ln C on the standardised
    features, the fitted probe's loss is below it, and nothing is NaN/Inf."""
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
    return [replace(c, check=f"probe_{c.check}") for c in report.checks]


# --- export -------------------------------------------------------------------------------------


def _card(
    backbone: Backbone,
    plan: Plan,
    report: _Report,
    data: Data,
    decisions: list[Decision],
    config: FitConfig,
    about: dict[str, Any],
) -> dict[str, Any]:
    """The model card's facts (graft.json): what was trained, how, on what, and every decision with its
    candidates."""
    return {
        "backbone": backbone.spec.name,
        "weights_tag": backbone.spec.weights_tag,
        "strategy": plan.to_dict(),
        "decisions": [d.to_dict() for d in decisions],
        "hyperparameters": report.hyperparameters.to_json(),
        "sanity": [check.to_json() for check in report.sanity],
        "data_hash": data.content_hash,
        "seed": config.seed,
        "num_train": len(data.train),
        "num_val": len(data.val),
        **({"data": about} if about else {}),
    }


def _export(
    out_dir: Path,
    model: nn.Module,
    prep: Preprocessing,
    classes: list[str],
    metrics: Metrics,
    card: dict[str, Any],
    run: Run,
) -> Path:
    return write_bundle(
        out_dir,
        model=model.eval().cpu(),
        classes=classes,
        preprocessing=prep,
        metrics=metrics.to_json(),
        card=card,
        on_step=lambda share, what: run.advance("export", share, label=f"Exporting the model · {what}"),
    )


# --- the plan of work, for progress (ml.run) ----------------------------------------------------
# Costs in forward passes of the frozen backbone at its native input; the fit measures its own rates.
DECODE_PASSES = 0.3  # reading, checking and hashing one image of an upload
PROBE_PASSES = 0.03  # one image in one (fold, C) fit of the logistic regression
FINAL_FITS = 3  # the probe refitted on all its images at the chosen C, in (fold, C) fits
TRAIN_PASSES = 3  # a training image: forward, backward, update
LOAD_SECONDS = 2.0  # loading the pretrained weights
EXPORT_SECONDS = 6.0  # TorchScript and ONNX export, and their parity check


def _passes(prep: Preprocessing, native: Preprocessing) -> float:
    """Forward-pass cost of one image at `prep`'s input (decoding bounds it from below)."""
    return max(0.2, (prep.input_size / native.input_size) ** 2)


def _features_key(prep: Preprocessing) -> str:
    return f"features@{prep.input_size}"


def _features_label(prep: Preprocessing) -> str:
    return f"Extracting features at {prep.input_size} px"


def _probe_work(n: int, options: int) -> int:
    """Image-fits (one image in one (fold, C) fit) of the probe search over `options` candidates."""
    pilot = min(n, PILOT_IMAGES) if options > 1 else 0
    folds = 3 if pilot < n else 5
    return options * folds * len(DEFAULT_CS) * pilot + (5 * len(DEFAULT_CS) + FINAL_FITS) * n


def _pre_passes(n_hold: int, cfg: FinetuneConfig) -> int:
    """Passes before a fine-tune's first epoch: the overfit-a-batch check and the probe's held-out score."""
    return cfg.overfit_steps * min(8, n_hold) * TRAIN_PASSES + n_hold


def _epoch_passes(n_fit: int, n_hold: int, cfg: FinetuneConfig) -> int:
    """Passes of one epoch: its training images, then the held-out slice scored (twice with EMA)."""
    return TRAIN_PASSES * n_fit + (2 if cfg.ema else 1) * n_hold


def _plan_fit(run: Run, n_train: int, n_val: int, config: FitConfig) -> None:
    """The work as it can be told before measuring anything: features at the native input, one probe,
    the fine-tune when the user asked for one, export."""
    native = get_spec(config.backbone).preprocessing
    run.plan("load", "Loading the pretrained network", 1, passes=0.0, fixed=LOAD_SECONDS)
    run.plan(_features_key(native), _features_label(native), n_train + n_val, kind=FEATURES)
    run.plan("probe", "Fitting linear probes", _probe_work(n_train, 1), passes=PROBE_PASSES)
    if config.strategy in ("partial", "full"):
        _plan_finetune(run, n_train, n_val, config, native, native)
    run.plan("export", "Exporting the model", 1, passes=0.0, fixed=EXPORT_SECONDS)


def _plan_after_measuring(
    run: Run, reps: list[Representation], data: Data, plan: Plan, config: FitConfig, native: Preprocessing
) -> None:
    """The plan once the matrix has spoken: how many probes compete, and whether a fine-tune follows."""
    before = run.work.left()
    options = len(reps) * (len(reps[-1].feats) if PLAN_REGISTRY[plan.name].stage_probes else 1)
    run.plan("probe", "Fitting linear probes", _probe_work(len(data.train), options), passes=PROBE_PASSES)
    why = []
    if options > 1:
        why.append(f"{options} linear probes are compared (input sizes x stages)")
    depth = finetune_depth(plan, config.strategy)
    if depth is not None:
        chosen_now = "finetune" not in run.work.steps
        smallest = min((rep.prep for rep in reps), key=lambda p: p.input_size)
        epochs = _plan_finetune(run, len(data.train), len(data.val), config, smallest, native)
        if chosen_now:
            why.append(f"a {depth} fine-tune was chosen ({plan.cell}), about {epochs} epochs")
    after = run.work.left()
    if why and after > 1.2 * before:
        run.note(f"The plan grew: {'; '.join(why)}, {about(after - before)} more.")


def _plan_finetune(run: Run, n: int, n_val: int, config: FitConfig, prep: Preprocessing, native: Preprocessing) -> int:
    """Plan the fine-tune's steps; returns the epochs it plans for (the time budget's share, when known)."""
    n_hold = min(max(round(n * HOLDOUT_FRACTION), MIN_HOLDOUT), n // 4)  # as _holdout draws it
    n_fit, passes = n - n_hold, _passes(prep, native)
    device = _device(config.device)
    cfg = FinetuneConfig(max_epochs=config.max_epochs, batch_size=TRAIN_BATCH.get(device.type, TRAIN_BATCH["cpu"]))
    if config.budget is not None and run.work.calibrated:  # the budget bounds the epochs once rates are known
        per_epoch = _epoch_passes(n_fit, n_hold, cfg) * passes * run.work.rate("train")
        cfg = replace(cfg, max_epochs=min(cfg.max_epochs, max(1, int(config.budget // max(per_epoch, 1e-9)))))
    run.plan("checks", "Preparing the fine-tune", 8 * min(INVARIANCE_SAMPLE, n_hold), passes=passes)
    if config.search:
        trial = replace(cfg, max_epochs=cfg.pilot_epochs, overfit_steps=0)
        work = config.search * (_pre_passes(n_hold, trial) + trial.max_epochs * _epoch_passes(n_fit, n_hold, trial))
    else:
        steps = 40 if config.lr_find else LR_TEST_STEPS
        run.plan(
            "lr_test", "Finding the learning rate", steps * cfg.batch_size * TRAIN_PASSES, passes=passes, kind="train"
        )
        work = 0
    work += _pre_passes(n_hold, cfg) + cfg.max_epochs * _epoch_passes(n_fit, n_hold, cfg)
    run.plan("finetune", "Fine-tuning", work, passes=passes, kind="train")
    run.plan("evaluate", "Scoring the validation images", 3 * n_hold + 2 * n_val, passes=passes)
    return cfg.max_epochs


def _plan_full_run(run: Run, setup: _FinetuneSetup, cfg: FinetuneConfig) -> None:
    """After a search: the full run is what is left of the fine-tune (trials a budget cut are dropped)."""
    step = run.work.steps["finetune"]
    n_fit, n_hold = len(setup.batches_for(1).labels), len(setup.hold_idx)
    work = _pre_passes(n_hold, cfg) + cfg.max_epochs * _epoch_passes(n_fit, n_hold, cfg)
    run.plan("finetune", "Fine-tuning", step.done + work, passes=step.passes, kind="train")


def _scoring(run: Run, tta: int, val: int) -> None:
    """The kept fine-tune's TTA test is done (`tta` passes); `val` passes of scoring follow."""
    step = run.work.steps.get("evaluate")
    if step is None:
        return
    run.advance("evaluate", tta)
    run.plan("evaluate", "Scoring the validation images", step.done + val, passes=step.passes)


class _Checks:
    """The fine-tune's set-up (the held-out refits, then the flip and augmentation tests), in held-out
    images read: it is planned as 8 per held-out sample image."""

    SHARE = {"refit": 1, "flip": 3, "augmentation": 8}
    NEXT = {"refit": "Testing flips and augmentation on held-out images", "flip": "Testing augmentation strength"}

    def __init__(self, run: Run, sample: int) -> None:
        self.run, self.sample = run, sample

    def within(self, part: str) -> Callable[[float], None]:
        """Progress inside a test: `share` (0..1) of `part` done moves the bar part of the way."""
        parts = list(self.SHARE)
        before = self.SHARE[parts[parts.index(part) - 1]] if parts.index(part) else 0

        def step(share: float) -> None:
            if "checks" in self.run.work.steps:
                self.run.advance("checks", (before + share * (self.SHARE[part] - before)) * self.sample)

        return step

    def done(self, part: str) -> None:
        if "checks" not in self.run.work.steps:
            return
        self.run.advance("checks", self.SHARE[part] * self.sample, label=self.NEXT.get(part))
        if part == "augmentation":
            self.run.finish("checks")


class _ProbeProgress:
    """The probe search in image-fits: each (fold, C) fit of a candidate on n images counts n."""

    def __init__(self, run: Run, data: Data, options: dict[str, Any]) -> None:
        self.run, self.options = run, len(options)
        if "probe" not in run.work.steps:
            run.plan("probe", "Fitting linear probes", _probe_work(len(data.train), self.options), passes=PROBE_PASSES)

    def candidate(self, i: int, name: str, n: int) -> Callable[[int, int], None]:
        return self._tick(f"Comparing linear probes · {i + 1} of {self.options} ({name})", n)

    def final(self, name: str, n: int) -> Callable[[int, int], None]:
        return self._tick(f"Fitting the chosen probe ({name}) on all training images", n)

    def _tick(self, label: str, n: int) -> Callable[[int, int], None]:
        base = self.run.work.steps["probe"].done
        return lambda done, _total: self.run.advance("probe", base + done * n, label=label)


class _TryProgress:
    """One fine-tune try's epochs, as training passes of the "finetune" step: the plan is corrected when
    the time budget sets the epochs, and what early stopping leaves undone is dropped at its end."""

    def __init__(
        self,
        run: Run,
        setup: _FinetuneSetup,
        cfg: FinetuneConfig,
        trial: int | None,
        trials: int,
        resume: dict[str, Any] | None,
        why: str | None,
    ) -> None:
        self.run = run
        n_fit, n_hold = len(setup.batches_for(1).labels), len(setup.hold_idx)
        self.per_epoch = _epoch_passes(n_fit, n_hold, cfg)
        self.n_hold = n_hold
        self.pre = 0 if resume is not None else _pre_passes(n_hold, cfg)
        self.first = resume["epoch"] if resume is not None else 0
        self.epochs = resume["epochs"] if resume is not None else cfg.max_epochs
        self.budget = cfg.budget if resume is None else None
        self.name = f"Search trial {trial} of {trials}" if trial else "Fine-tuning"
        if not trial and cfg.lr_multiplier != 1:
            self.name += f" at {cfg.lr_multiplier:.2g}x the learning rate"
        step = run.work.steps.get("finetune")
        self.passes = step.passes if step is not None else 1.0
        self.base = step.done if step is not None else 0.0
        self.planned: float = self.pre + (self.epochs - self.first) * self.per_epoch
        items = self.base + self.planned
        if step is not None:  # planned already (a search's trials, the first try), or a try the plan lacked
            items = step.items + self.planned if why else max(items, step.items)
        note = None
        if why is not None:
            note = f"{why[0].upper()}{why[1:]}: {about(self.planned * self.passes * run.work.rate('train'))} more."
        run.plan("finetune", self.label(self.first + 1), items, passes=self.passes, kind="train", note=note)

    def label(self, epoch: int) -> str:
        return f"{self.name} · epoch {min(epoch, self.epochs)} of {self.epochs}"

    def check(self, done: int, steps: int) -> None:
        """The overfit-one-batch sanity check, before the first epoch."""
        batch = self.pre - self.n_hold  # its passes: steps x images x TRAIN_PASSES
        self.run.advance("finetune", self.base + batch * done / steps, label=f"{self.name} · checking it can learn")

    def step(self, epoch: int, seen: int, _total: int) -> None:
        done = self.base + self.pre + (epoch - 1 - self.first) * self.per_epoch + TRAIN_PASSES * seen
        self.run.advance("finetune", done, label=self.label(epoch))

    def epoch(self, row: EpochRow) -> None:
        e = row.epoch
        if self.budget is not None and e == 1 and row.seconds > 0:  # as ml.finetune resizes its schedule
            fit_in = max(1, int(self.budget // row.seconds))
            if fit_in < self.epochs:
                self._drop((self.epochs - fit_in) * self.per_epoch)
                self.epochs = fit_in
        done = self.base + self.pre + max(0, e - self.first) * self.per_epoch
        self.run.advance("finetune", done, label=self.label(e + 1), row=row.to_json())

    def end(self) -> None:
        """Early stopping or a failed pilot: the epochs not trained are dropped from the plan."""
        self._drop(self.planned - (self.run.work.steps["finetune"].done - self.base))

    def _drop(self, passes: float) -> None:
        step = self.run.work.steps["finetune"]
        if passes > 0:
            self.planned -= passes
            self.run.plan("finetune", step.label, step.items - passes, passes=step.passes, kind="train")


# --- small helpers ------------------------------------------------------------------------------


def _fit_key(config: FitConfig, data: Data) -> str:
    """Names a fit's inputs: a checkpoint is only used by a fit of the same data and configuration."""
    inputs = {**asdict(config), "content_hash": data.content_hash, "classes": data.classes}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


__all__ = ["FitConfig", "FitResult", "Known", "Progress", "choose_probe", "fit", "measure", "train"]
