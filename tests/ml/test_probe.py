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


def test_the_probe_keeps_each_images_out_of_fold_loss_at_its_c():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), 40)
    X = (rng.normal(0, 2, (3, 8))[y] + rng.normal(0, 1, (len(y), 8))).astype(np.float32)
    probe = fit_probe(X, y, 3)
    row = next(r for r in probe.history if r["C"] == probe.C)
    assert probe.oof_loss is not None and probe.oof_loss.shape == (len(y),)
    assert probe.oof_loss.mean() == pytest.approx(row["cv_loss"], rel=1e-6)


def test_every_view_of_the_same_rows_is_cross_validated_on_the_same_folds(monkeypatch):
    # The representation rule compares the views' losses image by image: the folds must not depend on X.
    import ml.probe

    held_out: list[list[tuple[int, ...]]] = []

    class Recording(ml.probe.StratifiedKFold):
        def split(self, X, y=None, groups=None):
            folds = [(tr, te) for tr, te in super().split(X, y, groups)]
            held_out.append([tuple(te) for _, te in folds])
            yield from folds

    monkeypatch.setattr(ml.probe, "StratifiedKFold", Recording)
    rng = np.random.default_rng(2)
    y = np.repeat(np.arange(3), 30)
    fit_probe(rng.normal(size=(len(y), 8)).astype(np.float32), y, 3)
    fit_probe(rng.normal(size=(len(y), 64)).astype(np.float32), y, 3)  # another view: other width, other values
    assert len(held_out) == 2 and held_out[0] == held_out[1]


def test_a_probe_with_nothing_to_cross_validate_has_no_out_of_fold_loss():
    X = np.arange(10, dtype=np.float32).reshape(5, 2)
    y = np.array([0, 0, 0, 0, 1])  # one image of class 1: no fold can hold it out and still learn it
    assert fit_probe(X, y, 2).oof_loss is None
