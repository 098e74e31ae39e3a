"""What a fit reports, as frozen dataclasses with one JSON shape each (`to_json`).

These cross from the engine to the app: the job stores `FitResult.to_json()`'s parts, the API
declares the same shapes (apps.training.api, from these classes), and the job page reads only
declared fields. Two accuracies are named apart: `heldout_*` is the held-out slice of the training
split (what selection reads), `val_*` the reported validation split (never read by a choice).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ml.preprocessing import Preprocessing
from ml.selection import Decision
from ml.strategy import Plan


def json_safe(value: Any) -> Any:  # a JSON value in, the same with NaN and infinities as null
    """NaN and infinities (a CV score with one image per class, a diverged loss) become null:
    JSON has no such numbers, and PostgreSQL and SQLite both refuse them."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


class Json:
    """`to_json`: the dataclass as JSON values (nested dataclasses, lists and dicts included; NaN and
    infinities as null)."""

    def to_json(self) -> dict[str, Any]:
        assert dataclasses.is_dataclass(self)
        out: dict[str, Any] = json_safe(asdict(self))
        return out


# --- history: the probe's cross-validation path, then the fine-tune's epochs ----------------------


@dataclass(frozen=True)
class ProbeRow(Json):
    """One regularisation strength of a candidate probe's cross-validation on the training split."""

    stage: str  # the candidate: "top @ 240 px", "blocks.4 @ 64 px", ...
    step: int
    C: float
    cv_accuracy: float
    cv_loss: float
    phase: Literal["probe"] = "probe"


@dataclass(frozen=True)
class EpochRow(Json):
    """One epoch of a fine-tune (epoch 0: the probe it starts from), scored on the held-out slice."""

    epoch: int
    train_loss: float | None  # None at epoch 0
    train_accuracy: float | None
    heldout_loss: float
    heldout_accuracy: float
    lr: float  # the backbone's, at the epoch's end
    head_lr: float
    seconds: float
    best_epoch: int
    patience_used: int
    weights: Literal["model", "ema"] | None = None  # which weights were scored (the better of the two)
    update_ratio: float | None = None  # ||update|| / ||weights|| of the mid-epoch step
    images_per_s: float | None = None
    phase: Literal["finetune", "search"] = "finetune"
    lr_multiplier: float | None = None  # of the recipe's rule, for this try
    trial: int | None = None  # a search's trial number
    weight_decay: float | None = None  # a search trial's

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> EpochRow:
        """A row as `to_json` wrote it (a checkpoint's history; one written before the held-out slice was
        named apart has `val_loss` and `val_accuracy`)."""
        renamed = {"val_loss": "heldout_loss", "val_accuracy": "heldout_accuracy"}
        return cls(**{renamed.get(k, k): v for k, v in row.items()})


HistoryRow = ProbeRow | EpochRow


@dataclass(frozen=True)
class SanityCheck(Json):
    check: str
    ok: bool
    detail: str


# --- the validation split's metrics ----------------------------------------------------------------


@dataclass(frozen=True)
class ClassMetrics(Json):
    label: str
    precision: float
    recall: float
    f1: float
    support: int


@dataclass(frozen=True)
class ReliabilityBin(Json):
    lo: float
    hi: float
    count: int
    confidence: float
    accuracy: float


@dataclass(frozen=True)
class Mistake(Json):
    file: str  # the image's path in the archive
    label: str
    predicted: str
    score: float  # the predicted class's probability


@dataclass(frozen=True)
class Metrics(Json):
    """The model on the validation split (never read by a choice)."""

    val_accuracy: float
    val_loss: float
    macro_f1: float
    num_val: int
    per_class: list[ClassMetrics]
    confusion_matrix: list[list[int]]  # rows: true class, columns: predicted
    top_k_accuracy: dict[str, float]  # "top1", "top3", "top5" (k below the number of classes)
    ece: float  # expected calibration error, 15 equal-width bins of the top probability
    reliability: list[ReliabilityBin]
    misclassified: list[Mistake] = field(default_factory=list)  # most confident first, at most 200
    num_train: int = 0


# --- how it was trained ----------------------------------------------------------------------------


@dataclass(frozen=True)
class RangePoint(Json):
    lr: float
    loss: float
    smoothed: float


@dataclass(frozen=True)
class RangeTest(Json):
    """The learning-rate range test: the loss as the rate grows each step (a fine-tune's copy)."""

    curve: list[RangePoint]
    suggested_lr: float  # the steepest smoothed descent
    recipe_lr: float  # the recipe's rule for the backbone
    diverged_lr: float | None  # where the loss blew up; None: it never did
    seconds: float

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RangeTest:
        return cls(**{**data, "curve": [RangePoint(**p) for p in data["curve"]]})


@dataclass(frozen=True)
class ProbeSettings(Json):
    stage: str
    C: float
    class_weight: str


@dataclass(frozen=True)
class Crop(Json):
    size: int
    scale: list[float]
    ratio: list[float]


@dataclass(frozen=True)
class AugmentLevel(Json):
    level: str  # light | medium | strong
    random_resized_crop: Crop
    horizontal_flip: bool
    color_jitter: dict[str, float]
    policy: str | None


@dataclass(frozen=True)
class Augmentation(Json):
    first_epoch: AugmentLevel  # always light: no augmentation shock on the first pass
    after: AugmentLevel  # the strongest level the probe still reads (ml.decisions)


