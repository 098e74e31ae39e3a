"""Decisions by measurement: the selection rules (table-driven) and the flip test on toy data."""

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ml.backbones import Preprocessing
from ml.decisions import HeldOut, augmentation_decision, flip_decision
from ml.preprocess import eval_transform
from ml.run import Run
from ml.selection import Candidate, Decision, invariance_holds, keep_if_better, strongest_within


def _c(name: str, score: float | None) -> Candidate:
    return Candidate(name, score)


@pytest.mark.parametrize(
    "clean,transformed,holds",
    [(0.95, 0.95, True), (0.95, 0.94, True), (0.95, 0.93, True), (0.95, 0.92, False), (0.98, 0.31, False)],
)
def test_invariance_holds_within_tolerance(clean, transformed, holds):
    assert invariance_holds(clean, transformed, tolerance=0.02) is holds


@pytest.mark.parametrize(
    "levels,expected",
    [
        ([0.97, 0.95, 0.93], "strong"),  # every level read within 5 points of clean (0.97)
        ([0.97, 0.90, 0.95], "strong"),  # the strongest that holds, even past a weaker one that does not
        ([0.97, 0.67, 0.53], "light"),  # digits: crops and colour ops change the class
        ([0.50, 0.40, 0.30], "light"),  # none holds: the mildest
        ([0.96, 0.93, None], "medium"),  # a level that could not be measured is skipped
    ],
)
def test_strongest_augmentation_within_tolerance(levels, expected):
    candidates = [_c(n, s) for n, s in zip(("light", "medium", "strong"), levels, strict=True)]
    assert strongest_within(candidates, 0.97, tolerance=0.05) == expected


@pytest.mark.parametrize("base,new,keep", [(0.90, 0.91, True), (0.90, 0.90, False), (0.90, 0.89, False)])
def test_extras_are_kept_only_if_they_measure_better(base, new, keep):
    assert keep_if_better(base, new) is keep


def test_decision_serialises_with_its_cost():
    d = Decision("flip", "no flip", (Candidate("as is", 0.98765, 1.25), Candidate("mirrored", 0.3, 0.5)), "why", "m")
    out = d.to_dict()
    assert out["seconds"] == 1.75 and out["candidates"][0]["score"] == 0.9877 and out["chosen"] == "no flip"


# --- the flip test on toy data ------------------------------------------------------------------

PREP = Preprocessing(16, 16, (0.5,) * 3, (0.5,) * 3)


class Halves(nn.Module):
    """Features: mean brightness of the left and the right half (or, transposed, top and bottom)."""

    def __init__(self, transpose: bool) -> None:
        super().__init__()
        self.transpose = transpose

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.transpose(2, 3) if self.transpose else x
        w = x.shape[3] // 2
        return torch.stack([x[..., :w].mean((1, 2, 3)), x[..., w:].mean((1, 2, 3))], 1)


def toy_probe(axis: str) -> nn.Sequential:
    """A stand-in probe: class 0 when the left (top) half is brighter, class 1 when the right (bottom) is.
    Reading left vs right, a mirror swaps its answers; reading top vs bottom, it does not."""
    head = nn.Linear(2, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[10.0, -10.0], [-10.0, 10.0]]))
        head.bias.zero_()
    return nn.Sequential(Halves(transpose=axis == "top"), head)


def _images(axis: str, n: int = 32) -> tuple[list[Image.Image], np.ndarray]:
    rng = np.random.default_rng(0)
    labels = np.arange(n) % 2
    out = []
    for y in labels:
        a = rng.integers(0, 60, (16, 16, 3), dtype=np.uint8)
        half = (slice(None), slice(8 * y, 8 * y + 8)) if axis == "side" else (slice(8 * y, 8 * y + 8), slice(None))
        a[half] += 150
        out.append(Image.fromarray(a))
    return out, labels


@pytest.mark.parametrize("axis,holds", [("side", False), ("top", True)])
def test_flip_test_detects_mirror_sensitive_data(axis, holds):
    images, labels = _images(axis)
    run = Run()
    got = flip_decision(run, toy_probe(axis), HeldOut(images.__getitem__, labels), eval_transform(PREP))
    assert got is holds
    decision = run.decisions[-1]
    scores = {c.name: c.score for c in decision.candidates}
    assert scores["no flip"] == 1.0
    assert (scores["flip"] == 0.0) is not holds
    assert decision.chosen == ("flip" if holds else "no flip")


def test_augmentation_decision_reports_every_level():
    images, labels = _images("top")
    run = Run()
    level = augmentation_decision(run, toy_probe("top"), HeldOut(images.__getitem__, labels), PREP, False)
    decision = run.decisions[-1]
    assert [c.name for c in decision.candidates] == ["clean", "light", "medium", "strong"]
    assert level == decision.chosen and level in ("light", "medium", "strong")


