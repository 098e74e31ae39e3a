"""Fine-tuning by the recipe of DESIGN.md §1, with the measured parts the engine adds.

- start from the linear probe (LP-FT): the model is the probe's own network (the body
  up to the chosen stage, pooled) with the probe's head, so epoch 0 *is* the probe;
- backbone learning rate = 1/10 of the rate it was trained with, scaled linearly
  with the batch size, in the optimizer family it was trained with (timm's factory);
- BatchNorm in eval mode throughout (ImageNet statistics stay frozen);
- linear warmup, then cosine decay (timm's scheduler), stepped per batch; when a time
  budget allows fewer epochs than `max_epochs`, the schedule is resized to fit after
  the first epoch, so a budget stop does not leave the LR mid-schedule;
- weight decay on weights only, never on norms or biases; class-weighted loss;
- selection on a held-out slice of the *training* split (never the reported
  validation split): early stopping restores the best snapshot, and epoch 0 counts,
  so fine-tuning never ends worse than the probe it started from;
- a pilot: when the first `pilot_epochs` do not beat the probe on the held-out slice,
  the fine-tune stops there and says so, rather than spending its whole budget;
- an exponential moving average of the weights, kept only when it scores better;
- sanity checks on the model actually trained: overfit one small batch (which also
  checks the initial loss ~ ln C), the loss goes down, no NaN/Inf; and the
  update/weight ratio (~1e-3 is healthy) per epoch in the history.

On CUDA: autocast in bf16 where supported (else fp16 with a gradient scaler), the head
and the loss in fp32, cudnn autotuning, uint8 batches pinned and normalised on the
device, and one host sync per epoch.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from torch import nn

from ml.backbones import Backbone, BackboneSpec
from ml.features import TOP, GridPool, iter_batches
from ml.preprocess import normalize
from ml.report import EpochRow, FinetuneSettings, RangePoint, RangeTest, SanityCheck
from ml.selection import Candidate, Decision

if TYPE_CHECKING:
    from timm.scheduler import CosineLRScheduler
    from timm.utils import ModelEmaV3

EpochFn = Callable[[EpochRow], None]
CheckpointFn = Callable[[dict[str, Any]], None]  # receives the state after each epoch (see `finetune`)
StepFn = Callable[[int, int, int], None]  # (epoch, images seen in it, images per epoch)
RangeStepFn = Callable[[int, int], None]  # (steps done, steps)


@dataclass
class FinetuneConfig:
    depth: str = "partial"  # partial: the top stages + head; full: every stage + head
    max_epochs: int = 15
    patience: int = 3  # epochs without a better held-out score before stopping
    pilot_epochs: int = 3  # when none of these beats the probe on the held-out slice, stop: it will not pay
    batch_size: int = 32
    warmup_epochs: float = 1.0
    # The recipe lets a *new* head learn faster; ours starts as the fitted probe, already at its
    # optimum for the frozen features, and a 10x rate knocked it off (cats vs dogs: 0.99 -> 0.965
    # after one epoch; at 1x it reaches 0.995).
    head_lr_multiplier: float = 1.0
    lr_multiplier: float = 1.0  # on top of the recipe's rule
    weight_decay: float = 1e-4
    ema: bool = True  # also score an exponential moving average of the weights (over about one epoch)
    budget: float | None = None  # seconds of fine-tuning; None = only max_epochs bounds it
    overfit_steps: int = 25  # sanity check: steps on one small batch (0: skip)
    seed: int = 0  # the training order, and torch's generator (a fresh head in the sanity check)


def backbone_lr(spec: BackboneSpec, batch_size: int) -> float:
    """1/10 of the backbone's original learning rate, scaled linearly with batch size."""
    return spec.train_lr / 10 * batch_size / spec.train_batch_size


def trainable_stage(backbone: Backbone, depth: str, top: str = TOP) -> str:
    """First stage that trains: the top ~30% of the stages in use for `partial`; for `full`,
    everything from the stem. `top` is the stage the model is cut at (TOP: the whole body)."""
    stages = backbone.stages if top == TOP else backbone.stages[: backbone.stages.index(top) + 1]
    if depth == "full":
        return "stem"
    if depth == "partial":
        return stages[-max(1, round(len(stages) * 0.3))]
    raise ValueError(f"unknown fine-tune depth '{depth}'. Valid choices: partial, full.")


def probe_model(backbone: Backbone, head: nn.Module, stage: str = TOP) -> nn.Sequential:
    """The probe's network: the body (cut after `stage`, its map pooled into a 2x2 grid) + head."""
    if stage == TOP:
        return nn.Sequential(backbone.body, head)
    return nn.Sequential(backbone.truncated(stage), GridPool(), head)


