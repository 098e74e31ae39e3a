from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.evaluate import classification_metrics


def logits_for(probs: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is exactly `probs` (rows sum to 1)."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_calibrated_predictions_have_zero_ece():
    # Five predictions at 80% confidence, four of them right.
    logits = logits_for([[0.8, 0.2]] * 5)
    y = np.array([0, 0, 0, 0, 1])
    m = classification_metrics(logits, y, ["a", "b"]).to_json()
    assert m["ece"] == pytest.approx(0.0, abs=1e-6)
    (bin_,) = m["reliability"]
    assert bin_["count"] == 5
    assert bin_["lo"] <= bin_["confidence"] <= bin_["hi"]
    assert bin_["confidence"] == pytest.approx(0.8)
    assert bin_["accuracy"] == pytest.approx(0.8)


def test_overconfident_predictions_have_large_ece():
    # Two bins: 99% confident and half right; 60% confident and all right.
    logits = logits_for([[0.99, 0.01]] * 4 + [[0.4, 0.6]] * 4)
    y = np.array([0, 0, 1, 1, 1, 1, 1, 1])
    m = classification_metrics(logits, y, ["a", "b"]).to_json()
    assert m["ece"] == pytest.approx(0.5 * (0.99 - 0.5) + 0.5 * (1.0 - 0.6), abs=1e-6)
    assert [b["count"] for b in m["reliability"]] == [4, 4]
    assert [b["accuracy"] for b in m["reliability"]] == [1.0, 0.5]


def test_top_k_accuracy_only_for_k_below_the_number_of_classes():
    ranked = [0.5, 0.2, 0.12, 0.08, 0.06, 0.04]
    # Label 0 ranks 1st, label 2 ranks 3rd, label 5 ranks 6th.
    m = classification_metrics(logits_for([ranked] * 3), np.array([0, 2, 5]), list("abcdef")).to_json()
    assert m["top_k_accuracy"] == pytest.approx({"top1": 1 / 3, "top3": 2 / 3, "top5": 2 / 3})

    two = classification_metrics(logits_for([[0.7, 0.3], [0.1, 0.9]]), np.array([0, 0]), ["a", "b"]).to_json()
    assert two["top_k_accuracy"] == {"top1": 0.5}
    four = classification_metrics(torch.eye(4), np.array([0, 1, 2, 0]), list("abcd")).to_json()
    assert set(four["top_k_accuracy"]) == {"top1", "top3"}


def test_misclassified_lists_most_confident_mistakes_first():
    logits = logits_for([[0.6, 0.3, 0.1], [0.1, 0.9, 1e-9], [0.2, 0.2, 0.6], [0.3, 0.3, 0.4]])
    y = np.array([1, 0, 2, 0])
    m = classification_metrics(logits, y, ["cat", "dog", "fox"], names=["w.jpg", "x.jpg", "y.jpg", "z.jpg"]).to_json()
    assert [e["file"] for e in m["misclassified"]] == ["x.jpg", "w.jpg", "z.jpg"]
    assert m["misclassified"][0] == {"file": "x.jpg", "label": "cat", "predicted": "dog", "score": pytest.approx(0.9)}
    assert classification_metrics(logits, y, ["cat", "dog", "fox"]).misclassified == []


def test_misclassified_is_capped():
    logits = torch.randn(300, 2, generator=torch.Generator().manual_seed(0))
    y = 1 - logits.argmax(1).numpy()  # every prediction wrong
    m = classification_metrics(logits, y, ["a", "b"], names=[f"{i}.png" for i in range(300)]).to_json()
    scores = [e["score"] for e in m["misclassified"]]
    assert len(scores) == 200
    assert scores == sorted(scores, reverse=True)