def test_augmentation_decision_draws_the_same_views_on_every_run():
    """Decoding runs in threads; the random views must not depend on which thread came first
    (a resumed fit measures again and must find what the first attempt found)."""
    images, labels = _images("side", n=96)
    slow = lambda i: (time.sleep(0.002 * (i % 5)), images[i])[1]  # noqa: E731 - threads finish out of order

    def scores() -> list[float]:
        run = Run()
        augmentation_decision(run, toy_probe("side"), HeldOut(slow, labels), PREP, True, seed=3)
        return [c.score for c in run.decisions[-1].candidates]

    first = scores()
    assert len(set(first)) > 1  # the views do change the probe's answers here
    assert all(scores() == first for _ in range(3))


@pytest.mark.parametrize(
    "base,n,new,kept",
    [
        (0.94, 50, 0.98, False),  # 2 more right of 50: within twice the standard error (6.7 points)
        (0.70, 60, 0.75, False),  # 3 more right of 60 at 70%: noise
        (0.965, 400, 0.9975, True),  # 13 more right of 400: a real gain
        (1.0, 145, 1.0, False),  # a tie at the ceiling
        (0.99, 1000, 0.997, True),  # past twice the standard error (0.63 points)
    ],
)
def test_a_challenger_must_win_by_more_than_twice_the_standard_error(base, n, new, kept):
    from ml.selection import significance_margin

    assert keep_if_better(base, new, margin=significance_margin(base, n)) is kept


def test_significance_margin_has_a_floor_of_one_and_a_half_images():
    from ml.selection import significance_margin

    assert significance_margin(1.0, 100) == pytest.approx(0.015)
    assert significance_margin(0.5, 100, floor=0.5) == 0.5


@pytest.mark.parametrize(
    "first,second,margin",
    [
        ([1] * 100, [1] * 100, 0.0),  # the readings agree everywhere: no noise in their difference
        ([1] * 100, [1] * 99 + [0], 2 * math.sqrt(0.01 - 0.0001) / 10),  # one discordant image
        ([1] * 50 + [0] * 50, [0] * 50 + [1] * 50, 0.2),  # equal accuracies, every image discordant
    ],
)
def test_paired_margin_counts_only_the_images_the_readings_disagree_on(first, second, margin):
    from ml.selection import paired_margin

    assert paired_margin(first, second) == pytest.approx(margin)
    assert paired_margin(first, second, floor=0.5) == 0.5


def test_a_representation_better_on_nearly_every_image_wins_though_the_images_differ_more_than_the_views():
    from ml.selection import best_by_paired_loss

    # Per-image losses spread widely (easy and hard images); the stage's is 8% lower on every image.
    # Unpaired, its lead (0.016) is inside twice the standard error of the mean (0.019); paired, it is
    # far past it.
    hardness = np.random.default_rng(0).exponential(0.2, 480)
    losses = {"top": hardness, "blocks.3": hardness * 0.92, "blocks.5": hardness * 0.96}
    assert hardness.mean() - losses["blocks.3"].mean() < 2 * hardness.std() / math.sqrt(480)
    chosen, z = best_by_paired_loss(losses, incumbent="top", z=2.0)
    assert chosen == "blocks.3" and z["top"] == 0 and z["blocks.3"] < -2


@pytest.mark.parametrize(
    "losses,expected",
    [
        ({"top": [0.2, 0.4, 0.1, 0.9], "a": [0.9, 0.1, 0.4, 0.1]}, "top"),  # lower on average, but not image by image
        ({"top": [0.3] * 4, "a": [0.3] * 4}, "top"),  # a tie
        ({"top": [0.1] * 4, "a": [0.5] * 4}, "top"),  # worse everywhere
        ({"top": None, "a": [0.1] * 4}, "top"),  # nothing to compare with: the plain probe stays
        ({"top": [0.5, 0.4, 0.6, 0.5], "a": None, "b": [0.3, 0.2, 0.41, 0.3]}, "b"),  # unmeasured ones sit out
    ],
)
def test_the_plain_probe_stays_unless_the_lowest_loss_beats_it_image_by_image(losses, expected):
    from ml.selection import best_by_paired_loss

    assert best_by_paired_loss(losses, incumbent="top", z=2.0)[0] == expected


