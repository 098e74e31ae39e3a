"""Finders benchmark (issue 20): label errors and near-duplicates planted in real datasets, found again,
and what accepting the finder's suggestions gives back to `ml fit`.

Run from the repo root (prints figures; not a pass/fail test, pytest does not collect it):

    .venv/bin/python -m tests.benchmarks.bench_curate [ZIP ...] [--datasets a,b] [--fit-budget 60]
        [--no-fit | --fit-datasets a,b] [--repeat 3] [--diagnose] [--seed 0]

With no zips it runs every *.zip in the shared datasets dir (as tests/conftest.py finds it); `--datasets`
keeps those whose file name starts with one of the given names (`--datasets hymenoptera,neu`), in that
order; `--fit-datasets` fits only those (three fits per dataset are most of a run's time), the rest get
the finders' figures alone. Per dataset,
one after the other, four archives are written to a temporary folder (the shared zips are only read), all
in split layout: train/ and val/ as the seeded split a fit makes (ml.splits.split_samples), so every fit
below is scored on the same validation images with their true labels:
  1. clean: the dataset as it is;
  2. noisy: 10 % of the training images (drawn at random, seeded) filed under another class;
  3. corrected: the noisy archive with the finder's suggestions accepted: every flagged training image
     filed under its suggested class (flagged validation images are counted, not moved: the yardstick
     stays the true labels);
  4. copies: the clean archive plus 5 % of the training images copied, re-encoded (JPEG quality 70),
     resized to half and cropped to the central 90 %, into val/ under their own class (cross-split), and
     another 5 % (other images) into another training class (cross-class).

Per-dataset fields (one JSON line each, then a summary line):
  dataset, num_images, num_classes
  probe                    {view, C, cv_accuracy, cv_loss, views} of the label finder's out-of-fold probe on
                           the NOISY labels (ml.finders.label_probabilities: the view it read, each view's log loss)
  clean_probe_cv_accuracy  the label finder's out-of-fold accuracy with the clean labels (same features; the
                           view whose log loss is lowest on them, see ml.finders.MEAN_VIEW)
  label_noise              {flipped, flagged, precision, recall, suggestion_accuracy (the suggestion is the
                           true class, among flipped images flagged), flagged_val, relabelled}
  fit                      val accuracy of `ml fit` (strategy auto, --budget FIT_BUDGET) on clean, noisy and
                           corrected; recovered: (corrected - noisy) / (clean - noisy), null when the noise
                           cost under 1 point; seconds of each fit (in this process, index given) and their
                           median; {clean,noisy,corrected}_model: what each trained ("probe from blocks.3 @
                           240 px": the finetune decision, from the representation its probe read)
  near_duplicates          per kind: {planted, found, true, recall, precision, among_originals,
                           originals (the first such pairs)}. precision is strict: planted pairs found over
                           every pair of that kind found, those between two of the dataset's own images
                           included (they may be real near-duplicates, such as GTSRB's frames of one sign or
                           NEU's neighbouring crops of one strip: `originals` names them to look at)
  copy_ratio               the ratio test's value (distance over the next neighbour's, see
                           ml.finders.DUPLICATE_RATIO) of the planted pairs: max, p95, median, share that
                           are mutual nearest neighbours; and the lowest of the other mutual pairs per kind
  seconds                  find_issues on the noisy archive as the app runs it (its index given, no cache):
                           features (one decode, both views), label_issues, near_duplicates, outliers;
                           finders_s their sum (median of --repeat runs); index_s the ingestion's index
  fit.noisy_after_finders  val accuracy and seconds (`_s`) of the fit on the noisy archive that reads the store
                           the finders filled (as a fit that follows them in the app does: their features
                           are the fit's own, so it extracts none); `*_features_s`: each fit's features phase
  finders_added_s          what the finders add to the pipeline: finders_s less the seconds that fit saved,
                           noisy_features_s - noisy_after_finders_features_s (the features phases: the whole
                           fits' seconds differ by a budgeted fine-tune's run-to-run spread)
  finders_over_fit         finders_added_s / the fit's seconds (the median of the three fits)
  finders_alone_over_fit   finders_s / the fit's seconds (as if nothing they measure were used again)
  cached_s                 find_issues again with the cache the first run filled (nothing embedded)
  targets                  {label_issues (precision and recall >= 0.8 where clean_probe_cv_accuracy >= 0.9,
                           else null), recovered (>= 0.8, where label_issues applies), near_duplicates
                           (recall >= 0.9 and precision >= 0.95 for both planted kinds), time
                           (finders_over_fit <= 0.25)}
"""

