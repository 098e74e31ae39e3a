"""Linear probe: L2-regularised logistic regression on cached features.

The regularisation strength C is chosen by stratified k-fold cross-validation on
the training features, so the validation split stays untouched for reporting.
The fitted scaler + classifier fold into a single `nn.Linear` for export.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch import nn

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))


@dataclass
class ProbeFit:
    linear: nn.Linear  # raw features -> logits
    C: float
    history: list[dict[str, Any]]  # one row per C tried: C, cv_accuracy, cv_loss
    # each image's out-of-fold log loss at C, in the order of the rows fitted; None where nothing could be
    # cross-validated. Probes fitted on the same rows with the same seed share their folds, so these
    # compare image by image (ml.selection.paired_z).
    oof_loss: np.ndarray | None = None


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    Cs: tuple[float, ...] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
    on_fit: Callable[[int, int], None] | None = None,
) -> ProbeFit:
    """Fit the probe (each C's CV row in its history). `on_fit(done, total)` ticks after every
    (fold, C) fit, so a caller can show progress, or cancel by raising, during long searches."""
    scaler = StandardScaler().fit(X)
    Xs = scaler.transform(X).astype(np.float32)
    Cs = tuple(sorted(Cs))  # ascending, so each fit warm-starts from the more regularised one
    k = int(min(folds, np.bincount(y, minlength=num_classes).min()))
    scores, per_image = _cv_scores(Xs, y, Cs, k, seed, num_classes, on_fit)
    history: list[dict[str, Any]] = [
        {"step": step, "C": C, "cv_accuracy": acc, "cv_loss": loss}
        for step, (C, (acc, loss)) in enumerate(zip(Cs, scores, strict=True), start=1)
    ]
    # Log loss, not accuracy, picks C: a proper scoring rule, smooth where accuracy on a few hundred
    # images ties, and it keeps the probabilities calibrated (ECE is reported).
    best = min(history, key=lambda r: (r["cv_loss"], -r["cv_accuracy"]))
    clf = _logreg(best["C"], seed).fit(Xs, y)
    oof = per_image[Cs.index(best["C"])]
    return ProbeFit(
        _fold_into_linear(scaler, clf, num_classes), best["C"], history, None if np.isnan(oof).any() else oof
    )


def _logreg(C: float, seed: int, **kw: Any) -> LogisticRegression:
    return LogisticRegression(C=C, max_iter=2000, class_weight="balanced", random_state=seed, **kw)


def _cv_scores(
    X: np.ndarray,
    y: np.ndarray,
    Cs: tuple[float, ...],
    k: int,
    seed: int,
    num_classes: int,
    on_fit: Callable[[int, int], None] | None = None,
) -> tuple[list[tuple[float, float]], np.ndarray]:
    """(accuracy, log loss) per C, pooled over k stratified folds, and each image's out-of-fold log loss per
    C, (len(Cs), N): the pooled loss is its mean (NaN throughout where nothing could be cross-validated).

    Within a fold the C path is walked upwards with warm starts and a looser
    tolerance (the ranking of Cs does not need the last digits): ~3x faster.
    """
    per_image = np.full((len(Cs), len(y)), np.nan)
    if k < 2:  # a class with a single training image: nothing to cross-validate on
        return [(float("nan"), float("nan"))] * len(Cs), per_image
    correct = np.zeros(len(Cs))
    done = 0
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y):
        clf = _logreg(Cs[0], seed, warm_start=True, tol=1e-3)
        for i, C in enumerate(Cs):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.set_params(C=C).fit(X[tr], y[tr])
            proba = _full_proba(clf, X[te], num_classes)
            correct[i] += int((proba.argmax(1) == y[te]).sum())
            eps = np.finfo(proba.dtype).eps  # clipped as sklearn's log_loss clips
            per_image[i, te] = -np.log(np.clip(proba[np.arange(len(te)), y[te]], eps, 1 - eps))
            done += 1
            if on_fit:
                on_fit(done, k * len(Cs))
    scores = [(float(c / len(y)), float(loss)) for c, loss in zip(correct, per_image.mean(1), strict=True)]
    return scores, per_image


def _full_proba(clf: LogisticRegression, X: np.ndarray, num_classes: int) -> np.ndarray:
    proba = np.zeros((len(X), num_classes))
    proba[:, clf.classes_] = clf.predict_proba(X)
    normalised: np.ndarray = proba / proba.sum(axis=1, keepdims=True)  # exact renormalisation for log_loss
    return normalised


def _fold_into_linear(scaler: StandardScaler, clf: LogisticRegression, num_classes: int) -> nn.Linear:
    """One Linear equal to scaler -> logistic regression, for any number of classes."""
    W = clf.coef_ / scaler.scale_  # (K', D)
    b = clf.intercept_ - W @ scaler.mean_
    if W.shape[0] == 1:  # binary: sklearn keeps one row; softmax([-z/2, z/2]) == sigmoid(z)
        W = np.vstack([-W / 2, W / 2])
        b = np.array([-b[0] / 2, b[0] / 2])
    full_W = np.zeros((num_classes, W.shape[1]))
    full_b = np.full(num_classes, -1e4)  # a class absent from training is never predicted
    full_W[clf.classes_] = W
    full_b[clf.classes_] = b
    linear = nn.Linear(W.shape[1], num_classes)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(full_W))
        linear.bias.copy_(torch.from_numpy(full_b))
    return linear


def fit_probe_at(X: np.ndarray, y: np.ndarray, num_classes: int, *, C: float, seed: int = 0) -> nn.Linear:
    """The probe at a known C (no search): for refits on a subset, e.g. the fine-tune's starting head."""
    scaler = StandardScaler().fit(X)
    clf = _logreg(C, seed).fit(scaler.transform(X).astype(np.float32), y)
    return _fold_into_linear(scaler, clf, num_classes)


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold predicted probabilities of the probe at the C that cross-validates best."""

    proba: np.ndarray  # (N, K): each row from the probe fitted on the folds that left it out
    C: float
    history: list[dict[str, Any]]  # one row per C tried: C, cv_accuracy, cv_loss
    by_C: dict[float, np.ndarray]  # every C's out-of-fold probabilities (for measuring the choice)


def out_of_fold_proba(
    X: np.ndarray,
    y: np.ndarray,
    num_classes: int,
    *,
    Cs: tuple[float, ...] = DEFAULT_CS,
    folds: int = 5,
    seed: int = 0,
    repeats: int = 1,
) -> OutOfFold:
    """The probe's stratified k-fold out-of-fold probabilities, with C chosen by the pooled log loss
    (as `fit_probe` chooses it): what confident learning ranks label errors from.

    With `repeats` > 1, the k-fold is run again at the chosen C with other fold assignments (seeds
    seed+1, ...) and the probabilities are averaged: an image's out-of-fold estimate then depends
    less on which images happened to share its fold."""
    Xs = StandardScaler().fit_transform(X).astype(np.float32)
    Cs = tuple(sorted(Cs))
    k = int(min(folds, np.bincount(y, minlength=num_classes).min()))
    if k < 2:
        raise ValueError("every class needs at least 2 images for out-of-fold probabilities")
    by_C = {C: np.zeros((len(y), num_classes)) for C in Cs}
    _k_fold(Xs, y, Cs, k, seed, num_classes, by_C)
    labels = list(range(num_classes))
    history = [
        {
            "C": C,
            "cv_accuracy": float((p.argmax(1) == y).mean()),
            "cv_loss": float(log_loss(y, p, labels=labels)),
        }
        for C, p in by_C.items()
    ]
    best = min(history, key=lambda r: (r["cv_loss"], -r["cv_accuracy"]))
    proba = by_C[best["C"]]
    if repeats > 1:
        proba = np.mean([proba, *_repeats(Xs, y, tuple(c for c in Cs if c <= best["C"]), k, seed, repeats - 1)], axis=0)
    return OutOfFold(proba, best["C"], history, by_C)


def _repeats(Xs: np.ndarray, y: np.ndarray, path: tuple[float, ...], k: int, seed: int, n: int) -> list[np.ndarray]:
    """`n` more k-fold runs at C, the last of `path` (fold seeds seed+1, ...), each fold warm-started from
    the probe fitted on all images (its C `path` walked up to C): close to each fold's optimum, so a few
    iterations each."""
    C, num_classes = path[-1], int(y.max()) + 1  # every class has k >= 2 images here
    ref = _logreg(path[0], seed, warm_start=True, tol=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for c in path:
            ref.set_params(C=c).fit(Xs, y)
    runs = []
    for r in range(1, n + 1):
        proba = np.zeros((len(y), num_classes))
        for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed + r).split(Xs, y):
            clf = _logreg(C, seed, warm_start=True, tol=1e-3)
            clf.coef_, clf.intercept_ = ref.coef_.copy(), ref.intercept_.copy()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.fit(Xs[tr], y[tr])
            proba[te] = _full_proba(clf, Xs[te], num_classes)
        runs.append(proba)
    return runs


def _k_fold(
    Xs: np.ndarray,
    y: np.ndarray,
    Cs: tuple[float, ...],
    k: int,
    seed: int,
    num_classes: int,
    out: dict[float, np.ndarray],
) -> None:
    """Fill out[C] with each C's out-of-fold probabilities (the C path walked upwards, warm-started)."""
    for tr, te in StratifiedKFold(k, shuffle=True, random_state=seed).split(Xs, y):
        clf = _logreg(Cs[0], seed, warm_start=True, tol=1e-3)
        for C in Cs:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                clf.set_params(C=C).fit(Xs[tr], y[tr])
            out[C][te] = _full_proba(clf, Xs[te], num_classes)
