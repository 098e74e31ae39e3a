"""Fine-tuning by the recipe of DESIGN.md §1.

- start from the linear probe's head (features first, then fine-tune);
- backbone learning rate = 1/10 of the rate it was trained with, scaled linearly
  with the batch size (the head, already fitted as the probe, at the same rate);
- BatchNorm in eval mode throughout (ImageNet statistics stay frozen);
- linear warmup, then cosine decay, stepped per batch;
- weight decay on weights only, never on norms or biases;
- class-weighted loss for imbalanced data;
- early stopping on validation accuracy (ties go to the lower validation loss), restoring the best snapshot — and the
  starting point (epoch 0, the probe) counts, so fine-tuning never ends worse
  than the probe it started from;
- sanity checks: initial loss of a fresh head ~ ln(C), the loss goes down, no NaN/Inf.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ml.backbones import Backbone, BackboneSpec
from ml.features import iter_batches

EpochFn = Callable[[dict], None]
StepFn = Callable[[int, int], None]


@dataclass
class FinetuneConfig:
    depth: str = "partial"  # partial: the top stages + head; full: every stage + head
    max_epochs: int = 15
    patience: int = 3  # epochs without a better validation score before stopping
    batch_size: int = 32
    warmup_epochs: float = 1.0
    # The recipe lets a *new* head learn faster; ours starts as the fitted probe, already at its
    # optimum for the frozen features, and a 10x rate knocked it off (cats vs dogs: 0.99 -> 0.965
    # after one epoch; at 1x it reaches 0.995).
    head_lr_multiplier: float = 1.0
    weight_decay: float = 1e-4
    budget: float | None = None  # seconds of fine-tuning; None = only max_epochs bounds it
    initial_loss_tolerance: float = 0.25  # relative, for the ln(C) check


def backbone_lr(spec: BackboneSpec, batch_size: int) -> float:
    """1/10 of the backbone's original learning rate, scaled linearly with batch size."""
    return spec.train_lr / 10 * batch_size / spec.train_batch_size


def trainable_stage(backbone: Backbone, depth: str) -> str:
    """First stage that trains: the top ~30% for `partial`; for `full`, everything from the stem."""
    stages = backbone.stages
    if depth == "full":
        return "stem"
    if depth == "partial":
        return stages[-max(1, round(len(stages) * 0.3))]
    raise ValueError(f"unknown fine-tune depth '{depth}'")


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm layer in eval mode: running statistics stay ImageNet's."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def param_groups(params: Iterable[nn.Parameter], lr: float, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices/kernels only; norms and biases (1-D) get none."""
    decay, no_decay = [], []
    for p in params:
        if p.requires_grad:
            (decay if p.ndim > 1 else no_decay).append(p)
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def make_optimizer(kind: str, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer family the backbone was trained with, so that 1/10 of its LR means what it says."""
    if kind == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True)
    if kind == "rmsprop":
        # TensorFlow's RMSProp, which these weights were trained with: its square average starts
        # at 1, not 0 as in torch.optim.RMSprop, whose first steps move every weight by ~3x the
        # LR whatever its gradient -- enough to wreck a pretrained network in a few batches.
        from timm.optim import RMSpropTF

        return RMSpropTF(groups, alpha=0.9, momentum=0.9, eps=1e-3)
    if kind == "adamw":
        return torch.optim.AdamW(groups)
    raise ValueError(f"unknown optimizer '{kind}'")


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


class EarlyStopping:
    """Tracks the best validation score and its weights; says when patience ran out."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best_score: float | tuple = -math.inf
        self.best_epoch = -1
        self.bad_epochs = 0
        self._state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, score: float | tuple, model: nn.Module) -> bool:
        """Record an epoch; True when training should stop. Scores compare with `>` (tuples break ties)."""
        if self.best_epoch < 0 or score > self.best_score:
            self.best_score, self.best_epoch, self.bad_epochs = score, epoch, 0
            self._state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            self.bad_epochs += 1
        return self.bad_epochs >= self.patience

    def restore(self, model: nn.Module) -> None:
        if self._state is not None:
            model.load_state_dict(self._state)