class FlipAverage(nn.Module):
    """Test-time augmentation: the mean of the features of the image and of its mirror.

    The head is linear, so this equals averaging the two logits; keeping the head outside
    leaves the model a (body, head) sequence like every other."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        plain: torch.Tensor = self.body(x)
        mirror: torch.Tensor = self.body(x.flip(3))
        return (plain + mirror) / 2


def with_flip_average(model: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(FlipAverage(model[:-1]), model[-1])


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay ImageNet's."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def param_groups(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on weight matrices/kernels only; norms and biases (1-D) get none."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups: list[dict[str, Any]] = [{"params": decay, "lr": lr, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


# timm's optimizer names for the families backbones were trained with. TF RMSProp for the
# TF-trained weights: its square average starts at 1, not 0 as in torch.optim.RMSprop, whose
# first steps move every weight by ~3x the LR whatever its gradient -- enough to wreck a
# pretrained network in a few batches.
_TIMM_OPT: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("sgd", {}),
    "rmsprop": ("rmsproptf", {"alpha": 0.9, "eps": 1e-3}),
    "adamw": ("adamw", {}),
}


def make_optimizer(kind: str, groups: list[dict[str, Any]]) -> torch.optim.Optimizer:
    """The optimizer family the backbone was trained with, so that 1/10 of its LR means what it says."""
    from timm.optim import create_optimizer_v2

    if kind not in _TIMM_OPT:
        raise ValueError(f"unknown optimizer '{kind}'. Valid choices: {', '.join(_TIMM_OPT)}.")
    name, kwargs = _TIMM_OPT[kind]
    return create_optimizer_v2(groups, opt=name, lr=groups[0]["lr"], momentum=0.9, **kwargs)


def seed_second_moment(optimizer: torch.optim.Optimizer) -> None:
    """Start RMSProp's running mean of squared gradients from the gradients just taken.

    TF's RMSProp (timm's `rmsproptf`, which EfficientNet-Lite was trained with) starts it at 1,
    PyTorch's at 0. From 1, with a fine-tune's small gradients, the effective step grows ~30x
    over the first ~100 steps as the mean decays: after the schedule's warmup, at its peak LR
    (brain MRI, whole network: the training loss doubled in epoch 2, then the network collapsed
    to chance). Seeded from real gradients, the schedule's warmup is the only warmup, and a
    short LR range test sees the steps the fine-tune will take. Other optimizers: no-op."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if p.grad is not None and state and "square_avg" in state:
                state["square_avg"].copy_(p.grad.detach().square())


def make_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> CosineLRScheduler:
    """Linear warmup from 0, then cosine decay to 0 over the remaining steps (timm), stepped per batch."""
    from timm.scheduler import CosineLRScheduler

    return CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        warmup_t=warmup_steps,
        warmup_lr_init=0.0,
        warmup_prefix=True,
        t_in_epochs=False,
    )


