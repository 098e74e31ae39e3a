"""Finders benchmark (issue 20): label errors and near-duplicates planted in real datasets, found again.

Run from the repo root (prints figures; not a pass/fail test, pytest does not collect it):

    .venv/bin/python -m tests.benchmarks.bench_curate [DATASET_ZIP ...] [--seed 0] [--cache DIR]

With no zips it runs every *.zip in the shared datasets dir (as tests/conftest.py finds it). Per dataset,
one after the other, two archives are written to a temporary folder (the shared zips are only read):
  1. noisy: 10 % of the training images (of the seeded split a fit makes, ml.dataset.split_samples) filed
     under another class, drawn at random (seed); the rest unchanged;
  2. copies: the dataset in split layout (train/ and val/ as that split), plus 5 % of the training images
     copied, re-encoded (JPEG quality 70), resized to half and cropped to the central 90 %, into val/
     under their own class (cross-split), and another 5 % (other images) into another training class
     (cross-class).
Each archive goes through the steps of ml.finders.find_issues, each timed: index, one frozen pass
(features), then the finders on those features at their defaults.

Per-dataset fields (one JSON line each, then a summary line):
  dataset, num_images, num_classes
  probe                    {C, cv_accuracy, cv_loss} of the out-of-fold probe on the NOISY labels
  clean_probe_cv_accuracy  the same probe's out-of-fold accuracy with the clean labels (same features)
  label_noise              {flipped, flagged, precision, recall, suggestion_accuracy (the suggestion is the
                            true class, among flipped images flagged), flagged_val}
  label_noise_by_C         precision and recall at every C of the probe's path (chosen: the CV log-loss pick)
  label_noise_by_filter    precision and recall of each cleanlab filter_by at the chosen C
  near_duplicates          per kind: {planted, found, true, recall, precision, among_originals}; among_originals:
                           pairs the finder reports between two of the dataset's own images (real
                           near-duplicates, such as GTSRB's frames of one sign, or false alarms: the
                           benchmark cannot tell); precision: planted pairs over the found pairs that
                           involve a planted copy
  copy_similarity          planted pairs' cosine similarity: min, p01, p05, median; and "distinct": each
                           original image's highest similarity to another original: p99, p999, max
  seconds                  {decode, features, label_issues, neighbours, near_duplicates, outliers} of the
                           noisy archive; finders_s (all but decode and features), find_issues_s (all)
  fit_s                    the fit's wall time (`python -m ml fit` strategy auto, fit_process_s) from
                           bench_engine's run in README.md ("Engine benchmark" table), same 2-core CPU
  finders_over_fit         find_issues_s / fit_s (the whole find_issues: index, frozen pass and finders)
  targets                  {label_issues (precision and recall >= 0.8 where clean_probe_cv_accuracy >= 0.9,
                           else null), near_duplicates (recall >= 0.9 and precision >= 0.95 for both planted
                           kinds), time (finders_over_fit <= 0.25)}

--cache DIR keeps each archive's features (keyed by its bytes and the backbone) so that reruns skip the
frozen pass; the seconds printed are then those of the run that filled the cache.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ml.dataset import Sample, index_dataset, split_samples
from ml.finders import FILTERS, ISSUE_CS, Embedding, FinderConfig, embed, find_in_embedding, rank_label_issues

FLIP_FRACTION = 0.10
COPY_FRACTION = 0.05  # of the training images, per kind
# bench_engine's fit_process_s per dataset (README.md, "Engine benchmark": EfficientNet-Lite1, seed 0,
# --budget 480, the 2-core CPU this benchmark runs on).
FIT_SECONDS = {
    "brain-mri-4class.zip": 425.9,
    "cats_vs_dogs_subset.zip": 239.1,
    "chest_xray_pneumonia_subset.zip": 89.5,
    "flowers-5class-small.zip": 336.7,
    "gtsrb-8class-signs.zip": 405.0,
    "hymenoptera.zip": 16.2,
    "neu-steel-defects-6class-small.zip": 117.6,
    "sklearn_digits.zip": 113.7,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def datasets_dir() -> Path:
    from tests.conftest import DATASETS

    return DATASETS


def degrade(data: bytes) -> bytes:
    """The benchmark's copy: half size, the central 90 %, JPEG quality 70."""
    img = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    img = img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.BILINEAR)
    w, h = img.size
    cw, ch = max(1, round(w * 0.9)), max(1, round(h * 0.9))
    left, top = (w - cw) // 2, (h - ch) // 2
    out = io.BytesIO()
    img.crop((left, top, left + cw, top + ch)).save(out, "JPEG", quality=70)
    return out.getvalue()