@dataclass
class SanityReport:
    checks: list[dict] = field(default_factory=list)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append({"check": name, "ok": bool(ok), "detail": detail})

    @property
    def ok(self) -> bool:
        return all(c["ok"] for c in self.checks)


def check_initial_loss(report: SanityReport, loss: float, num_classes: int, tolerance: float) -> None:
    expected = math.log(num_classes)
    ok = math.isfinite(loss) and abs(loss - expected) <= tolerance * expected
    report.add(
        "initial_loss",
        ok,
        f"fresh head: loss {loss:.3f} vs ln({num_classes}) = {expected:.3f} (tolerance {tolerance:.0%})",
    )


def check_loss_decreases(report: SanityReport, losses: Sequence[float]) -> None:
    if len(losses) < 2:
        report.add("loss_decreases", True, "fewer than two epochs: nothing to compare")
        return
    ok = losses[-1] < losses[0]
    report.add("loss_decreases", ok, f"train loss {losses[0]:.4f} (first epoch) -> {losses[-1]:.4f} (last)")


@dataclass
class FinetuneResult:
    model: nn.Module
    history: list[dict]
    best_epoch: int
    stopped: str  # why training ended
    sanity: list[dict]
    hyperparameters: dict


class Batches:
    """Stacked (x, y) batches from an indexable image source, decoded in threads."""

    def __init__(self, load: Callable[[int], torch.Tensor], labels: np.ndarray, batch_size: int) -> None:
        self.load, self.labels, self.batch_size = load, labels, batch_size

    def __call__(self, order: Sequence[int]) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        done = 0
        for x in iter_batches(self.load, list(order), self.batch_size):
            idx = order[done : done + len(x)]
            done += len(x)
            yield x, torch.as_tensor(self.labels[list(idx)], dtype=torch.long)