from __future__ import annotations

import argparse
import io
import json
import random
import statistics
import sys
import tempfile
import time
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ml.dataset import DatasetIndex, Sample, index_dataset
from ml.finders import (
    FILTERS,
    ISSUE_CS,
    Embedding,
    EmbeddingCache,
    FinderConfig,
    Findings,
    embed,
    find_issues,
    find_near_duplicates,
    label_probabilities,
    nearest,
    rank_label_issues,
)
from ml.splits import split_samples

FLIP_FRACTION = 0.10
COPY_FRACTION = 0.05  # of the training images, per kind
KINDS = ("cross-class", "cross-split")


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


def _name(split: str, label: str, member: str, n: int) -> str:
    """A member's name in a written archive: numbered, as two classes may hold files of one name."""
    return f"{split}/{label}/{n:05d}_{member.rsplit('/', 1)[-1]}"


def write_split(src: Path, dst: Path, train: list[Sample], val: list[Sample], labels: dict[str, str]) -> dict[str, str]:
    """The split as train/ and val/ folders, each image under labels.get(member, its own label).
    Returns {original member: new member}."""
    renamed: dict[str, str] = {}
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for split, group in (("train", train), ("val", val)):
            for s in group:
                renamed[s.member] = _name(split, labels.get(s.member, s.label), s.member, len(renamed))
                zout.writestr(renamed[s.member], zin.read(s.member))
    return renamed


def plant_noise(train: list[Sample], classes: list[str], seed: int) -> dict[str, str]:
    """10 % of train under another class: {original member: the class it is filed under}."""
    rng = random.Random(seed)
    flip = rng.sample(range(len(train)), max(1, round(FLIP_FRACTION * len(train))))
    return {train[i].member: rng.choice([c for c in classes if c != train[i].label]) for i in sorted(flip)}


def write_copies(src: Path, dst: Path, train: list[Sample], val: list[Sample], classes: list[str], seed: int):
    """Split layout plus planted copies. Returns {(original, copy): kind}."""
    rng = random.Random(seed + 1)
    m = max(1, round(COPY_FRACTION * len(train)))
    picks = rng.sample(range(len(train)), min(len(train), 2 * m))
    planted: dict[tuple[str, str], str] = {}
    renamed = write_split(src, dst, train, val, {})
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "a", zipfile.ZIP_STORED) as zout:
        for n, i in enumerate(picks):
            s = train[i]
            stem = s.member.rsplit("/", 1)[-1].rsplit(".", 1)[0]
            if n < m:
                name, kind = f"val/{s.label}/copy_{i}_{stem}.jpg", "cross-split"
            else:
                other = rng.choice([c for c in classes if c != s.label])
                name, kind = f"train/{other}/copy_{i}_{stem}.jpg", "cross-class"
            zout.writestr(name, degrade(zin.read(s.member)))
            planted[(renamed[s.member], name)] = kind
    return planted


def _pr(flagged: set[str], truth: set[str]) -> dict[str, Any]:
    tp = len(flagged & truth)
    return {
        "flagged": len(flagged),
        "precision": round(tp / len(flagged), 4) if flagged else None,
        "recall": round(tp / len(truth), 4) if truth else None,
    }


def time_finders(archive: Path, index: DatasetIndex, config: FinderConfig, repeat: int):
    """find_issues as the app runs it (index given, no cache): the findings, the cache it filled, the
    median seconds per phase over `repeat` runs, and a run with that cache."""
    runs: list[dict[str, float]] = []
    for _ in range(repeat):
        cache = EmbeddingCache()
        findings = find_issues(archive, config, index=index, cache=cache)
        runs.append(findings.timings)
        if sum(findings.timings.values()) > 60:  # long enough that one run is a fair figure
            break
    seconds = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    seconds["finders_s"] = statistics.median(sum(r.values()) for r in runs)
    start = time.perf_counter()
    again = find_issues(archive, config, index=index, cache=cache)
    seconds["cached_s"] = time.perf_counter() - start
    assert again.embedded == 0 and again.near_duplicates == findings.near_duplicates
    seconds["runs"] = len(runs)
    return findings, cache, seconds