def test_where_a_smaller_input_cannot_be_told_from_the_best_the_smaller_is_kept():
    from ml.selection import best_by_paired_loss

    rng = np.random.default_rng(0)
    hardness = rng.exponential(0.2, 1000)
    jitter = rng.normal(0.001, 0.02, 1000)  # worse by a hair: z about +1.2 against the best
    cost = {"top @ 240": 240**2, "blocks.4 @ 64": 64**2, "blocks.4 @ 240": 240**2}
    # Digits: both stage probes beat the top layer far; the 240-px one is lower by a hair, inside the noise.
    losses = {"top @ 240": hardness * 4, "blocks.4 @ 240": hardness * 0.5, "blocks.4 @ 64": hardness * 0.5 + jitter}
    assert np.mean(losses["blocks.4 @ 64"]) > np.mean(losses["blocks.4 @ 240"])
    assert best_by_paired_loss(losses, incumbent="top @ 240", z=2.0, cost=cost)[0] == "blocks.4 @ 64"
    assert best_by_paired_loss(losses, incumbent="top @ 240", z=2.0)[0] == "blocks.4 @ 240"  # cost unknown
    # Where the small input is clearly worse than the best, the best is kept, however cheap the other.
    losses["blocks.4 @ 64"] = hardness * 0.7
    assert best_by_paired_loss(losses, incumbent="top @ 240", z=2.0, cost=cost)[0] == "blocks.4 @ 240"


def test_paired_z_is_signed_and_needs_its_incumbent():
    from ml.selection import best_by_paired_loss, paired_z

    assert paired_z([0.1, 0.2], [0.1, 0.2]) == 0
    assert paired_z([0.25, 0.5], [0.5, 0.75]) == -math.inf  # lower by the same on every image
    assert paired_z([0.3, 0.5], [0.2, 0.3]) > 0
    with pytest.raises(ValueError, match="incumbent"):
        best_by_paired_loss({"a": [0.1]}, incumbent="top", z=2.0)


def test_flip_test_tolerates_a_few_images_of_noise_but_not_a_class_changing_mirror():
    from ml.selection import paired_margin

    n = 200  # 0.915 -> 0.895 with 6 + 2 discordant images (brain MRI's held-out reading): noise
    plain = np.array([1] * 183 + [0] * 17)
    mirror = plain.copy()
    mirror[:6], mirror[183:185] = 0, 1
    assert (plain.mean(), mirror.mean()) == (0.915, 0.895)
    assert invariance_holds(plain.mean(), mirror.mean(), tolerance=paired_margin(plain, mirror, floor=0.02))
    signs = np.array([1] * 190 + [0] * 10)  # 0.95 -> 0.80: a class-changing mirror
    mirrored = signs.copy()
    mirrored[:30] = 0
    assert len(plain) == n and not invariance_holds(
        signs.mean(), mirrored.mean(), tolerance=paired_margin(signs, mirrored, floor=0.02)
    )


def test_the_fine_tune_starts_from_the_lowest_loss_probe_at_the_smallest_input():
    from ml.backbones import Preprocessing
    from ml.fit import ChosenProbe, _finetune_start
    from ml.measure import Representation
    from ml.probe import fit_probe

    def rep(size: int) -> Representation:
        return Representation(Preprocessing(input_size=size, resize_size=size, mean=(0.5,) * 3, std=(0.25,) * 3), {})

    small, native = rep(64), rep(240)
    y = np.repeat([0, 1], 10)
    probe = fit_probe(np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32), y, 2)
    # Traffic signs' shape: the probe kept is at 240 px; at 64 px blocks.4 has the higher accuracy by a hair
    # and blocks.3 the lower loss, so the fine-tune starts from blocks.3 (at its own C).
    measured = [
        (small, "blocks.3", Candidate("blocks.3 @ 64 px", 0.941, 1.0, {"C": 0.1, "cv_loss": 0.167})),
        (small, "blocks.4", Candidate("blocks.4 @ 64 px", 0.942, 1.0, {"C": 1.0, "cv_loss": 0.207})),
        (native, "blocks.5", Candidate("blocks.5 @ 240 px", 0.961, 1.0, {"C": 1.0, "cv_loss": 0.1})),
    ]
    ranking = {c.name: (r, s, c) for r, s, c in measured}
    chosen = ChosenProbe(native, "blocks.5", probe, 20, ranking)
    start, stage, C = _finetune_start(chosen)
    assert (start.prep.input_size, stage, C) == (64, "blocks.3", 0.1)
    # Without losses (measured before they were kept), the accuracy ranks them.
    ranking = {n: (r, s, Candidate(c.name, c.score, 1.0, {"C": c.detail["C"]})) for n, (r, s, c) in ranking.items()}
    assert _finetune_start(ChosenProbe(native, "blocks.5", probe, 20, ranking))[1] == "blocks.4"