def finetune(
    backbone: Backbone,
    head: nn.Linear,
    train: Batches,
    val: Batches,
    num_classes: int,
    config: FinetuneConfig,
    *,
    device: torch.device,
    seed: int = 0,
    on_epoch: EpochFn | None = None,
    on_step: StepFn | None = None,
) -> FinetuneResult:
    """Fine-tune `backbone` + `head` (initialised from the probe); returns the best model."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cuda = device.type == "cuda"
    model, first, body_params, optimizer = _prepare(backbone, head, config, device)
    lr, head_lr = (g["lr"] for g in (optimizer.param_groups[0], optimizer.param_groups[-1]))
    n_train = len(train.labels)
    steps_per_epoch = max(1, math.ceil(n_train / config.batch_size))
    total_steps = steps_per_epoch * config.max_epochs
    warmup = max(1, round(config.warmup_epochs * steps_per_epoch))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(warmup, total_steps))
    class_weight = _class_weights(train.labels, num_classes, device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weight)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    sanity = SanityReport()
    hyper = {
        "depth": config.depth,
        "trainable_from": first,
        "trainable_params": sum(p.numel() for p in body_params) + sum(p.numel() for p in head.parameters()),
        "optimizer": backbone.spec.train_optimizer,
        "backbone_lr": lr,
        "head_lr": head_lr,
        "lr_rule": (
            f"{backbone.spec.train_lr} (original) / 10 x {config.batch_size} / {backbone.spec.train_batch_size} "
            "(batch-scaled)"
        ),
        "batch_size": config.batch_size,
        "schedule": f"linear warmup {warmup} steps, cosine decay over {total_steps}",
        "weight_decay": config.weight_decay,
        "weight_decay_on": "weights only (no norms, no biases)",
        "batchnorm": "eval mode (frozen ImageNet statistics)",
        "class_weights": [round(float(w), 4) for w in class_weight.cpu()],
        "max_epochs": config.max_epochs,
        "patience": config.patience,
        "budget_s": config.budget,
        "amp": cuda,
        "channels_last": True,
    }

    # Sanity check on the recipe's terms: a freshly initialised head must start near ln(C).
    x0, y0 = next(iter(train(list(range(min(n_train, config.batch_size))))))
    with torch.no_grad():
        feats = backbone.body.eval()(x0.to(device, memory_format=torch.channels_last))
        fresh = nn.Linear(head.in_features, num_classes).to(device)
        nn.init.normal_(fresh.weight, std=0.01)
        nn.init.zeros_(fresh.bias)
        check_initial_loss(
            sanity,
            nn.functional.cross_entropy(fresh(feats), y0.to(device)).item(),
            num_classes,
            config.initial_loss_tolerance,
        )

    stopper = EarlyStopping(config.patience)
    val_loss, val_acc = evaluate(model, val, device)
    stopper.update(0, (val_acc, -val_loss), model)
    history = [_row(0, None, None, val_loss, val_acc, 0.0, 0.0, 0.0, stopper)]
    if on_epoch:
        on_epoch(history[-1])
    train_losses: list[float] = []
    started = time.perf_counter()
    stopped = f"reached max_epochs ({config.max_epochs})"
    step = 0
    for epoch in range(1, config.max_epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        freeze_batchnorm(model)
        loss_sum, correct, seen = 0.0, 0, 0
        order = rng.permutation(n_train)
        for x, y in train(order):
            x = x.to(device, non_blocking=True, memory_format=torch.channels_last)
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, enabled=cuda):
                logits = model(x)
                loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                sanity.add("finite_loss", False, f"loss became {loss.item()} at epoch {epoch}, step {step}")
                stopped = "non-finite loss"
                break
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            loss_sum += loss.item() * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if on_step:
                on_step(seen, n_train)
        if stopped == "non-finite loss":
            break
        train_losses.append(loss_sum / seen)
        val_loss, val_acc = evaluate(model, val, device)
        stop = stopper.update(epoch, (val_acc, -val_loss), model)
        seconds = time.perf_counter() - t_epoch
        history.append(
            _row(
                epoch,
                loss_sum / seen,
                correct / seen,
                val_loss,
                val_acc,
                optimizer.param_groups[0]["lr"],
                optimizer.param_groups[-1]["lr"],
                seconds,
                stopper,
            )
        )
        if on_epoch:
            on_epoch(history[-1])
        if stop:
            stopped = f"early stopping: no better validation accuracy for {config.patience} epochs"
            break
        elapsed = time.perf_counter() - started
        if config.budget is not None and elapsed + seconds > config.budget:
            stopped = f"time budget of {config.budget:.0f} s would be exceeded by another epoch"
            break
    if not any(c["check"] == "finite_loss" for c in sanity.checks):
        sanity.add("finite_loss", True, "every training loss was finite")
    check_loss_decreases(sanity, train_losses)
    stopper.restore(model)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return FinetuneResult(model, history, stopper.best_epoch, stopped, sanity.checks, hyper)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Batches, device: torch.device) -> tuple[float, float]:
    """(mean loss, accuracy) over `batches` in eval mode."""
    logits, labels = predict_logits(model, batches, device)
    loss = nn.functional.cross_entropy(logits, labels).item()
    return loss, float((logits.argmax(1) == labels).float().mean())


@torch.no_grad()
def predict_logits(model: nn.Module, batches: Batches, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out, ys = [], []
    for x, y in batches(range(len(batches.labels))):
        with torch.autocast(device.type, enabled=device.type == "cuda"):
            out.append(model(x.to(device, memory_format=torch.channels_last)).float().cpu())
        ys.append(y)
    return torch.cat(out), torch.cat(ys)


def _prepare(backbone: Backbone, head: nn.Linear, config: FinetuneConfig, device: torch.device):
    """(model, first trainable stage, trainable body parameters, optimizer) for `config.depth`."""
    model = nn.Sequential(backbone.body, head).to(device, memory_format=torch.channels_last)
    first = trainable_stage(backbone, config.depth)
    body_params = list(backbone.body.parameters()) if first == "stem" else backbone.parameters_from(first)
    for p in backbone.body.parameters():
        p.requires_grad_(False)
    for p in [*body_params, *head.parameters()]:
        p.requires_grad_(True)
    lr = backbone_lr(backbone.spec, config.batch_size)
    optimizer = make_optimizer(
        backbone.spec.train_optimizer,
        param_groups(body_params, lr, config.weight_decay)
        + param_groups(head.parameters(), lr * config.head_lr_multiplier, config.weight_decay),
    )
    return model, first, body_params, optimizer


def _class_weights(labels: np.ndarray, num_classes: int, device: torch.device) -> torch.Tensor:
    """Balanced class weights, n / (C * count): a rare class counts as much as a common one."""
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    weights = len(labels) / (num_classes * np.maximum(counts, 1))
    return torch.tensor(weights, dtype=torch.float32, device=device)


def lr_range_test(
    backbone: Backbone,
    head: nn.Linear,
    train: Batches,
    num_classes: int,
    config: FinetuneConfig,
    device: torch.device,
    *,
    factor_min: float = 1e-3,
    factor_max: float = 1e2,
    steps: int = 40,
    seed: int = 0,
    on_step: StepFn | None = None,
) -> dict:
    """Leslie Smith's range test with the fine-tune's own setup, on copies of the weights.

    The same trainable layers, optimizer family, parameter groups and class weights
    as `finetune`; every group's LR is scaled by a factor growing exponentially from
    `factor_min` to `factor_max`. The curve reports the backbone LR, so the
    suggestion (steepest smoothed descent) compares directly with the recipe's rule.
    """
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    model, _, _, optimizer = _prepare(backbone, head, config, device)
    base = [g["lr"] for g in optimizer.param_groups]
    loss_fn = nn.CrossEntropyLoss(weight=_class_weights(train.labels, num_classes, device))
    gamma = (factor_max / factor_min) ** (1 / max(1, steps - 1))
    rng = np.random.default_rng(seed)
    curve: list[dict] = []
    smooth, best, factor = None, math.inf, factor_min
    model.train()
    freeze_batchnorm(model)
    diverged = False
    while len(curve) < steps and not diverged:
        for x, y in train(rng.permutation(len(train.labels))):
            for g, lr in zip(optimizer.param_groups, base, strict=True):
                g["lr"] = lr * factor
            x = x.to(device, memory_format=torch.channels_last)
            loss = loss_fn(model(x).float(), y.to(device))
            value = loss.item()
            if not math.isfinite(value):
                diverged = True
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            smooth = value if smooth is None else 0.7 * smooth + 0.3 * value
            curve.append({"lr": base[0] * factor, "loss": value, "smoothed": smooth})
            best = min(best, smooth)
            factor *= gamma
            if on_step:
                on_step(len(curve), steps)
            if len(curve) >= steps or smooth > 4 * best:
                diverged = smooth > 4 * best
                break
    slopes = [(curve[i + 1]["smoothed"] - curve[i]["smoothed"], i) for i in range(len(curve) - 1)]
    suggestion = curve[min(slopes)[1]]["lr"] if slopes else base[0]
    return {"curve": curve, "suggested_lr": suggestion, "recipe_lr": base[0]}


def _row(epoch, train_loss, train_acc, val_loss, val_acc, lr, head_lr, seconds, stopper: EarlyStopping) -> dict:
    return {
        "epoch": epoch,
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "lr": lr,
        "head_lr": head_lr,
        "seconds": round(seconds, 2),
        "best_epoch": stopper.best_epoch,
        "patience_used": stopper.bad_epochs,
    }


__all__ = [
    "Batches",
    "EarlyStopping",
    "FinetuneConfig",
    "FinetuneResult",
    "backbone_lr",
    "finetune",
    "freeze_batchnorm",
    "lr_range_test",
    "param_groups",
    "trainable_stage",
    "warmup_cosine",
]