def label_noise(
    findings: Findings, emb: Embedding, truth: dict[str, str], config: FinderConfig, diagnose: bool
) -> dict[str, Any]:
    """truth: {member in the noisy archive: its true class} for the flipped images."""
    from ml.probe import out_of_fold_proba

    flagged = {i.member for i in findings.label_issues}
    right = sum(truth[i.member] == i.suggested for i in findings.label_issues if i.member in truth)
    hit = len(flagged & set(truth))
    noise = {
        "flipped": len(truth),
        **_pr(flagged, set(truth)),
        "suggestion_accuracy": round(right / hit, 4) if hit else None,
        "flagged_val": sum(m.startswith("val/") for m in flagged),
    }
    class_id = {c: i for i, c in enumerate(emb.classes)}
    clean = np.array([class_id[truth[m]] if m in truth else y for m, y in zip(emb.members, emb.labels, strict=True)])
    clean_proba, _ = label_probabilities(replace(emb, labels=clean), config)
    out: dict[str, Any] = {
        "probe": findings.probe,
        "clean_probe_cv_accuracy": round(float((clean_proba.argmax(1) == clean).mean()), 4),
        "label_noise": noise,
    }
    if diagnose:
        noisy_oof = out_of_fold_proba(
            emb.features, emb.labels, len(emb.classes), Cs=ISSUE_CS, folds=config.folds, seed=config.seed
        )
        out["label_noise_by_C"] = [
            {"C": C, "chosen": C == noisy_oof.C, **_pr(_flagged(emb, p, config.filter_by), set(truth))}
            for C, p in noisy_oof.by_C.items()
        ]
        out["label_noise_by_filter"] = {f: _pr(_flagged(emb, noisy_oof.proba, f), set(truth)) for f in FILTERS}
    return out


def _flagged(emb: Embedding, proba: np.ndarray, filter_by: str) -> set[str]:
    suggested = proba.argmax(1)
    return {emb.members[i] for i in rank_label_issues(emb.labels, proba, filter_by) if suggested[i] != emb.labels[i]}


def near_duplicates(emb: Embedding, planted: dict[tuple[str, str], str], config: FinderConfig) -> dict[str, Any]:
    """The near-duplicate finder alone (as find_in_embedding runs it) on the copies archive."""
    feats = emb.coarse if emb.coarse is not None else emb.features
    unit = (feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)).astype(np.float32)
    found_pairs = find_near_duplicates(emb, nearest(unit, k=2), config.duplicate_ratio)
    truth = {frozenset(p): k for p, k in planted.items()}
    copies = {c for _, c in planted}
    out: dict[str, Any] = {}
    for kind in (*KINDS, "same-class"):
        found = [frozenset(d.members) for d in found_pairs if d.kind == kind]
        true = sum(truth.get(p) == kind for p in found)
        originals = [sorted(p) for p in found if not (p & copies)]
        planted_k = sum(k == kind for k in planted.values())
        out[kind] = {
            "planted": planted_k,
            "found": len(found),
            "true": true,
            "recall": round(true / planted_k, 4) if planted_k else None,
            "precision": round(true / len(found), 4) if found and planted_k else None,
            "among_originals": len(originals),
            "originals": originals[:5],
        }
    return {"near_duplicates": out, "copy_ratio": copy_ratio(emb, planted)}


