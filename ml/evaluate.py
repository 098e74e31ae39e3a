"""Validation metrics computed from logits."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

from ml.report import ClassMetrics, Metrics, Mistake, ReliabilityBin

TOP_KS = (1, 3, 5)
CALIBRATION_BINS = 15
MAX_MISCLASSIFIED = 200


def classification_metrics(
    logits: torch.Tensor, y: np.ndarray, classes: list[str], *, names: list[str] | None = None
) -> Metrics:
    """Metrics of validation `logits` (N, C) against integer labels `y` (N,) (ml.report.Metrics).

    Keys:
        val_accuracy, val_loss, macro_f1, num_val, per_class, confusion_matrix
        top_k_accuracy  {"top1": .., "top3": .., "top5": ..}; k > 1 only where k < number of classes
        ece             expected calibration error: |accuracy - confidence| per confidence bin
                        (15 equal-width bins of the max softmax probability), weighted by bin size
        reliability     the non-empty bins: [{lo, hi, count, confidence, accuracy}] for a reliability plot
        misclassified   only when `names` (validation file names, aligned with `y`) is given:
                        [{file, label, predicted, score}], score being the predicted class's softmax
                        probability, most confident mistakes first, at most 200
    """
    logits = logits.float()
    target = torch.as_tensor(y, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    probs = logits.softmax(1).numpy()
    pred = logits.argmax(1).numpy()
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    ece, reliability = calibration(probs.max(1), pred == y)
    return Metrics(
        val_accuracy=float((pred == y).mean()),
        val_loss=loss,
        macro_f1=float(f1.mean()),
        num_val=int(len(y)),
        per_class=[
            ClassMetrics(c, float(p), float(r), float(f), int(s))
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        ],
        confusion_matrix=confusion_matrix(y, pred, labels=labels).tolist(),
        top_k_accuracy=top_k_accuracies(probs, y),
        ece=ece,
        reliability=reliability,
        misclassified=[Mistake(**m) for m in misclassified(probs, y, classes, names)] if names is not None else [],
    )


def top_k_accuracies(probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """{"topK": accuracy} for K in TOP_KS; K > 1 only where it is below the number of classes."""
    n_classes = probs.shape[1]
    labels = list(range(n_classes))
    # sklearn wants the positive class's score alone in the binary case.
    scores = probs[:, 1] if n_classes == 2 else probs
    return {
        f"top{k}": float(top_k_accuracy_score(y, scores, k=k, labels=labels)) for k in TOP_KS if k == 1 or k < n_classes
    }


def calibration(
    confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS
) -> tuple[float, list[ReliabilityBin]]:
    """Expected calibration error and the non-empty reliability bins (lo, hi]."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece, reliability = 0.0, []
    for b in range(bins):
        in_bin = which == b
        count = int(in_bin.sum())
        if count == 0:
            continue
        conf, acc = float(confidence[in_bin].mean()), float(correct[in_bin].mean())
        ece += count / len(confidence) * abs(acc - conf)
        reliability.append(ReliabilityBin(float(edges[b]), float(edges[b + 1]), count, conf, acc))
    return float(ece), reliability


def misclassified(probs: np.ndarray, y: np.ndarray, classes: list[str], names: list[str]) -> list[dict[str, Any]]:
    """The wrong predictions, most confident first, at most MAX_MISCLASSIFIED."""
    if len(names) != len(y):
        raise ValueError(f"names has {len(names)} entries but there are {len(y)} labels")
    pred = probs.argmax(1)
    score = probs[np.arange(len(pred)), pred]
    wrong = np.flatnonzero(pred != y)
    wrong = wrong[np.argsort(-score[wrong], kind="stable")][:MAX_MISCLASSIFIED]
    return [
        {"file": names[i], "label": classes[y[i]], "predicted": classes[pred[i]], "score": float(score[i])}
        for i in wrong
    ]
