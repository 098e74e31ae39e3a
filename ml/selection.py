"""Decisions by measurement: candidates, their scores on the training split, and the pick.

Every choice the engine makes between options (input resolution and stage, flips,
augmentation strength, learning rate, probe vs fine-tune, test-time augmentation) is a
`Decision`: the candidates it considered, each with the score it measured, the one
kept and a sentence saying why. The selection rules live here as small pure
functions so that they are tested table-driven, apart from the measuring.

Scores always come from the training split (cross-validation, or a held-out slice of
it); the validation split that is reported never chooses anything.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

import numpy as np


@dataclass(frozen=True)
class Candidate:
    name: str
    score: float | None  # higher is better; None when it could not be measured
    seconds: float = 0.0  # what measuring it cost
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    what: str  # representation | flip | augmentation | learning_rate | search | finetune | tta
    chosen: str
    candidates: tuple[Candidate, ...]
    reason: str
    metric: str = ""  # what the scores are, e.g. "5-fold CV accuracy on train"
    __json_extra__: ClassVar[dict[str, object]] = {"seconds": float}  # to_dict adds what it cost in all

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.candidates)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        for c in out["candidates"]:
            c["score"] = None if c["score"] is None else round(c["score"], 4)
            c["seconds"] = round(c["seconds"], 3)
        return out


def invariance_holds(clean: float, transformed: float, *, tolerance: float) -> bool:
    """A transformation is an invariance of the data when the probe answers as well on transformed
    images as on the originals (within `tolerance`): a mirror that changes the answers is not one."""
    return transformed >= clean - tolerance


def strongest_within(levels: Sequence[Candidate], clean: float, *, tolerance: float) -> str:
    """The strongest augmentation level (listed mildest first) whose views the probe still reads
    within `tolerance` of the clean images; the mildest when none is."""
    chosen = levels[0].name
    for level in levels:
        if level.score is not None and invariance_holds(clean, level.score, tolerance=tolerance):
            chosen = level.name
    return chosen


def significance_margin(base: float, n: int, *, floor: float = 0.0) -> float:
    """Twice the standard error of an accuracy `base` measured on `n` images (at least `floor`, and at
    least one and a half images): a challenger that wins by less has not shown it is better, since
    the noise of n images (and the best of several tries) could give it that lead."""
    if n <= 0:
        return floor
    return max(floor, 1.5 / n, 2 * math.sqrt(max(base * (1 - base), 0.0) / n))


def paired_margin(
    first: Sequence[bool] | np.ndarray, second: Sequence[bool] | np.ndarray, *, floor: float = 0.0
) -> float:
    """Twice the standard error of the difference between two accuracies read on the same images
    (`first[i]`, `second[i]`: image i read correctly), at least `floor`. Paired, as McNemar's test
    is: only the images the two readings disagree on add noise."""
    d = np.asarray(first, dtype=float) - np.asarray(second, dtype=float)
    return floor if len(d) == 0 else max(floor, 2 * float(d.std()) / math.sqrt(len(d)))


def paired_z(challenger: Sequence[float] | np.ndarray, incumbent: Sequence[float] | np.ndarray) -> float:
    """How many standard errors the challenger's mean per-image loss lies below (negative) or above
    the incumbent's, on the same images: a paired test, so only how the two differ image by image
    adds noise, not how hard the images are."""
    a, b = np.asarray(challenger, dtype=float), np.asarray(incumbent, dtype=float)
    if len(a) == 0:
        return 0.0
    mean, se = float((a - b).mean()), paired_margin(a, b) / 2
    if se == 0.0:
        return 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / se


def best_by_paired_loss(
    losses: Mapping[str, Sequence[float] | np.ndarray | None],
    *,
    incumbent: str,
    z: float,
    cost: Mapping[str, float] | None = None,
) -> tuple[str, dict[str, float]]:
    """(the choice, each candidate's paired z against the incumbent). Losses are per image (out-of-fold
    log loss, every candidate on the same images and folds). The incumbent stays unless the candidate
    with the lowest mean loss beats it by more than `z` paired standard errors: a proper scoring rule
    sees a better representation where accuracy, on a few hundred images, moves by a handful of them.
    When it is beaten, the cheapest candidate (`cost`) that also beats it and is not worse than the best
    by `z` paired standard errors is chosen, the lowest loss among equals: the simplest model the
    measurement cannot tell from the best."""
    if incumbent not in losses:
        raise ValueError(f"incumbent '{incumbent}' is not among the candidates {list(losses)}")
    base = losses[incumbent]
    if base is None:
        return incumbent, {}
    measured = {name: loss for name, loss in losses.items() if loss is not None}
    zs = {name: paired_z(loss, base) for name, loss in measured.items()}
    means = {name: float(np.mean(loss)) for name, loss in measured.items()}
    best = min(means, key=means.__getitem__)
    if zs[best] >= -z:
        return incumbent, zs
    equals = [n for n in measured if zs[n] < -z and paired_z(measured[n], measured[best]) < z]
    return min(equals, key=lambda n: ((cost or {}).get(n, 0.0), means[n])), zs


def keep_if_better(base: float, new: float, *, margin: float = 0.0) -> bool:
    """An extra (EMA weights, test-time augmentation) is kept only when it measures better."""
    return new > base + margin


__all__ = [
    "Candidate",
    "Decision",
    "best_by_paired_loss",
    "invariance_holds",
    "keep_if_better",
    "paired_margin",
    "paired_z",
    "significance_margin",
    "strongest_within",
]
