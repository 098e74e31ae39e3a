"""Measured decisions on held-out training images: flips, augmentation strength, test-time flips.

Each reads how the probe (or the fine-tuned model) answers on up to a few hundred images of
the held-out slice of the training split, once as they are and once transformed, and records
a `Decision` with what it measured. The validation split is never read here.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.augment import LEVELS, mirrored, train_transform
from ml.backbones import Preprocessing
from ml.features import DECODE_WORKERS
from ml.finetune import Batches, evaluate, predict_logits, with_flip_average
from ml.preprocess import eval_transform
from ml.run import Run, timer
from ml.selection import (
    Candidate,
    Decision,
    invariance_holds,
    keep_if_better,
    paired_margin,
    strongest_within,
)

FLIP_TOLERANCE = 0.02  # accuracy a mirror may cost the probe and still count as an invariance
AUGMENT_TOLERANCE = 0.05  # accuracy an augmentation level's views may cost the probe


@dataclass(frozen=True)
class HeldOut:
    """Held-out training images a decision reads: `image(i)` decodes the i-th, `labels` are their classes."""

    image: Callable[[int], Image.Image]
    labels: np.ndarray


def flip_decision(
    run: Run,
    model: nn.Sequential,
    held: HeldOut,
    transform: Callable[[Image.Image], torch.Tensor],
    on_step: Callable[[float], None] | None = None,
) -> bool:
    """Whether horizontal flips are an invariance: the probe reads mirrored held-out images as well.

    The mirrors may cost the probe `FLIP_TOLERANCE`, or twice the standard error of the paired
    difference when that is larger: a few images' noise must not switch flips off (a mirrored
    digit or sign costs tens of points). `held.image(i)` gives the i-th held-out PIL image, `labels`
    their classes, `transform` the eval transform."""
    step = on_step or (lambda _share: None)  # the share of this test done, for the progress bar
    images, labels, device = held.image, held.labels, _device(model)
    with timer() as t:
        plain = _correct(model, Batches(lambda i: transform(images(i)), labels, 64), device)
        step(0.5)
        mirror = _correct(model, Batches(lambda i: mirrored(transform)(images(i)), labels, 64), device)
        step(1.0)
    tolerance = paired_margin(plain, mirror, floor=FLIP_TOLERANCE)
    holds = invariance_holds(float(plain.mean()), float(mirror.mean()), tolerance=tolerance)
    run.decide(
        Decision(
            "flip",
            "flip" if holds else "no flip",
            # "no flip" is scored on the images as they are, "flip" on their mirrors.
            (
                Candidate("no flip", float(plain.mean()), t.seconds / 2),
                Candidate("flip", float(mirror.mean()), t.seconds / 2),
            ),
            f"a mirror {'keeps' if holds else 'changes'} the probe's answers (it may cost {tolerance:.1%}: "
            f"{FLIP_TOLERANCE:.0%}, or twice the standard error of the paired difference when larger), "
            f"so flips {'are' if holds else 'are not'} used",
            metric=f"probe accuracy on {len(labels)} held-out training images",
        )
    )
    return holds


def augmentation_decision(
    run: Run,
    model: nn.Sequential,
    held: HeldOut,
    prep: Preprocessing,
    flip: bool,
    *,
    seed: int = 0,
    on_step: Callable[[float], None] | None = None,
) -> str:
    """The strongest augmentation level whose views the probe still reads (within a tolerance).

    The images are decoded once, in threads; each level's random views are then drawn in
    order under `seed`, so the same data gives the same decision on every run (a resumed fit
    measures it again and must find what the first attempt found).
    """
    step = on_step or (lambda _share: None)  # the share of this test done, for the progress bar
    images, labels, device = held.image, held.labels, _device(model)
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
        decoded = list(pool.map(images, range(len(labels))))
    step(0.2)
    clean = eval_transform(prep)
    _, acc = evaluate(model, Batches(lambda i: clean(decoded[i]), labels, 64), device)
    step(0.4)
    levels = []
    for n, level in enumerate(LEVELS, 1):
        augment, _ = train_transform(prep, level, hflip=flip, uint8=True)
        with timer() as t:
            torch.manual_seed(seed)
            views = [augment(img) for img in decoded]
            norm = (prep.mean, prep.std)
            _, score = evaluate(model, Batches(views.__getitem__, labels, 64, norm), device)
        levels.append(Candidate(level, score, t.seconds))
        step(0.4 + 0.6 * n / len(LEVELS))
    chosen = strongest_within(levels, acc, tolerance=AUGMENT_TOLERANCE)
    run.decide(
        Decision(
            "augmentation",
            chosen,
            (Candidate("clean", acc), *levels),
            f"the strongest level whose views the probe reads within {AUGMENT_TOLERANCE:.0%} of clean images; "
            "the first epoch runs 'light' either way",
            metric=f"probe accuracy on {len(labels)} held-out training images",
        )
    )
    return chosen


def tta_decision(run: Run, model: nn.Sequential, hold: Batches, device: torch.device) -> nn.Sequential:
    """Flip TTA costs a second forward pass per image at serving: kept only when it measures better."""
    with timer() as t:
        plain = _correct(model, hold, device)
    with timer() as t2:
        tta = _correct(with_flip_average(model), hold, device)
    # Paired: both read the same images. It doubles serving cost, so it must win beyond the noise.
    keep = keep_if_better(float(plain.mean()), float(tta.mean()), margin=paired_margin(plain, tta))
    run.decide(
        Decision(
            "tta",
            "flip average" if keep else "none",
            (
                Candidate("none", float(plain.mean()), t.seconds),
                Candidate("flip average", float(tta.mean()), t2.seconds),
            ),
            "kept: it reads the held-out images better" if keep else "not kept: no better on held-out images",
            metric=f"accuracy on {len(hold.labels)} held-out training images",
        )
    )
    return with_flip_average(model) if keep else model


def _correct(model: nn.Sequential, batches: Batches, device: torch.device) -> np.ndarray:
    """Per image: whether the model's top answer is its label."""
    logits, labels = predict_logits(model, batches, device)
    return (logits.argmax(1) == labels).numpy()


def _device(model: nn.Module) -> torch.device:
    """Where `model` runs: the decisions score it there."""
    return next(model.parameters()).device
