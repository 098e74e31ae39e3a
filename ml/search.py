"""`--search N`: a budgeted coarse-to-fine random search over the fine-tune's learning rate and weight decay.

Random search beats a grid when few of the knobs matter (Bergstra & Bengio 2012), and both
knobs act multiplicatively, so they are drawn log-uniformly. The first half of the trials
(rounded up) spans the whole space; the rest are drawn around the best trial so far, a
decade wide in each knob, clipped to the space. Every trial is a short fine-tune (the
pilot's epochs, with its own warmup and cosine) from the same probe, scored on the held-out
slice of the training split; the winner then gets the full run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np

from ml.finetune import FinetuneConfig, FinetuneResult
from ml.run import Run
from ml.selection import Candidate, Decision

# Learning rate as a multiple of the recipe's rule (1/10 of the original, batch-scaled), and weight decay.
SPACE = {"lr_multiplier": (0.03, 3.0), "weight_decay": (1e-6, 1e-2)}
FINE_WIDTH = 1.0  # decades around the best trial that the fine stage draws from


@dataclass(frozen=True)
class Trial:
    lr_multiplier: float
    weight_decay: float

    @property
    def name(self) -> str:
        return f"lr x{self.lr_multiplier:.3g}, wd {self.weight_decay:.1e}"


def propose(n: int, done: Sequence[tuple[Trial, tuple[float, float]]], rng: np.random.Generator) -> Trial:
    """The next of `n` trials, given the scored trials `done` ((trial, score) pairs; higher scores win)."""
    coarse = len(done) < math.ceil(n / 2) or not done
    if coarse:
        ranges = SPACE
    else:
        best = max(done, key=lambda d: d[1])[0]
        ranges = {knob: _around(getattr(best, knob), SPACE[knob]) for knob in SPACE}
    return Trial(**{knob: _log_uniform(rng, *ranges[knob]) for knob in SPACE})


def search(
    run: Run,
    n: int,
    base: FinetuneConfig,
    trial: Callable[[FinetuneConfig, int], FinetuneResult],
    n_hold: int,
    budget: float | None,
    seed: int,
) -> tuple[FinetuneConfig, float]:
    """(`base` with the winning trial's knobs, seconds all trials took). `trial(config, number)` runs
    one short fine-tune; with a time `budget`, trials stop once they have spent half of it."""
    rng = np.random.default_rng(seed)
    short = replace(base, max_epochs=base.pilot_epochs, patience=base.pilot_epochs, budget=None, overfit_steps=0)
    done: list[tuple[Trial, tuple[float, float], float]] = []
    spent = 0.0
    for i in range(n):
        t = propose(n, [(d[0], d[1]) for d in done], rng)
        run.say(f"search trial {i + 1}/{n}: {t.name}")
        result = trial(replace(short, lr_multiplier=t.lr_multiplier, weight_decay=t.weight_decay), i + 1)
        done.append((t, _trained_best(result), result.hyperparameters.train_seconds))
        spent += result.hyperparameters.train_seconds
        if budget is not None and spent >= budget / 2:
            run.say(f"search stopped after {i + 1} trial(s): half of the {budget:.0f} s budget spent")
            break
    best = max(done, key=lambda d: d[1])[0]
    run.decide(
        Decision(
            "search",
            best.name,
            tuple(Candidate(t.name, score[0], seconds) for t, score, seconds in done),
            f"random search, log-uniform: the first {math.ceil(n / 2)} trial(s) over the whole space, the rest "
            f"{FINE_WIDTH:g} decade around the best so far; each a {short.max_epochs}-epoch fine-tune from the probe",
            metric=f"best accuracy on {n_hold} held-out training images within a trial",
        )
    )
    run.say(f"search: {best.name} wins")
    return replace(base, lr_multiplier=best.lr_multiplier, weight_decay=best.weight_decay), spent


def _trained_best(result: FinetuneResult) -> tuple[float, float]:
    """(accuracy, -loss) of a trial's best *trained* epoch: epoch 0 is the probe every trial shares, and
    a trial still recovering from its first pass ranks as such, not as the probe."""
    rows = result.history[1:]
    return max(((r.heldout_accuracy, -r.heldout_loss) for r in rows), default=(0.0, -math.inf))


def _around(value: float, bounds: tuple[float, float]) -> tuple[float, float]:
    half = 10 ** (FINE_WIDTH / 2)
    return max(bounds[0], value / half), min(bounds[1], value * half)


def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


__all__ = ["SPACE", "Trial", "propose", "search"]
