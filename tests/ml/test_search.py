"""`--search N`: coarse-to-fine random proposals, and the search picking the trial that scores best."""

import math
from types import SimpleNamespace

import numpy as np
import pytest

from ml.finetune import FinetuneConfig, FinetuneResult
from ml.run import Run
from ml.search import SPACE, Trial, propose, search


def _within(trial: Trial, ranges: dict) -> bool:
    return all(ranges[k][0] <= getattr(trial, k) <= ranges[k][1] for k in ranges)


def test_the_first_half_of_the_trials_spans_the_whole_space_log_uniformly():
    rng = np.random.default_rng(0)
    trials = [propose(400, [], rng) for _ in range(400)]
    assert all(_within(t, SPACE) for t in trials)
    lr = np.log10([t.lr_multiplier for t in trials])
    low, high = np.log10(SPACE["lr_multiplier"])
    # log-uniform: as many draws in the lower half of the decades as in the upper
    assert abs(np.mean(lr < (low + high) / 2) - 0.5) < 0.1


@pytest.mark.parametrize("n,done,fine", [(4, 0, False), (4, 1, False), (4, 2, True), (5, 2, False), (5, 3, True)])
def test_the_rest_are_drawn_within_a_decade_of_the_best_so_far(n, done, fine):
    rng = np.random.default_rng(1)
    best = Trial(0.1, 1e-4)
    scored = [(best, (0.9, -0.3))] + [(Trial(2.0, 1e-2), (0.5, -1.0))] * (done - 1)
    draws = [propose(n, scored[:done], rng) for _ in range(200)]
    around = {"lr_multiplier": (0.1 / math.sqrt(10), 0.1 * math.sqrt(10)), "weight_decay": (1e-4 / 3.17, 1e-4 * 3.17)}
    assert all(_within(t, around) for t in draws) is fine
    assert all(_within(t, SPACE) for t in draws)


def _row(accuracy: float, loss: float) -> SimpleNamespace:  # what search reads of an epoch's row
    return SimpleNamespace(heldout_accuracy=accuracy, heldout_loss=loss)


def test_search_returns_the_best_trials_knobs_and_records_every_trial():
    def trial(cfg: FinetuneConfig, number: int) -> FinetuneResult:
        # a toy landscape: held-out accuracy peaks at 0.3x the recipe's LR
        acc = 0.95 - 0.1 * abs(math.log10(cfg.lr_multiplier / 0.3))
        history = [_row(0.9, 0.3), _row(acc, 1 - acc)]
        assert cfg.max_epochs == cfg.pilot_epochs and cfg.overfit_steps == 0  # trials are short
        return FinetuneResult(None, history, 1, "", [], SimpleNamespace(train_seconds=2.0))

    run = Run()
    cfg, spent = search(run, 8, FinetuneConfig(), trial, 100, None, seed=0)
    decision = run.decisions[-1]
    assert decision.what == "search" and len(decision.candidates) == 8 and spent == 16.0
    best = max(decision.candidates, key=lambda c: c.score)
    assert decision.chosen == best.name == Trial(cfg.lr_multiplier, cfg.weight_decay).name
    assert cfg.max_epochs == FinetuneConfig().max_epochs  # the winner gets the full run
    assert abs(math.log10(cfg.lr_multiplier / 0.3)) < 0.5


def test_search_stops_at_half_the_time_budget():
    def trial(cfg, number):
        return FinetuneResult(None, [_row(0.5, 1.0)] * 2, 1, "", [], SimpleNamespace(train_seconds=30.0))

    run = Run()
    _, spent = search(run, 10, FinetuneConfig(), trial, 100, budget=100.0, seed=0)
    assert spent == 60.0 and len(run.decisions[-1].candidates) == 2


@pytest.mark.parametrize("n,ok", [(0, True), (1, True), (64, True), (65, False), (-1, False)])
def test_search_trials_are_bounded(n, ok):
    from ml.errors import ConfigError
    from ml.fit import MAX_SEARCH, FitConfig

    assert MAX_SEARCH == 64
    if ok:
        FitConfig(search=n).validate()
    else:
        with pytest.raises(ConfigError, match="search must be between 0 and 64"):
            FitConfig(search=n).validate()