def copy_ratio(emb: Embedding, planted: dict[tuple[str, str], str]) -> dict[str, Any]:
    """The ratio test's value for the planted pairs, and the lowest among the other mutual pairs."""
    feats = emb.coarse if emb.coarse is not None else emb.features
    unit = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    index, sim = nearest(unit.astype(np.float32), k=2)
    pos = {m: i for i, m in enumerate(emb.members)}

    def ratio(a: int, b: int) -> float:
        d = 1 - float(unit[a] @ unit[b])
        runner = [float(s) for j, s in zip(index[a], sim[a], strict=True) if j != b]
        runner += [float(s) for j, s in zip(index[b], sim[b], strict=True) if j != a]
        return d / max(1e-9, 1 - max(runner))

    pairs = [(pos[a], pos[b]) for a, b in planted]
    mutual = [index[a, 0] == b and index[b, 0] == a for a, b in pairs]
    r = np.array([ratio(a, b) for a, b in pairs])
    planted_set = {frozenset(p) for p in pairs}
    others: dict[str, float] = {}
    for a in range(len(unit)):
        b = int(index[a, 0])
        if b > a and index[b, 0] == a and frozenset((a, b)) not in planted_set:
            kind = (
                "cross-class"
                if emb.labels[a] != emb.labels[b]
                else "cross-split"
                if emb.splits[a] != emb.splits[b]
                else "same-class"
            )
            others[kind] = min(others.get(kind, np.inf), ratio(a, b))
    return {
        "planted": {
            "max": round(float(r.max()), 3),
            "p95": round(float(np.quantile(r, 0.95)), 3),
            "median": round(float(np.median(r)), 3),
            "mutual": round(float(np.mean(mutual)), 3),
        },
        "others_min": {k: round(v, 3) for k, v in others.items()},
    }


def fit_accuracy(
    archive: Path, out: Path, budget: float | None, seed: int, store: EmbeddingCache | None = None
) -> tuple[float, float, float, str]:
    """`ml fit` (strategy auto) on `archive`: (val accuracy, seconds, seconds of its features phase, what it
    trained: the representation its probe read, and whether a fine-tune replaced the probe). Its index is made
    first, untimed, as the app's ingestion makes it before a fit. With `store`, the fit reads the features
    held there."""
    from ml.fit import FitConfig, Known, fit

    index = index_dataset(archive)
    start = time.perf_counter()
    result = fit(archive, out, FitConfig(seed=seed, budget=budget), known=Known(index=index, store=store))
    seconds = time.perf_counter() - start
    chosen = {d.what: d.chosen for d in result.decisions}
    what = f"{chosen.get('finetune', 'probe')} from {chosen.get('representation', 'top')}"
    return float(result.metrics.val_accuracy), seconds, result.timings["features"], what


