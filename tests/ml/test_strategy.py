from __future__ import annotations

import pytest
import torch
from torch import nn

from ml.errors import ConfigError
from ml.similarity import BatchNormStats, Similarity, head_entropy, similarity_score
from ml.strategy import decide


def _sim(score: float) -> Similarity:
    return Similarity(score=score, bn_divergence=0.0, head_entropy=0.0)


@pytest.mark.parametrize(
    "ipc,score,cell,plan",
    [
        (122, 0.80, "small-similar", "linear"),
        (144, 0.19, "small-different", "stages"),
        (400, 0.70, "large-similar", "partial"),
        (1000, 0.20, "large-different", "full"),
        (299.9, 0.50, "small-similar", "linear"),  # boundaries: 300 is large, 0.5 is similar
        (300, 0.4999, "large-different", "full"),
    ],
)
def test_matrix(ipc, score, cell, plan):
    decided = decide(ipc, _sim(score), available=("linear", "stages", "partial", "full"))
    assert (decided.cell, decided.name) == (cell, plan)
    assert cell in decided.reason and f"{ipc:.0f} training images per class" in decided.reason


def test_override_and_unavailable_plans_say_so():
    decided = decide(50, _sim(0.9), override="full", available=("linear",))
    assert decided.cell == "small-similar" and decided.name == "linear"
    assert "chosen by the user" in decided.reason and "not available" in decided.reason
    with pytest.raises(ConfigError, match="auto, linear, stages, partial, full"):
        decide(50, _sim(0.9), override="magic")


def test_bn_divergence_is_zero_on_matching_statistics_and_grows_with_shift():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4).eval()
    bn.running_mean.fill_(1.0)
    bn.running_var.fill_(4.0)
    model = nn.Sequential(bn)
    with BatchNormStats(model) as same:
        model(1.0 + 2.0 * torch.randn(64, 4, 8, 8))
    with BatchNormStats(model) as shifted:
        model(5.0 + 0.5 * torch.randn(64, 4, 8, 8))
    assert same.divergence()[0] < 0.01 < 1.0 < shifted.divergence()[0]


def test_score_orders_similar_above_different():
    confident = head_entropy(torch.tensor([[20.0] + [0.0] * 999]))
    uniform = head_entropy(torch.zeros(1, 1000))
    assert confident < 0.01 and abs(uniform - 1.0) < 1e-9
    assert similarity_score([0.06, 0.05, 4.0], 0.23).score > 0.5 > similarity_score([1.1, 0.9, 200.0], 0.78).score


@pytest.mark.parametrize(
    "score,ipc,override,depth",
    [
        (0.8, 100, "auto", None),  # small-similar: probes only
        (0.2, 100, "auto", "partial"),  # small-different: a partial fine-tune may earn its keep
        (0.8, 500, "auto", "partial"),
        (0.2, 500, "auto", "full"),
        (0.2, 500, "linear", None),  # a probe plan the user picked means probes only
        (0.2, 100, "stages", None),
        (0.8, 100, "full", "full"),
    ],
)
def test_the_matrix_sets_the_finetune_allowance(score, ipc, override, depth):
    from ml.strategy import finetune_depth

    plan = decide(ipc, _sim(score), override=override)
    assert finetune_depth(plan, override) == depth


def test_every_cell_has_one_registered_plan():
    from ml.strategy import PLANS, REGISTRY, STRATEGIES

    assert sorted(PLANS) == ["large-different", "large-similar", "small-different", "small-similar"]
    assert STRATEGIES == ("auto", *REGISTRY) and all(REGISTRY[p].cell == c for c, p in PLANS.items())
