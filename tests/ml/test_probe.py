from __future__ import annotations

import numpy as np
import pytest
import torch

from ml.probe import fit_probe


@pytest.mark.parametrize("num_classes", [2, 3])
def test_folded_linear_matches_a_separable_problem(num_classes):
    rng = np.random.default_rng(0)
    centers = rng.normal(0, 5, (num_classes, 16))
    y = np.repeat(np.arange(num_classes), 30)
    X = (centers[y] + rng.normal(0, 1, (len(y), 16)) + 3.0).astype(np.float32)  # offset: scaler matters
    probe = fit_probe(X, y, num_classes)
    with torch.no_grad():
        pred = probe.linear(torch.from_numpy(X)).argmax(1).numpy()
    assert (pred == y).mean() > 0.95
    assert len(probe.history) == 6 and probe.C in [row["C"] for row in probe.history]