def _member(split: str, label: str, name: str) -> str:
    return f"{split}/{label}/{name}" if split else f"{label}/{name}"


def write_noisy(src: Path, dst: Path, train: list[Sample], val: list[Sample], classes: list[str], seed: int):
    """10 % of train filed under another class. Returns {new member: (true class, given class)}."""
    rng = random.Random(seed)
    flip = set(rng.sample(range(len(train)), max(1, round(FLIP_FRACTION * len(train)))))
    flipped: dict[str, tuple[str, str]] = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for i, s in enumerate(train + val):
            name = s.member
            if i in flip:
                new = rng.choice([c for c in classes if c != s.label])
                base = s.member.rsplit("/", 1)[-1]
                name = _member(s.split, new, f"flipped_{i}_{base}")
                flipped[name] = (s.label, new)
            zout.writestr(name, zin.read(s.member))
    return flipped


def write_copies(src: Path, dst: Path, train: list[Sample], val: list[Sample], classes: list[str], seed: int):
    """Split layout plus planted copies. Returns {(original, copy): kind}."""
    rng = random.Random(seed + 1)
    m = max(1, round(COPY_FRACTION * len(train)))
    picks = rng.sample(range(len(train)), min(len(train), 2 * m))
    planted: dict[tuple[str, str], str] = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        renamed = {}
        for split, group in (("train", train), ("val", val)):
            for s in group:
                renamed[s.member] = _member(split, s.label, s.member.rsplit("/", 1)[-1])
                zout.writestr(renamed[s.member], zin.read(s.member))
        for n, i in enumerate(picks):
            s = train[i]
            copy = degrade(zin.read(s.member))
            stem = s.member.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if n < m:
                name, kind = _member("val", s.label, f"copy_{i}_{stem}.jpg"), "cross-split"
            else:
                other = rng.choice([c for c in classes if c != s.label])
                name, kind = _member("train", other, f"copy_{i}_{stem}.jpg"), "cross-class"
            zout.writestr(name, copy)
            planted[(renamed[s.member], name)] = kind
    return planted