class EarlyStopping:
    """Tracks the best held-out score and its weights; says when patience ran out."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_score: Any = -math.inf  # then the best score: a float or a tuple, as the caller scores
        self.best_epoch = -1
        self.best_source = "model"
        self.bad_epochs = 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, score: float | tuple[float, ...], model: nn.Module, source: str = "model") -> bool:
        """Record an epoch; True when training should stop. Scores compare with `>` (tuples break ties)."""
        if self.best_epoch < 0 or score > self.best_score:
            self.best_score, self.best_epoch, self.best_source, self.bad_epochs = score, epoch, source, 0
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)

    def state_dict(self) -> dict[str, Any]:
        return {
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "best_source": self.best_source,
            "bad_epochs": self.bad_epochs,
            "weights": self._state,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_score, self.best_epoch = state["best_score"], state["best_epoch"]
        self.best_source, self.bad_epochs, self._state = state["best_source"], state["bad_epochs"], state["weights"]


@dataclass
class SanityReport:
    checks: list[SanityCheck] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append(SanityCheck(name, bool(ok), detail))

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)


def check_initial_loss(report: SanityReport, loss: float, num_classes: int, tolerance: float) -> None:
    expected = math.log(num_classes)
    ok = math.isfinite(loss) and abs(loss - expected) <= tolerance * expected
    report.add(
        "initial_loss",
        ok,
        f"fresh head: loss {loss:.3f} vs ln({num_classes}) = {expected:.3f} (tolerance {tolerance:.0%})",
    )


def check_loss_decreases(report: SanityReport, losses: Sequence[float], *, same_from: int = 1) -> None:
    """The train loss went below where it started, over the epochs from `same_from` (1-based) on,
    which all train under the same augmentation. An epoch under lighter augmentation is not
    comparable: a fine-tune that starts from a good probe sits near its floor in a light first
    epoch and above it under stronger augmentation, and that is not a fault (it failed this check
    on digits: 0.102 in the light first epoch, 0.115 in the second)."""
    comparable = list(losses[same_from - 1 :])
    if len(comparable) < 2:
        report.add("loss_decreases", True, "fewer than two epochs under the same augmentation: nothing to compare")
        return
    # Later epochs may sit above the lowest: the check is that the loss went below where it started.
    low = min(comparable[1:])
    report.add(
        "loss_decreases",
        low < comparable[0],
        f"train loss {comparable[0]:.4f} (epoch {same_from}) -> lowest later {low:.4f}, last {comparable[-1]:.4f}",
    )


def check_overfits_a_batch(
    report: SanityReport,
    model: nn.Sequential,
    params: list[nn.Parameter],
    batch: tuple[torch.Tensor, torch.Tensor],
    optimizer: tuple[str, float],
    steps: int,
    on_step: RangeStepFn | None = None,
) -> None:
    """Karpathy's "overfit one batch" (`batch`: x, y), on a copy of the model actually fine-tuned, with
    `optimizer` (its family and learning rate) (`on_step(done, steps)` after each step: the progress
    shown, or a cancel raised from it).

    The head is re-initialised small, so the first loss must be near ln(C) (mangled or
    unnormalised inputs show here), and the same trainable layers, loss and optimizer
    family, at a raised learning rate, must then drive the loss on this one batch to near
    zero (frozen or detached layers, a dead LR or a broken loss show here).
    """
    (x, y), (kind, lr) = batch, optimizer
    num_classes = cast(nn.Linear, model[-1]).out_features
    ids = {id(p) for p in params}
    names = {n for n, p in model.named_parameters() if id(p) in ids}
    model = copy.deepcopy(model)
    head = cast(nn.Linear, model[-1])  # the probe's head
    with torch.no_grad():  # a fresh head, small on standardised features: initial loss ~ ln C
        feats = model[:-1].eval()(x).float()
        mean = feats.mean(0)
        rms = (feats - mean).pow(2).mean().sqrt().clamp_min(1.0)  # shrink only for large features
        head.weight.copy_(torch.randn_like(head.weight) * 0.01 / rms)
        head.bias.copy_(-head.weight @ mean)
    trainable = [p for n, p in model.named_parameters() if n in names and not n.startswith(f"{len(model) - 1}.")]
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*trainable, *head.parameters()]:
        p.requires_grad_(True)
    opt = make_optimizer(kind, param_groups([*trainable, *head.parameters()], lr, 0.0))
    model.train()
    freeze_batchnorm(model)
    losses = []
    for i in range(steps):
        loss = nn.functional.cross_entropy(model(x).float(), y)
        losses.append(loss.item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if on_step:
            on_step(i + 1, steps)
    with torch.no_grad():
        final = nn.functional.cross_entropy(model.eval()(x).float(), y).item()
    check_initial_loss(report, losses[0], num_classes, 0.25)
    ok = math.isfinite(final) and final < 0.1 * math.log(num_classes)
    report.add("overfits_one_batch", ok, f"{len(y)} images, {steps} steps: loss {losses[0]:.3f} -> {final:.4f}")


@dataclass(frozen=True)
class Start:
    """What a fine-tune starts from: the probe's own network, the body up to `stage` and its fitted head."""

    backbone: Backbone
    head: nn.Linear
    stage: str = TOP

    @property
    def num_classes(self) -> int:
        return self.head.out_features


@dataclass(frozen=True)
class Hooks:
    """What a fine-tune tells its caller as it goes (each may raise to cancel it)."""

    on_epoch: EpochFn | None = None  # each history row, epoch 0 (the probe) included
    on_step: StepFn | None = None  # after each training batch
    on_check: RangeStepFn | None = None  # after each step of the overfit-one-batch check
    checkpoint: CheckpointFn | None = None  # `TrainState.state_dict()` after each epoch training goes on from


@dataclass
class FinetuneResult:
    model: nn.Sequential
    history: list[EpochRow]
    best_epoch: int
    stopped: str  # why training ended
    sanity: list[SanityCheck]
    hyperparameters: FinetuneSettings
    decisions: tuple[Decision, ...] = ()  # the choices made inside the loop: its epochs, its weights


class Batches:
    """Stacked (x, y) batches from an indexable image source, decoded in threads.

    With `normalize` ((mean, std) of the preprocessing), `load` returns uint8 images and
    they are scaled and normalised where the model runs: a quarter of the bytes cross to
    the GPU, from pinned memory, and the decode threads skip the float work.
    """

    def __init__(
        self,
        load: Callable[[int], torch.Tensor],
        labels: np.ndarray,
        batch_size: int,
        normalize: tuple[Sequence[float], Sequence[float]] | None = None,
    ) -> None:
        self.load, self.labels, self.batch_size, self.normalize = load, labels, batch_size, normalize

    def __call__(
        self, order: Sequence[int] | np.ndarray, device: torch.device | None = None
    ) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        """Batches in `order`; on `device` (channels-last, normalised) when one is given."""
        done = 0
        stats = None
        if device is not None and self.normalize is not None:
            stats = [torch.tensor(v, dtype=torch.float32, device=device).view(1, -1, 1, 1) for v in self.normalize]
        for x in iter_batches(self.load, list(order), self.batch_size):
            idx = order[done : done + len(x)]
            done += len(x)
            y = torch.as_tensor(self.labels[list(idx)], dtype=torch.long)
            if device is not None:
                if device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                if stats is not None:
                    x = normalize(x, *stats)
                x = x.contiguous(memory_format=torch.channels_last)
            yield x, y