def run_dataset(archive: Path, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    config = FinderConfig(backbone=args.backbone, seed=args.seed)
    index = index_dataset(archive, config.ingest)
    train, val = split_samples(index, config.val_fraction, config.seed)
    zips = {k: scratch / f"{k}-{archive.name}" for k in ("clean", "noisy", "corrected", "copies")}
    flips = plant_noise(train, index.classes, args.seed)
    renamed = write_split(archive, zips["noisy"], train, val, flips)
    truth = {renamed[m]: next(s.label for s in train if s.member == m) for m in flips}
    planted = write_copies(archive, zips["copies"], train, val, index.classes, args.seed)
    log(f"{archive.name}: {len(flips)} flipped, {len(planted)} copies; finders on the noisy archive")

    start = time.perf_counter()
    noisy_index = index_dataset(zips["noisy"], config.ingest)
    index_s = time.perf_counter() - start
    findings, cache, seconds = time_finders(zips["noisy"], noisy_index, config, args.repeat)
    emb = embed(zips["noisy"], noisy_index, config, cache=cache)
    noise = label_noise(findings, emb, truth, config, args.diagnose)
    log(f"{archive.name}: copies archive")
    copies_index = index_dataset(zips["copies"], config.ingest)
    dups = near_duplicates(embed(zips["copies"], copies_index, config), planted, config)

    # The corrected version: flagged training images under their suggested class.
    back = {new: old for old, new in renamed.items()}
    accepted = {back[i.member]: i.suggested for i in findings.label_issues if i.member.startswith("train/")}
    write_split(archive, zips["corrected"], train, val, {**flips, **accepted})
    noise["label_noise"]["relabelled"] = len(accepted)
    fits: dict[str, Any] = {}
    if not args.no_fit and (not args.fit_datasets or any(archive.name.startswith(d) for d in args.fit_datasets)):
        write_split(archive, zips["clean"], train, val, {})
        for k in ("clean", "noisy", "corrected"):
            log(f"{archive.name}: fit on {k}")
            with tempfile.TemporaryDirectory(prefix="fit-", dir=scratch) as out:
                acc, secs, features_s, fits[f"{k}_model"] = fit_accuracy(zips[k], Path(out), args.fit_budget, args.seed)
            fits[k] = round(acc, 4)
            fits[f"{k}_s"] = round(secs, 1)
            fits[f"{k}_features_s"] = round(features_s, 1)
        # The three fits do the same work on as many images: their median is the fit's time (the first one
        # in a process also pays for imports and first-call set-up).
        fits["median_s"] = round(statistics.median(fits[f"{k}_s"] for k in ("clean", "noisy", "corrected")), 1)
        # The fit that follows the finders in the app: the noisy archive again, reading what they stored.
        log(f"{archive.name}: fit on noisy, reading the finders' store")
        with tempfile.TemporaryDirectory(prefix="fit-", dir=scratch) as out:
            acc, secs, features_s, _ = fit_accuracy(zips["noisy"], Path(out), args.fit_budget, args.seed, store=cache)
        fits["noisy_after_finders"], fits["noisy_after_finders_s"] = round(acc, 4), round(secs, 1)
        fits["noisy_after_finders_features_s"] = round(features_s, 1)
        lost = fits["clean"] - fits["noisy"]
        fits["recovered"] = round((fits["corrected"] - fits["noisy"]) / lost, 3) if lost >= 0.01 else None
    fit_s = fits.get("median_s")
    # What the finders cost: their time, less what the fit that follows no longer does (its features phase:
    # the whole fit's seconds would carry a budgeted fine-tune's run-to-run spread of tens of seconds).
    saved = fits["noisy_features_s"] - fits["noisy_after_finders_features_s"] if fit_s else None
    added = seconds["finders_s"] - saved if saved is not None else None
    ratio = round(added / fit_s, 3) if added is not None and fit_s else None
    nd = dups["near_duplicates"]
    ln = noise["label_noise"]
    eligible = noise["clean_probe_cv_accuracy"] >= 0.9
    return {
        "dataset": archive.name,
        "num_images": len(emb.members),
        "num_classes": len(emb.classes),
        **noise,
        "fit": {"budget": args.fit_budget, **fits},
        **dups,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
        "index_s": round(index_s, 2),
        "finders_added_s": None if added is None else round(added, 1),
        "finders_over_fit": ratio,
        "finders_alone_over_fit": round(seconds["finders_s"] / fit_s, 3) if fit_s else None,
        "targets": {
            "label_issues": ((ln["precision"] or 0) >= 0.8 and (ln["recall"] or 0) >= 0.8 if eligible else None),
            "recovered": ((fits.get("recovered") is None or fits["recovered"] >= 0.8) if eligible and fits else None),
            "near_duplicates": all((nd[k]["recall"] or 0) >= 0.9 and (nd[k]["precision"] or 0) >= 0.95 for k in KINDS),
            "time": None if ratio is None else ratio <= 0.25,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("zips", nargs="*", type=Path)
    p.add_argument("--datasets", default="", help="comma-separated name prefixes of the shared zips to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default=FinderConfig().backbone)
    p.add_argument("--fit-budget", type=float, default=60.0, help="each fit's --budget (seconds of fine-tuning)")
    p.add_argument("--no-fit", action="store_true", help="finders only: no fits, no accuracy, no time ratio")
    p.add_argument("--fit-datasets", default="", help="fit only these (name prefixes); the rest: finders only")
    p.add_argument("--repeat", type=int, default=3, help="finder runs timed (median; one when a run takes > 60 s)")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="label-issue precision/recall per C and per filter (the top-layer view, one fold assignment)",
    )
    args = p.parse_args()
    zips = args.zips or sorted(datasets_dir().glob("*.zip"))
    args.fit_datasets = [d.strip() for d in args.fit_datasets.split(",") if d.strip()]
    if args.datasets:  # in the order given
        prefixes = [d.strip() for d in args.datasets.split(",") if d.strip()]
        zips = [z for d in prefixes for z in zips if z.name.startswith(d)]
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
                "fit_budget": args.fit_budget,
                "failed": [r["dataset"] for r in rows if "error" in r],
                **{
                    f"{t}_missed": [r["dataset"] for r in ok if r["targets"][t] is False]
                    for t in ("label_issues", "recovered", "near_duplicates", "time")
                },
                "seconds": round(time.perf_counter() - start, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
