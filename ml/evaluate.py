"""Validation metrics computed from logits."""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support


def classification_metrics(logits: torch.Tensor, y: np.ndarray, classes: list[str]) -> dict:
    logits = logits.float()
    target = torch.as_tensor(y, dtype=torch.long)
    loss = torch.nn.functional.cross_entropy(logits, target).item()
    pred = logits.argmax(1).numpy()
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    return {
        "val_accuracy": float((pred == y).mean()),
        "val_loss": loss,
        "macro_f1": float(f1.mean()),
        "num_val": int(len(y)),
        "per_class": [
            {"label": c, "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
            for c, p, r, f, s in zip(classes, precision, recall, f1, support, strict=True)
        ],
        "confusion_matrix": confusion_matrix(y, pred, labels=labels).tolist(),
    }
