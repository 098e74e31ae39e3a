"""An explicit fine-tune is obeyed: what the user chose is what is trained and served, and the
measurement is reported beside it as advice; on auto the probe is kept unless the fine-tune wins."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from torch import nn

from ml.finetune import FinetuneResult
from ml.fit import _keep_finetune
from ml.run import Run


def _case(probe: float, tuned: float):
    chosen = SimpleNamespace(stage="top", rep=SimpleNamespace(name="native", prep=None))
    setup = SimpleNamespace(probe_hold=probe, hold_idx=np.arange(50), stage="top", rep=chosen.rep)
    result = FinetuneResult(
        model=nn.Sequential(),
        history=[SimpleNamespace(heldout_accuracy=probe), SimpleNamespace(heldout_accuracy=tuned)],
        best_epoch=1,
        stopped="early stopping",
        sanity=[],
        hyperparameters=SimpleNamespace(train_seconds=1.0),
    )
    return chosen, setup, result


def test_a_worse_fine_tune_is_kept_when_asked_for_and_the_advice_says_so(monkeypatch):
    monkeypatch.setattr("ml.fit._name", lambda stage, rep: f"{stage}@{rep.name}")
    run = Run()
    chosen, setup, result = _case(probe=0.80, tuned=0.76)
    assert _keep_finetune(run, chosen, setup, result, "partial", explicit=True)
    decision = run.decisions[-1].to_dict()
    assert decision["chosen"] == "partial fine-tune"
    assert "you chose the partial fine-tune" in decision["reason"]
    assert "the probe scored 80.0% and this fine-tune 76.0%" in decision["reason"]
    assert "auto would have kept the probe" in decision["reason"]
    assert any("advice:" in line for line in run.log)

    auto = Run()
    assert not _keep_finetune(auto, chosen, setup, result, "partial", explicit=False)
    assert auto.decisions[-1].to_dict()["chosen"] == "probe"
