"""A fit's options, declared once: `OPTIONS`, and `FitConfig` made from it.

Each `Option` names its type, bounds or choices, default, help and who may set it. Everything
that sets a fit reads this table: the CLI's `fit` flags (ml.cli), the API's job input
(apps.training.api), the web form (apps.web.fit_form) and the options a job stores
(apps.training.services.USER_OPTIONS). The bounds are checked in one place, `FitConfig.validate`,
so every surface refuses a value with the same words.

No torch here: the backbones' names are read from ml.weights (the torch-free table of their weight
files, held to ml.backbones' registry by a test) when first needed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from ml.errors import ConfigError
from ml.strategy import SIZE_BOUNDARY, STRATEGIES

T = TypeVar("T")

MAX_SEARCH = 64  # --search trials at most
MAX_EPOCHS = 200
MAX_BUDGET = 7 * 24 * 3600.0  # seconds of fine-tuning at most
MAX_SEED = 2**32 - 1  # numpy's seeds
RESOLUTIONS = ("auto", "native")

# Who may set an option: "user" through the API, the web form and the CLI; "cli" only on the
# command line; "engine" nobody (the engine's own default; a test or a benchmark may pass another).
Who = Literal["user", "cli", "engine"]


@dataclass(frozen=True)
class Deferred(Generic[T]):
    """A default that lives in a module importing torch: read from there when first needed."""

    read: Callable[[], T]


@dataclass(frozen=True)
class Option(Generic[T]):
    name: str
    kind: type[str | int | float]  # the type of a set value: str, int, float or bool
    default: T | Deferred[T]
    who: Who
    label: str  # a form's few words
    help: str  # one phrase, lower case, for --help, the API schema and the form's hint
    low: float | None = None  # bounds, inclusive unless `open_bounds`
    high: float | None = None
    open_bounds: bool = False
    unit: str = ""  # what the bounds count, as their message says it ("seconds")
    optional: bool = False  # None (not set) is allowed
    choices: Callable[[], tuple[str, ...]] | None = None  # read when needed, like a deferred default
    # Replaces the membership test of `choices` where another module owns what is valid.
    check: Callable[[T], None] | None = None

    def default_value(self) -> T:
        if isinstance(self.default, Deferred):
            value: T = self.default.read()
            return value
        return self.default

    def bounds(self) -> str:
        """'1 to 200', '1 to 604800 seconds', 'at least 1 image per class'; '' when unbounded."""
        unit = f" {self.unit}" if self.unit else ""
        if self.low is not None and self.high is not None:
            return f"{_number(self.low)} to {_number(self.high)}{unit}"
        if self.low is not None:
            return f"at least {_number(self.low)}{unit}"
        return ""

    def describe(self) -> str:
        """The help with the bounds, as --help and the API schema show it."""
        bounds = self.bounds()
        return f"{self.help}; {bounds}" if bounds else self.help

    def refuse(self, value: Any) -> str | None:
        """Why `value` is not valid for this option, in the words a user reads; None when it is."""
        if value is None and self.optional:
            return None
        if self.check is not None:
            try:
                self.check(value)
            except ConfigError as exc:
                return exc.message
            return None
        if self.choices is not None:
            choices = self.choices()
            return None if value in choices else f"Unknown {self.name} '{value}'. Valid choices: {', '.join(choices)}."
        if self.low is None and self.high is None:
            return None
        low = -float("inf") if self.low is None else self.low
        high = float("inf") if self.high is None else self.high
        inside = low < value < high if self.open_bounds else low <= value <= high  # NaN is never inside
        if inside:
            return None
        unit = f" {self.unit}" if self.unit else ""
        if self.high is None:
            return f"{self.name} must be at least {_number(low)}{unit}."
        return f"{self.name} must be between {_number(low)} and {_number(high)}{unit}."


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _strategies() -> tuple[str, ...]:
    return STRATEGIES


def _backbones() -> tuple[str, ...]:
    from ml.weights import WEIGHTS

    return tuple(sorted(WEIGHTS))


def _default_backbone() -> str:
    from ml.weights import DEFAULT_BACKBONE

    return DEFAULT_BACKBONE


def _known_backbone(name: str) -> None:
    from ml.weights import check_backbone

    check_backbone(name)


def _resolutions() -> tuple[str, ...]:
    return RESOLUTIONS


# In the order `validate` checks them (the first refusal is the one reported).
STRATEGY_OPTION = Option[str](
    "strategy", str, "auto", "user", "Strategy",
    "how to train: auto picks a plan of the transfer matrix from the measured data; the others force one",
    choices=_strategies,
)  # fmt: skip
SIZE_BOUNDARY_OPTION = Option[int](
    "size_boundary", int, SIZE_BOUNDARY, "engine", "Size boundary",
    "training images per class where 'small' becomes 'large'",
    low=1, unit="image per class",
)  # fmt: skip
BACKBONE_OPTION = Option[str](
    "backbone", str, Deferred(_default_backbone), "user", "Backbone",
    "the pretrained network the classifier is built on",
    choices=_backbones, check=_known_backbone,
)  # fmt: skip
VAL_FRACTION_OPTION = Option[float](
    "val_fraction", float, 0.2, "engine", "Validation fraction",
    "the share of images held out for validation, only when the upload has no val/ folder",
    low=0.0, high=1.0, open_bounds=True,
)  # fmt: skip
BUDGET_OPTION = Option[float | None](
    "budget", float, None, "user", "Fine-tuning time budget (seconds, optional)",
    "seconds allowed for fine-tuning (left out: epochs and early stopping bound it)",
    low=1, high=MAX_BUDGET, unit="seconds", optional=True,
)  # fmt: skip
MAX_EPOCHS_OPTION = Option[int](
    "max_epochs", int, 15, "user", "Fine-tuning epochs at most",
    "fine-tuning epochs at most (early stopping may end sooner)",
    low=1, high=MAX_EPOCHS,
)  # fmt: skip
PATIENCE_OPTION = Option[int](
    "patience", int, 3, "engine", "Patience",
    "epochs without a better held-out accuracy before early stopping",
    low=1, high=MAX_EPOCHS,
)  # fmt: skip
SEED_OPTION = Option[int](
    "seed", int, 0, "user", "Seed",
    "the random seed of the split, the probes and the fine-tune",
    low=0, high=MAX_SEED,
)  # fmt: skip
RESOLUTION_OPTION = Option[str](
    "resolution", str, "auto", "cli", "Input size",
    "input size: auto follows the data (the native one or a size that suits small images), native is the backbone's",
    choices=_resolutions,
)  # fmt: skip
SEARCH_OPTION = Option[int](
    "search", int, 0, "cli", "Search trials",
    "short fine-tunes of a coarse-to-fine random search over learning rate and weight decay (0: the LR ladder)",
    low=0, high=MAX_SEARCH, unit="trials",
)  # fmt: skip
BATCH_SIZE_OPTION = Option[int]("batch_size", int, 64, "engine", "Batch size", "the feature-extraction batch")
DEVICE_OPTION = Option[str]("device", str, "auto", "engine", "Device", "auto: cuda when available, else cpu")
HFLIP_OPTION = Option[bool](
    "hflip", bool, True, "user", "Mirror images are the same class (allow horizontal flips)",
    "horizontal flips may be used, where they are measured to keep the class (not for text, digits)",
)  # fmt: skip
LR_FIND_OPTION = Option[bool](
    "lr_find", bool, False, "user", "Full-width learning-rate range test (from 1/1000 of the rule)",
    "run the fine-tune's learning-rate range test over its whole width (from 1/1000 of the rule, 40 steps)",
)  # fmt: skip

OPTIONS: tuple[Option[Any], ...] = (
    STRATEGY_OPTION, SIZE_BOUNDARY_OPTION, BACKBONE_OPTION, VAL_FRACTION_OPTION, BUDGET_OPTION, MAX_EPOCHS_OPTION,
    PATIENCE_OPTION, SEED_OPTION, RESOLUTION_OPTION, SEARCH_OPTION, BATCH_SIZE_OPTION, DEVICE_OPTION, HFLIP_OPTION,
    LR_FIND_OPTION,
)  # fmt: skip


def options_for(*who: Who) -> tuple[Option[Any], ...]:
    """The options those surfaces may set, in the table's order: `options_for("user", "cli")` for the CLI."""
    return tuple(o for o in OPTIONS if o.who in who)


@dataclass
class FitConfig:
    """What a fit may be told; each field's type, bounds, default and meaning are in `OPTIONS`."""

    strategy: str = STRATEGY_OPTION.default_value()
    size_boundary: int = field(default_factory=SIZE_BOUNDARY_OPTION.default_value)
    backbone: str = field(default_factory=BACKBONE_OPTION.default_value)
    val_fraction: float = VAL_FRACTION_OPTION.default_value()
    budget: float | None = BUDGET_OPTION.default_value()
    max_epochs: int = MAX_EPOCHS_OPTION.default_value()
    patience: int = PATIENCE_OPTION.default_value()
    seed: int = SEED_OPTION.default_value()
    resolution: str = RESOLUTION_OPTION.default_value()
    search: int = SEARCH_OPTION.default_value()
    batch_size: int = BATCH_SIZE_OPTION.default_value()
    device: str = DEVICE_OPTION.default_value()
    hflip: bool = HFLIP_OPTION.default_value()
    lr_find: bool = LR_FIND_OPTION.default_value()

    def validate(self) -> None:
        """The one check of fit options: the API, the web form and the CLI all end here."""
        for option in OPTIONS:
            why = option.refuse(getattr(self, option.name))
            if why is not None:
                raise ConfigError(why)