@dataclass
class TrainState:
    """A fine-tune in progress: the model, how it is trained, and where the loop stands.

    `state_dict()` is the checkpoint: everything the next epoch depends on (weights, optimizer,
    schedule, EMA, early stopping, random states, history). `load_state_dict()` puts a fresh
    state, built from the same start, data and config, where the saved one stood."""

    model: nn.Sequential
    trainable: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: CosineLRScheduler
    loss_fn: nn.CrossEntropyLoss
    ema: ModelEmaV3 | None
    device: torch.device
    steps_per_epoch: int
    epochs: int  # planned; a time budget may lower it after the first epoch
    hyper: dict[str, Any]
    rng: np.random.Generator
    amp: torch.dtype | None = None
    scaler: torch.amp.GradScaler = field(default_factory=lambda: torch.amp.GradScaler("cuda", enabled=False))
    stopper: EarlyStopping = field(default_factory=lambda: EarlyStopping(1))
    epoch: int = 0
    step: int = 0
    stopped: str = ""
    history: list[EpochRow] = field(default_factory=list)
    train_losses: list[float] = field(default_factory=list)
    sanity: SanityReport = field(default_factory=SanityReport)
    best_by_weights: dict[str, tuple[float, float]] = field(default_factory=dict)  # "model" / "ema": best score
    epoch_seconds: float = 0.0  # the last epoch's, training and scoring
    started: float = field(default_factory=time.perf_counter)

    def state_dict(self) -> dict[str, Any]:
        cuda = self.device.type == "cuda"
        return {
            "epoch": self.epoch,
            "step": self.step,
            "epochs": self.epochs,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "stopper": self.stopper.state_dict(),
            "rng": self.rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(self.device) if cuda else None,
            "history": [row.to_json() for row in self.history],
            "train_losses": self.train_losses,
            "sanity": [check.to_json() for check in self.sanity.checks],
            "stopped": self.stopped,
            "hyper": {k: self.hyper[k] for k in ("schedule", "budget_epochs") if k in self.hyper},
            "best_by_weights": self.best_by_weights,
            "train_seconds": time.perf_counter() - self.started,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.module.load_state_dict(state["ema"])
        self.stopper.load_state_dict(state["stopper"])
        self.rng.bit_generator.state = state["rng"]
        torch.set_rng_state(state["torch_rng"])
        if self.device.type == "cuda" and state["cuda_rng"] is not None:
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        self.history = [EpochRow.from_json(row) for row in state["history"]]
        self.sanity.checks = [SanityCheck(**check) for check in state["sanity"]]
        self.train_losses = state["train_losses"]
        self.epoch, self.step, self.epochs, self.stopped = (
            state["epoch"],
            state["step"],
            state["epochs"],
            state["stopped"],
        )
        self.hyper.update(state["hyper"])
        self.best_by_weights = {k: tuple(v) for k, v in state.get("best_by_weights", {}).items()}
        self.started = time.perf_counter() - state["train_seconds"]

    def schedule(self, epochs: int) -> None:
        """Plan `epochs` epochs: linear warmup over the first, cosine decay to zero at the last step."""
        self.epochs = epochs
        warmup, total = self.scheduler.warmup_t, self.steps_per_epoch * epochs
        self.scheduler.t_initial = max(1, total - warmup)
        self.hyper["schedule"] = f"linear warmup {warmup} steps, cosine decay over {total}"


def finetune(
    start: Start,
    train: Batches | Callable[[int], Batches],
    holdout: Batches,
    config: FinetuneConfig,
    *,
    device: torch.device,
    hooks: Hooks = Hooks(),
    resume: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune the probe's network (`start`); returns the best model, epoch 0 (the probe) included.

    `train` is the training batches, or a function of the epoch (1, 2, ...) giving them, so
    augmentation can start gently; `holdout` is the held-out slice of the training split that
    early stopping, the pilot and EMA selection read. Given a checkpoint as `resume` (a
    `TrainState.state_dict()` of the same start, data and config), training goes on after its
    epoch, and the epochs before it are not run again.
    """
    torch.manual_seed(config.seed)
    train_for = train if callable(train) and not isinstance(train, Batches) else (lambda _epoch: train)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # one input size per job: autotuned kernels pay off
    s = _begin(start, train_for(1).labels, config, device)
    if config.overfit_steps and resume is None:
        x0, y0 = next(iter(holdout(list(range(min(len(holdout.labels), 8))), device)))
        opt = (start.backbone.spec.train_optimizer, 10 * s.hyper["backbone_lr"])
        check_overfits_a_batch(s.sanity, s.model, s.trainable, (x0, y0), opt, config.overfit_steps, hooks.on_check)
    if resume is None:
        _record(s, _score(s, holdout), None, hooks.on_epoch)
    else:
        s.load_state_dict(resume)
    while s.epoch < s.epochs:
        s.epoch += 1
        trained = _train_epoch(s, train_for(s.epoch), hooks.on_step)
        if not math.isfinite(trained.loss):
            s.sanity.add("finite_loss", False, f"loss became {trained.loss} in epoch {s.epoch}")
            s.stopped = "non-finite loss"
            break
        s.train_losses.append(trained.loss)
        stop = _record(s, _score(s, holdout), trained, hooks.on_epoch)
        if stop is not None:
            s.stopped = stop
            break
        if config.budget is not None and s.epoch == 1:
            _fit_budget(s, config.budget, s.epoch_seconds)
        if hooks.checkpoint is not None and s.epoch < s.epochs:
            hooks.checkpoint(s.state_dict())
    return _end(s, config, lighter_first=train_for is not train)


def _begin(start: Start, labels: np.ndarray, config: FinetuneConfig, device: torch.device) -> TrainState:
    """The model for `config.depth`, its optimizer, schedule, loss and EMA, before the first epoch."""
    model, first, trainable, optimizer = _prepare(start, config, device)
    lrs = (optimizer.param_groups[0]["lr"], optimizer.param_groups[-1]["lr"])  # before warmup sets them to 0
    steps_per_epoch = max(1, math.ceil(len(labels) / config.batch_size))
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = make_scheduler(optimizer, warmup, steps_per_epoch * config.max_epochs)
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(labels, start.num_classes, device))
    amp = _amp_dtype(device)
    ema_decay = min(0.999, max(0.9, 1 - 1 / steps_per_epoch))  # averages over about one epoch
    ema = _ema(model, ema_decay) if config.ema else None
    s = TrainState(
        model, trainable, optimizer, scheduler, loss_fn, ema, device, steps_per_epoch, config.max_epochs,
        hyper={}, rng=np.random.default_rng(config.seed), amp=amp,
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16), stopper=EarlyStopping(config.patience),
        stopped=f"reached max_epochs ({config.max_epochs})",
    )  # fmt: skip
    s.hyper = _hyperparameters(start, config, s, first, ema_decay, lrs)
    return s


def _hyperparameters(
    start: Start, config: FinetuneConfig, s: TrainState, first: str, ema_decay: float, lrs: tuple[float, float]
) -> dict[str, Any]:
    spec = start.backbone.spec
    weight = s.loss_fn.weight
    assert weight is not None
    return {
        "depth": config.depth,
        "model_stage": start.stage,
        "trainable_from": first,
        "trainable_params": sum(p.numel() for p in s.trainable),
        "optimizer": spec.train_optimizer,
        "backbone_lr": lrs[0],
        "head_lr": lrs[1],
        "lr_rule": (
            f"{spec.train_lr} (original) / 10 x {config.batch_size} / {spec.train_batch_size} "
            f"(batch-scaled)" + (f" x {config.lr_multiplier:g} (measured)" if config.lr_multiplier != 1 else "")
        ),
        "batch_size": config.batch_size,
        "schedule": f"linear warmup {s.scheduler.warmup_t} steps, cosine decay over {s.steps_per_epoch * s.epochs}",
        "weight_decay": config.weight_decay,
        "weight_decay_on": "weights only (no norms, no biases)",
        "batchnorm": "eval mode (frozen ImageNet statistics)",
        "class_weights": [round(float(w), 4) for w in weight.cpu()],
        "max_epochs": config.max_epochs,
        "patience": config.patience,
        "pilot_epochs": config.pilot_epochs,
        "ema_decay": ema_decay if s.ema is not None else None,
        "budget_s": config.budget,
        "amp": str(s.amp).replace("torch.", "") if s.amp else None,
        "channels_last": True,
        "selection": "held-out slice of the training split",
    }


@dataclass(frozen=True)
class _Trained:
    """One epoch's training pass, as measured."""

    loss: float
    accuracy: float
    update_ratio: float | None  # ||update|| / ||weights|| of the mid-epoch step
    images: int
    seconds: float  # the training loop alone, data pipeline included
    started: float


def _train_epoch(s: TrainState, batches: Batches, on_step: StepFn | None) -> _Trained:
    """One pass over the training images, in a fresh order: forward, backward, update, schedule, EMA."""
    started = time.perf_counter()
    s.model.train()
    freeze_batchnorm(s.model)
    # Accumulated on the device; read once per epoch (one host sync, not three per step).
    loss_sum = torch.zeros((), device=s.device)
    correct = torch.zeros((), device=s.device, dtype=torch.long)
    n, seen, ratio = len(batches.labels), 0, None
    for x, y in batches(s.rng.permutation(n), s.device):
        logits = _forward(s.model, x, s.amp)
        loss = s.loss_fn(logits, y)
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        mid_epoch = s.step % s.steps_per_epoch == s.steps_per_epoch // 2  # (the first step has LR 0 under warmup)
        before = [p.detach().clone() for p in s.trainable] if mid_epoch else None
        s.scaler.step(s.optimizer)
        s.scaler.update()
        if s.step == 0:  # the warmup's first step, at LR 0
            seed_second_moment(s.optimizer)
        if before is not None:
            ratio = _update_ratio(before, s.trainable)
        s.step += 1
        s.scheduler.step_update(s.step)
        if s.ema is not None:
            s.ema.update(s.model, s.step)
        loss_sum += loss.detach() * len(y)
        correct += (logits.detach().argmax(1) == y).sum()
        seen += len(y)
        if on_step:
            on_step(s.epoch, seen, n)
    loss_value = float(loss_sum) / max(1, seen)  # the epoch's one host sync
    return _Trained(loss_value, int(correct) / max(1, seen), ratio, seen, time.perf_counter() - started, started)


def _score(s: TrainState, holdout: Batches) -> tuple[float, float, str]:
    """(loss, accuracy, which weights) on the held-out slice: the trained weights, or their moving
    average where it scores better."""
    loss, acc = evaluate(s.model, holdout, s.device)
    if s.epoch == 0:  # the probe, before any training
        return loss, acc, "model"
    s.best_by_weights["model"] = max(s.best_by_weights.get("model", (-math.inf, -math.inf)), (acc, -loss))
    if s.ema is None:
        return loss, acc, "model"
    ema_loss, ema_acc = evaluate(s.ema.module, holdout, s.device)
    s.best_by_weights["ema"] = max(s.best_by_weights.get("ema", (-math.inf, -math.inf)), (ema_acc, -ema_loss))
    if (ema_acc, -ema_loss) > (acc, -loss):
        return ema_loss, ema_acc, "ema"
    return loss, acc, "model"


def _record(
    s: TrainState, scored: tuple[float, float, str], trained: _Trained | None, on_epoch: EpochFn | None
) -> str | None:
    """The epoch into early stopping and the history; why training stops now, or None."""
    loss, acc, source = scored
    model = s.ema.module if source == "ema" and s.ema is not None else s.model
    stop = s.stopper.update(s.epoch, (acc, -loss), model, source)
    s.epoch_seconds = time.perf_counter() - trained.started if trained else 0.0
    row = EpochRow(
        epoch=s.epoch,
        train_loss=trained.loss if trained else None,
        train_accuracy=trained.accuracy if trained else None,
        heldout_loss=loss,
        heldout_accuracy=acc,
        lr=s.optimizer.param_groups[0]["lr"] if trained else 0.0,
        head_lr=s.optimizer.param_groups[-1]["lr"] if trained else 0.0,
        seconds=round(s.epoch_seconds, 2),
        best_epoch=s.stopper.best_epoch,
        patience_used=s.stopper.bad_epochs,
        weights=("ema" if source == "ema" else "model") if trained else None,
        update_ratio=trained.update_ratio if trained else None,
        images_per_s=round(trained.images / trained.seconds, 1) if trained else None,
    )
    s.history.append(row)
    if on_epoch:
        on_epoch(row)
    if trained is not None and s.epoch >= s.hyper["pilot_epochs"] and s.stopper.best_epoch == 0:
        return (
            f"pilot: {s.epoch} epoch(s) did not beat the probe on the held-out slice "
            f"({acc:.4f} vs {s.history[0].heldout_accuracy:.4f}), so fine-tuning would not pay here"
        )
    if stop:
        return f"early stopping: no better held-out accuracy for {s.hyper['patience']} epochs"
    return None


def _fit_budget(s: TrainState, budget: float, seconds: float) -> None:
    """After the first epoch: the epochs a time budget allows at its pace, and the schedule resized to them
    (a budget stop does not leave the learning rate mid-schedule)."""
    fit_in = max(1, int(budget // seconds))
    if fit_in < s.epochs:
        s.schedule(fit_in)
        s.hyper["budget_epochs"] = fit_in
        s.stopped = f"time budget of {budget:.0f} s: {fit_in} epoch(s) at {seconds:.0f} s each"


def _end(s: TrainState, config: FinetuneConfig, *, lighter_first: bool) -> FinetuneResult:
    """The last sanity checks, the best epoch's weights restored, and the choices the loop made."""
    if not any(c.check == "finite_loss" for c in s.sanity.checks):
        s.sanity.add("finite_loss", True, "every training loss was finite")
    # `train` as a function of the epoch may run a lighter first epoch (ml.fit does): compare from the second.
    check_loss_decreases(s.sanity, s.train_losses, same_from=2 if lighter_first else 1)
    s.stopper.restore(s.model)
    s.model.eval()
    for p in s.model.parameters():
        p.requires_grad_(False)
    s.hyper["best_weights"] = s.stopper.best_source
    s.hyper["train_seconds"] = round(time.perf_counter() - s.started, 2)
    settings = FinetuneSettings(**s.hyper)
    result = FinetuneResult(s.model, s.history, s.stopper.best_epoch, s.stopped, s.sanity.checks, settings)
    result.decisions = _loop_decisions(s, config)
    return result


def _loop_decisions(s: TrainState, config: FinetuneConfig) -> tuple[Decision, ...]:
    """How long it trained (the pilot, early stopping or the budget) and which weights it kept."""
    n, best = len(s.history) - 1, s.history[s.stopper.best_epoch]
    shown = {0: "the probe (epoch 0)"}
    shown |= {e: f"{name}, epoch {e}" for e, name in ((best.epoch, "best"), (n, "last")) if e not in shown}
    epochs = Decision(
        "epochs",
        shown[best.epoch],
        tuple(Candidate(name, s.history[e].heldout_accuracy, s.history[e].seconds) for e, name in shown.items()),
        f"{n} of at most {config.max_epochs} epochs ({s.stopped}); the best epoch's weights are restored",
        metric="held-out accuracy",
    )
    if s.ema is None or "ema" not in s.best_by_weights:
        return (epochs,)
    names = {"model": "trained weights", "ema": "moving average"}
    weights = Decision(
        "weights",
        names[s.stopper.best_source] if s.stopper.best_epoch > 0 else "the probe's",
        tuple(Candidate(names[k], v[0]) for k, v in s.best_by_weights.items()),
        f"each epoch scores the trained weights and their moving average (decay {s.hyper['ema_decay']:.3g}, "
        "about one epoch), and keeps the better; the best epoch's are restored",
        metric="best held-out accuracy",
    )
    return (epochs, weights)


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """bf16 where the GPU has it (no gradient scaler needed), else fp16; None off CUDA."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _forward(model: nn.Sequential, x: torch.Tensor, amp: torch.dtype | None) -> torch.Tensor:
    """Logits with the body under autocast and the head in fp32.

    The head is the probe with the feature scaler folded in (|W| up to 1e3-1e4 on near-dead
    channels): in fp16 its logits would lose 0.1-1."""
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        feats = model[:-1](x)
    logits: torch.Tensor = model[-1](feats.float())
    return logits


def _update_ratio(before: list[torch.Tensor], params: list[nn.Parameter]) -> float:
    """||update|| / ||weights|| over the trainable parameters for one step (healthy: ~1e-3)."""
    with torch.no_grad():
        delta = torch.stack([(p.detach() - b).float().norm() for p, b in zip(params, before, strict=True)]).norm()
        norm = torch.stack([b.float().norm() for b in before]).norm()
    return float(delta / norm.clamp_min(1e-12))


def _ema(model: nn.Module, decay: float) -> ModelEmaV3:
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=decay)


@torch.no_grad()
def evaluate(model: nn.Sequential, batches: Batches, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over `batches` in eval mode."""
    logits, labels = predict_logits(model, batches, device)
    loss = nn.functional.cross_entropy(logits, labels).item()
    return loss, float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def predict_logits(model: nn.Sequential, batches: Batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp32 logits, labels) for every image of `batches`, in order, in eval mode."""
    model.eval()
    amp = _amp_dtype(device)
    out, ys = [], []
    for x, y in batches(range(len(batches.labels)), device):
        out.append(_forward(model, x, amp).cpu())
        ys.append(y.cpu())
    return torch.cat(out), torch.cat(ys)


def _prepare(
    start: Start, config: FinetuneConfig, device: torch.device
) -> tuple[nn.Sequential, str, list[nn.Parameter], torch.optim.Optimizer]:
    """(model, first trainable stage, trainable parameters incl. the head's, optimizer) for `config.depth`."""
    # torch's stubs lack the (device, memory_format) form of Module.to, which it accepts.
    backbone, head = start.backbone, start.head
    model = probe_model(backbone, head, start.stage).to(device, memory_format=torch.channels_last)  # type: ignore[call-overload]
    first = trainable_stage(backbone, config.depth, start.stage)
    in_model = {id(p) for p in model[0].parameters()}
    body_params = (
        list(model[0].parameters())
        if first == "stem"
        else [p for p in backbone.parameters_from(first) if id(p) in in_model]
    )
    for p in model.parameters():
        p.requires_grad_(False)
    for p in [*body_params, *head.parameters()]:
        p.requires_grad_(True)
    lr = backbone_lr(backbone.spec, config.batch_size) * config.lr_multiplier
    optimizer = make_optimizer(
        backbone.spec.train_optimizer,
        param_groups(body_params, lr, config.weight_decay)
        + param_groups(head.parameters(), lr * config.head_lr_multiplier, config.weight_decay),
    )
    return model, first, [*body_params, *head.parameters()], optimizer


def _class_weights(labels: np.ndarray, num_classes: int, device: torch.device) -> torch.Tensor:
    """Balanced class weights, n / (C * count): a rare class counts as much as a common one."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=device)


@dataclass(frozen=True)
class RangeSpan:
    """A range test's learning rates: factors of the recipe's, growing exponentially over `steps`."""

    factor_min: float = 1e-3
    factor_max: float = 1e2
    steps: int = 40


def lr_range_test(
    start: Start,
    train: Batches,
    config: FinetuneConfig,
    device: torch.device,
    span: RangeSpan = RangeSpan(),
    on_step: RangeStepFn | None = None,
) -> RangeTest:
    """Leslie Smith's range test with the fine-tune's own setup, on copies of the weights.

    The same trainable layers, optimizer family, parameter groups and class weights
    as `finetune`; every group's LR is scaled by a factor growing exponentially from
    `span.factor_min` to `span.factor_max`. The curve reports the backbone LR, so the
    suggestion (steepest smoothed descent) compares directly with the recipe's rule.
    """
    started = time.perf_counter()
    copied = Start(copy.deepcopy(start.backbone), copy.deepcopy(start.head), start.stage)
    model, _, _, optimizer = _prepare(copied, config, device)
    base = [g["lr"] for g in optimizer.param_groups]
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(train.labels, start.num_classes, device))
    curve, diverged = _range_steps(model, optimizer, loss_fn, train, span, config.seed, on_step)
    slopes = [(curve[i + 1].smoothed - curve[i].smoothed, i) for i in range(len(curve) - 1)]
    return RangeTest(
        curve=curve,
        suggested_lr=curve[min(slopes)[1]].lr if slopes else base[0],
        recipe_lr=base[0],
        # where the loss blew up (loss_blew_up, or not finite); None: it never did
        diverged_lr=(curve[-1].lr if curve else base[0] * span.factor_min) if diverged else None,
        seconds=round(time.perf_counter() - started, 2),
    )


def _range_steps(
    model: nn.Sequential,
    optimizer: torch.optim.Optimizer,
    loss_fn: nn.CrossEntropyLoss,
    train: Batches,
    span: RangeSpan,
    seed: int,
    on_step: RangeStepFn | None,
) -> tuple[list[RangePoint], bool]:
    """(the curve, whether the loss blew up): one step per batch, every group's LR scaled by the growing factor."""
    device = next(model.parameters()).device
    amp = _amp_dtype(device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    base = [g["lr"] for g in optimizer.param_groups]
    gamma = (span.factor_max / span.factor_min) ** (1 / max(1, span.steps - 1))
    rng = np.random.default_rng(seed)
    num_classes = cast(nn.Linear, model[-1]).out_features
    curve: list[RangePoint] = []
    smooth, best, factor = None, math.inf, span.factor_min
    model.train()
    freeze_batchnorm(model)
    diverged = False
    while len(curve) < span.steps and not diverged:
        for x, y in train(rng.permutation(len(train.labels)), device):
            for g, lr in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * factor
            loss = loss_fn(_forward(model, x, amp), y)
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            if not curve:
                seed_second_moment(optimizer)
            smooth = value if smooth is None else 0.7 * smooth + 0.3 * value
            curve.append(RangePoint(base[0] * factor, value, smooth))
            best = min(best, smooth)
            factor *= gamma
            if on_step:
                on_step(len(curve), span.steps)
            blown = loss_blew_up(smooth, best, num_classes)
            if len(curve) >= span.steps or blown:
                diverged = blown
                break
    return curve, diverged


def loss_blew_up(smoothed: float, best: float, num_classes: int) -> bool:
    """The range test's stop: the smoothed loss at 4x its best (fastai's rule) and a quarter of the way
    to chance (ln C) above it, so batch noise on a near-perfect probe's tiny loss does not count
    (cats vs dogs: 0.02 -> 0.08 is noise, not a blow-up)."""
    return smoothed > max(4 * best, best + 0.25 * math.log(num_classes))


__all__ = [
    "Batches",
    "Hooks",
    "RangeSpan",
    "Start",
    "TrainState",
    "EarlyStopping",
    "check_overfits_a_batch",
    "make_scheduler",
    "probe_model",
    "with_flip_average",
    "FinetuneConfig",
    "FinetuneResult",
    "backbone_lr",
    "finetune",
    "freeze_batchnorm",
    "loss_blew_up",
    "lr_range_test",
    "param_groups",
    "trainable_stage",
]