@dataclass(frozen=True)
class FinetuneSettings(Json):
    """The fine-tune as it ran: the recipe's numbers and what the loop measured and chose."""

    depth: str
    model_stage: str
    trainable_from: str
    trainable_params: int
    optimizer: str
    backbone_lr: float
    head_lr: float
    lr_rule: str
    batch_size: int
    schedule: str
    weight_decay: float
    weight_decay_on: str
    batchnorm: str
    class_weights: list[float]
    max_epochs: int
    patience: int
    pilot_epochs: int
    ema_decay: float | None
    budget_s: float | None
    amp: str | None
    channels_last: bool
    selection: str
    best_weights: str = "model"
    train_seconds: float = 0.0
    budget_epochs: int | None = None  # the epochs the time budget allowed, when fewer than max_epochs
    # Filled in by the fit, over all of its tries:
    start: str | None = None  # the probe it started from
    input_size: int | None = None
    best_epoch: int | None = None
    stopped: str | None = None  # why it ended
    seconds_all_tries: float | None = None


@dataclass(frozen=True)
class InputSize(Json):
    size: int


@dataclass(frozen=True)
class Hyperparameters(Json):
    probe: ProbeSettings
    input: InputSize | None = None
    augmentation: Augmentation | None = None  # only where a fine-tune is what was kept
    finetune: FinetuneSettings | None = None  # where a fine-tune was tried


Arithmetic = Literal["exact", "saturating"]  # how a CPU multiplies int8 (ml.predict.int8_arithmetic)


@dataclass(frozen=True)
class Int8Check(Json):
    """The int8 model's test (ml.quantize): made from the fp32 ONNX model after the fit, and kept only
    where it predicts as the fp32 model does on training images its calibration did not read."""

    kept: bool
    reason: str  # why it was kept or refused, in words
    method: str  # how it was quantized and calibrated
    calibration_images: int  # training images its activation ranges came from
    check_images: int  # other training images the rule reads
    agreement: float  # top-1 agreement with fp32 on the check images and their moved views (ml.quantize)
    accuracy_fp32: float  # on the check images
    accuracy_int8: float
    val_images: int  # the validation split: reported, never read by the rule
    val_agreement: float | None
    val_accuracy_fp32: float | None
    val_accuracy_int8: float | None
    batch_1_ms_fp32: float  # the fastest forward pass at batch 1, measured here (the median before 2026-12-07)
    batch_1_ms_int8: float
    seconds: float  # the whole step: decode, calibrate, quantize, check
    file: str | None = None  # the bundle's int8 model, where kept
    # How the CPU that checked it multiplies int8 (ml.predict.int8_arithmetic): "exact" (VNNI, AMX,
    # ARM) or "saturating" (other x86). It is served where the CPU does the same or multiplies exactly.
    arithmetic: Arithmetic = "exact"
    # The largest shift of the fp32 head's bias, in logits (ml.quantize.correct_head); None where the
    # model's logits come from no layer it could correct (or from a step made before the correction)
    head_bias_shift: float | None = None
    # The first convolutions left in fp32 (one of ml.quantize.FP32_SHARES of them: the first design that
    # held, or the last tried)
    fp32_convolutions: int = 0
    # Top-1 agreement with fp32 on the calibration images and their moved views, which chose the design;
    # the rule asks MIN_AGREEMENT there too (None: a step made before it was measured)
    calibration_agreement: float | None = None
    # A head refitted fold by fold on fp32's features of the other check images, so that no image was
    # trained on by the head that answers for it: its top-1 agreement over the check images, fp32's
    # features against int8's, and its accuracy with each (None: not measured, or a step made before it)
    refit_agreement: float | None = None
    refit_accuracy_fp32: float | None = None
    refit_accuracy_int8: float | None = None
    designs_tried: int = 1  # of ml.quantize.FP32_SHARES, in turn
    # Whether it predicted as fp32 does (the rule held): kept, or refused only for being no faster than fp32
    # (None: a step made before it was recorded)
    held: bool | None = None
    # The fastest pass at the server's batch under load (ml.predict.MAX_BATCH images), measured here; the
    # speed rule reads it beside batch 1's (None: a step made before it was measured)
    batch: int = 8
    batch_ms_fp32: float | None = None
    batch_ms_int8: float | None = None


@dataclass(frozen=True)
class FitResult(Json):
    classes: list[str]
    strategy: Plan
    metrics: Metrics
    timings: dict[str, float]  # seconds per phase, and "total"
    artifacts: dict[str, str]  # "bundle" (the zip), "bundle_dir"
    preprocessing: Preprocessing
    device: str
    history: list[HistoryRow] = field(default_factory=list)
    sanity: list[SanityCheck] = field(default_factory=list)
    hyperparameters: Hyperparameters | None = None
    lr_range: RangeTest | None = None
    log: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    peak_rss_mib: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["decisions"] = [d.to_dict() for d in self.decisions]  # scores rounded, seconds summed
        safe: dict[str, Any] = json_safe(out)
        return safe


__all__ = [
    "json_safe",
    "Augmentation",
    "AugmentLevel",
    "ClassMetrics",
    "EpochRow",
    "FinetuneSettings",
    "FitResult",
    "HistoryRow",
    "Hyperparameters",
    "Int8Check",
    "Metrics",
    "Mistake",
    "ProbeRow",
    "ProbeSettings",
    "RangePoint",
    "RangeTest",
    "ReliabilityBin",
    "SanityCheck",
]