def embed_timed(archive: Path, config: FinderConfig, cache: Path | None) -> tuple[Embedding, dict[str, float]]:
    key = hashlib.sha256(archive.read_bytes() + config.backbone.encode()).hexdigest()[:20]
    cached = cache / f"{key}.npz" if cache else None
    if cached and cached.exists():
        z = np.load(cached, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        emb = Embedding(meta["classes"], meta["members"], z["labels"], meta["splits"], z["features"], z["coarse"])
        return emb, meta["seconds"]
    t0 = time.perf_counter()
    index = index_dataset(archive, config.ingest)
    t1 = time.perf_counter()
    emb = embed(archive, index, config)
    seconds = {"decode": t1 - t0, "features": time.perf_counter() - t1}
    if cached:
        cache.mkdir(parents=True, exist_ok=True)
        meta = {"classes": emb.classes, "members": emb.members, "splits": emb.splits, "seconds": seconds}
        np.savez(cached, labels=emb.labels, features=emb.features, coarse=emb.coarse, meta=json.dumps(meta))
    return emb, seconds


def _pr(flagged: set[str], truth: set[str]) -> dict[str, Any]:
    tp = len(flagged & truth)
    return {
        "flagged": len(flagged),
        "precision": round(tp / len(flagged), 4) if flagged else None,
        "recall": round(tp / len(truth), 4) if truth else None,
    }


def label_noise(emb: Embedding, flipped: dict[str, tuple[str, str]], config: FinderConfig) -> dict[str, Any]:
    from ml.probe import out_of_fold_proba

    findings = find_in_embedding(emb, config)
    truth = set(flipped)
    flagged = {i.member for i in findings.label_issues}
    right = sum(flipped[i.member][0] == i.suggested for i in findings.label_issues if i.member in truth)
    hit = len(flagged & truth)
    val = {m for m, s in zip(emb.members, emb.splits, strict=True) if s == "val"}
    noise = {
        "flipped": len(truth),
        **_pr(flagged, truth),
        "suggestion_accuracy": round(right / hit, 4) if hit else None,
        "flagged_val": len(flagged & val),
    }
    # The same features with every label as it was: the clean probe's accuracy, and the C path.
    class_id = {c: i for i, c in enumerate(emb.classes)}
    clean = np.array(
        [class_id[flipped[m][0]] if m in flipped else y for m, y in zip(emb.members, emb.labels, strict=True)]
    )
    clean_oof = out_of_fold_proba(
        emb.features, clean, len(emb.classes), Cs=ISSUE_CS, folds=config.folds, seed=config.seed
    )
    noisy_oof = out_of_fold_proba(
        emb.features, emb.labels, len(emb.classes), Cs=ISSUE_CS, folds=config.folds, seed=config.seed
    )
    by_c = []
    for C, proba in noisy_oof.by_C.items():
        flagged_c = _flagged(emb, proba, config.filter_by)
        by_c.append({"C": C, "chosen": C == noisy_oof.C, **_pr(flagged_c, truth)})
    by_filter = {f: _pr(_flagged(emb, noisy_oof.proba, f), truth) for f in FILTERS}
    return {
        "probe": findings.probe,
        "clean_probe_cv_accuracy": round(float((clean_oof.proba.argmax(1) == clean).mean()), 4),
        "label_noise": noise,
        "label_noise_by_C": by_c,
        "label_noise_by_filter": by_filter,
        "outliers": [o.member for o in findings.outliers[:3]],
        "finder_seconds": findings.timings,
    }


def _flagged(emb: Embedding, proba: np.ndarray, filter_by: str) -> set[str]:
    suggested = proba.argmax(1)
    return {emb.members[i] for i in rank_label_issues(emb.labels, proba, filter_by) if suggested[i] != emb.labels[i]}


def near_duplicates(emb: Embedding, planted: dict[tuple[str, str], str], config: FinderConfig) -> dict[str, Any]:
    findings = find_in_embedding(emb, config)
    truth = {frozenset(p): k for p, k in planted.items()}
    copies = {c for _, c in planted}
    out: dict[str, Any] = {}
    for kind in ("cross-class", "cross-split", "same-class"):
        found = [frozenset(d.members) for d in findings.near_duplicates if d.kind == kind]
        true = sum(truth.get(p) == kind for p in found)
        among = sum(not (p & copies) for p in found)
        planted_k = sum(k == kind for k in planted.values())
        out[kind] = {
            "planted": planted_k,
            "found": len(found),
            "true": true,
            "recall": round(true / planted_k, 4) if planted_k else None,
            "precision": round(true / (len(found) - among), 4) if len(found) > among else None,
            "among_originals": among,
        }
    return {"near_duplicates": out, "copy_similarity": copy_similarity(emb, planted)}


def copy_similarity(emb: Embedding, planted: dict[tuple[str, str], str]) -> dict[str, Any]:
    feats = emb.coarse if emb.coarse is not None else emb.features
    unit = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    pos = {m: i for i, m in enumerate(emb.members)}
    pairs = np.array([float(unit[pos[a]] @ unit[pos[b]]) for a, b in planted])
    copies = {pos[c] for _, c in planted}
    orig = np.array([i for i in range(len(unit)) if i not in copies])
    s = unit[orig] @ unit[orig].T
    np.fill_diagonal(s, -1)
    best = s.max(1)
    q = lambda a, p: round(float(np.quantile(a, p)), 4)  # noqa: E731
    return {
        "planted": {"min": q(pairs, 0), "p01": q(pairs, 0.01), "p05": q(pairs, 0.05), "median": q(pairs, 0.5)},
        "distinct": {"p99": q(best, 0.99), "p999": q(best, 0.999), "max": q(best, 1.0)},
    }


def run_dataset(archive: Path, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    config = FinderConfig(backbone=args.backbone, seed=args.seed)
    index = index_dataset(archive, config.ingest)
    train, val = split_samples(index, config.val_fraction, config.seed)
    noisy_zip, copies_zip = scratch / f"noisy-{archive.name}", scratch / f"copies-{archive.name}"
    flipped = write_noisy(archive, noisy_zip, train, val, index.classes, args.seed)
    planted = write_copies(archive, copies_zip, train, val, index.classes, args.seed)
    log(f"{archive.name}: {len(flipped)} flipped, {len(planted)} copies; noisy archive")
    emb, seconds = embed_timed(noisy_zip, config, args.cache)
    noise = label_noise(emb, flipped, config)
    log(f"{archive.name}: copies archive")
    emb_c, _ = embed_timed(copies_zip, config, args.cache)
    dups = near_duplicates(emb_c, planted, config)
    seconds = {**seconds, **noise.pop("finder_seconds")}
    finders_s = sum(v for k, v in seconds.items() if k not in ("decode", "features"))
    total = sum(seconds.values())
    fit_s = FIT_SECONDS.get(archive.name)
    ratio = round(total / fit_s, 3) if fit_s else None
    nd = dups["near_duplicates"]
    ln = noise["label_noise"]
    eligible = noise["clean_probe_cv_accuracy"] >= 0.9
    return {
        "dataset": archive.name,
        "num_images": len(emb.members),
        "num_classes": len(emb.classes),
        **noise,
        **dups,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "finders_s": round(finders_s, 2),
        "find_issues_s": round(total, 2),
        "fit_s": fit_s,
        "finders_over_fit": ratio,
        "targets": {
            "label_issues": ((ln["precision"] or 0) >= 0.8 and (ln["recall"] or 0) >= 0.8 if eligible else None),
            "near_duplicates": all(
                (nd[k]["recall"] or 0) >= 0.9 and (nd[k]["precision"] or 0) >= 0.95
                for k in ("cross-class", "cross-split")
            ),
            "time": ratio is not None and ratio <= 0.25,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("zips", nargs="*", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=FinderConfig().backbone)
    p.add_argument("--cache", type=Path, default=None, help="keep features here between runs")
    args = p.parse_args()
    zips = args.zips or sorted(datasets_dir().glob("*.zip"))
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-curate-") as tmp:
        for archive in zips:
            try:
                row = run_dataset(archive, args, Path(tmp))
            except Exception as exc:  # one dataset's failure does not stop the others
                row = {"dataset": archive.name, "error": f"{type(exc).__name__}: {exc}"}
            rows.append(row)
            print(json.dumps(row), flush=True)
    ok = [r for r in rows if "error" not in r]
    print(
        json.dumps(
            {
                "summary": True,
                "datasets": len(rows),
                "failed": [r["dataset"] for r in rows if "error" in r],
                "label_issues_missed": [r["dataset"] for r in ok if r["targets"]["label_issues"] is False],
                "near_duplicates_missed": [r["dataset"] for r in ok if not r["targets"]["near_duplicates"]],
                "time_missed": [r["dataset"] for r in ok if not r["targets"]["time"]],
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
