"""Engine benchmark: what `ml.fit.fit` costs and whether it beats two cheap baselines.

Run from the repo root (prints figures; this is not a pass/fail test and pytest does not collect it):

    .venv/bin/python -m tests.benchmarks.bench_engine [DATASET_ZIP ...] [--strategy auto]
        [--backbone efficientnet_lite1] [--budget SECONDS] [--seed 0] [--out DIR] [--only-baselines]

With no zips it runs every *.zip in the shared datasets dir (GRAFT_DATASETS_DIR, else ../shared/datasets
beside the checkout, else /work/shared/datasets). Each dataset runs in its own child process, so its peak
RSS is its own. Progress goes to stderr; stdout carries one JSON line per dataset, then a summary line.

Per-dataset fields:
  dataset             zip file name
  device              where fit ran (FitResult.device)
  backbone            backbone name
  cell, strategy, similarity, images_per_class   from FitResult.strategy (cell: e.g. "small-different")
  expected_cell, cell_as_manifest                the cell MANIFEST.md names for the zip, and whether it matches
  num_classes, num_train, num_val                of the seeded split (ml.dataset.split_samples, val 0.2)
  val_accuracy, macro_f1, ece                    FitResult.metrics on the val split
  input_size          input side the fit chose (FitResult.preprocessing)
  timings             {decode, features, fit, export, total} seconds, from FitResult.timings
                      (decode falls back to the "index" phase of older engines)
  bare_extraction_s   seconds for one frozen-backbone pass (ml.features.extract_features) over
                      train+val at the fit's preprocessing; backbone built before the clock starts,
                      run after the fit, so the cache and device are warm
  fit_over_bare       timings.total / bare_extraction_s: the whole fit's cost in bare passes
  baseline_pixels     {val_accuracy, macro_f1, seconds, size}: logistic regression on raw RGB pixels
                      resized to size x size (16 or 32, whichever scores better in 3-fold CV on train;
                      16 on a tie; C from 1e-4..10 by the same CV); seconds = decode + CV + refit + predict
  baseline_probe      {val_accuracy, macro_f1, seconds}: ml.probe.fit_probe on features at the
                      backbone's native preprocessing; seconds = extraction + probe fit (the extraction
                      is bare_extraction_s when the fit used the native preprocessing, as it is reused)
  beats_baselines     val_accuracy >= both baselines' val_accuracy
  peak_rss_mib        peak resident memory of the child process (ru_maxrss)
A child that fails prints {"dataset", "error"} instead. --only-baselines skips the fit (fit fields are
null; bare extraction and the probe use native preprocessing) to check the baselines alone.

Summary line: {"summary": true, "datasets", "all_beat_baselines", "all_cells_as_manifest", "failed",
"mean_fit_over_bare",
"seconds"} (seconds: wall time of the whole run). Exit status 1 when any dataset failed.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from ml.backbones import DEFAULT_BACKBONE
from tests.conftest import DATASETS, ROOT


def datasets_dir() -> Path:
    return DATASETS  # found the way the tests find it (tests/conftest.py)


def expected_cells() -> dict[str, str]:
    """zip name -> the matrix cell its MANIFEST.md names (table rows: | name.zip | ... | `cell` | ...)."""
    manifest = datasets_dir() / "MANIFEST.md"
    if not manifest.is_file():
        return {}
    rows = re.findall(r"^\|\s*(\S+\.zip)\s*\|.*?`((?:small|large)-(?:similar|different))`", manifest.read_text(), re.M)
    return dict(rows)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def scores(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "val_accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


def pixel_baseline(archive: Path, train, val, class_id: dict, seed: int) -> dict:
    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ml.images import decode_rgb

    t = time.perf_counter()
    sizes = (16, 32)
    pixels: dict[int, list] = {s: [] for s in sizes}
    with zipfile.ZipFile(archive) as zf:
        for sample in [*train, *val]:
            img = decode_rgb(zf.read(sample.member), min_side=max(sizes))
            for s in sizes:
                pixels[s].append(np.asarray(img.resize((s, s), Image.BILINEAR), dtype=np.float32).ravel() / 255.0)
    y_train = np.array([class_id[s.label] for s in train])
    y_val = np.array([class_id[s.label] for s in val])
    k = int(min(3, np.bincount(y_train).min()))
    best = None
    for s in sizes:
        X = np.stack(pixels[s])
        search = GridSearchCV(
            make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
            {"logisticregression__C": np.logspace(-4, 1, 6)},
            cv=StratifiedKFold(k, shuffle=True, random_state=seed),
            n_jobs=-1,  # worker processes: sidesteps thread oversubscription beside torch
        ).fit(X[: len(train)], y_train)
        C = search.best_params_["logisticregression__C"]
        log(f"  pixels {s}x{s}: cv accuracy {search.best_score_:.4f} (C={C:g})")
        if best is None or search.best_score_ > best[0]:
            best = (search.best_score_, s, search.best_estimator_.predict(X[len(train) :]))
    return {**scores(y_val, best[2]), "seconds": round(time.perf_counter() - t, 3), "size": best[1]}


def extract(backbone, archive: Path, members, device, prep):
    """(features, seconds) of one bare frozen pass."""
    from ml.features import extract_features

    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()
    t = time.perf_counter()
    feats = extract_features(backbone, archive, members, batch_size=64, device=device, preprocessing=prep)
    return feats, time.perf_counter() - t


def child(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from ml.backbones import Preprocessing, create_backbone
    from ml.dataset import IngestConfig, index_dataset, split_samples
    from ml.probe import fit_probe

    archive = Path(args.child)
    torch.manual_seed(args.seed)
    row: dict = {"dataset": archive.name, "backbone": args.backbone}
    backbone = create_backbone(args.backbone)
    native = backbone.spec.preprocessing
    prep, device = native, torch.device("cuda" if torch.cuda.is_available() else "cpu")

    if not args.only_baselines:
        from ml.fit import FitConfig, fit

        kwargs = {"strategy": args.strategy, "backbone": args.backbone, "seed": args.seed, "val_fraction": 0.2}
        kwargs["budget"] = args.budget
        log(f"{archive.name}: fit {kwargs}")
        result = fit(archive, Path(args.out) / archive.stem, FitConfig(**kwargs))
        prep = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in result.preprocessing.items()})
        device = torch.device(result.device)
        timings = {k: result.timings[k] for k in ("decode", "features", "fit", "export", "total")}
        st, m = result.strategy, result.metrics
        row.update(
            device=str(device),
            cell=st.get("cell"),
            expected_cell=expected_cells().get(archive.name),
            strategy=st.get("name"),
            similarity=st.get("similarity"),
            images_per_class=st.get("images_per_class"),
            val_accuracy=m.get("val_accuracy"),
            macro_f1=m.get("macro_f1"),
            ece=m.get("ece"),
            input_size=prep.input_size,
            timings=timings,
        )
        log(f"  fit: val_accuracy {m.get('val_accuracy')}, timings {timings}")
    else:
        row.update(device=str(device), val_accuracy=None, timings=None, input_size=prep.input_size)

    log(f"{archive.name}: index for the baselines")
    index = index_dataset(archive, IngestConfig())
    train, val = split_samples(index, 0.2, args.seed)
    class_id = {c: i for i, c in enumerate(index.classes)}
    y_train = np.array([class_id[s.label] for s in train])
    y_val = np.array([class_id[s.label] for s in val])
    members = [s.member for s in train] + [s.member for s in val]
    row.update(num_classes=len(index.classes), num_train=len(train), num_val=len(val))

    log(f"  bare extraction of {len(members)} images on {device}")
    feats, bare = extract(backbone, archive, members, device, prep)
    row["bare_extraction_s"] = round(bare, 3)
    row["fit_over_bare"] = round(row["timings"]["total"] / bare, 2) if row["timings"] else None

    if prep != native:
        log("  re-extracting at native preprocessing for the probe baseline")
        feats, bare = extract(backbone, archive, members, device, native)
    t = time.perf_counter()
    probe = fit_probe(feats[: len(train)], y_train, len(index.classes), seed=args.seed)
    with torch.no_grad():
        pred = probe.linear(torch.from_numpy(feats[len(train) :])).argmax(1).numpy()
    row["baseline_probe"] = {**scores(y_val, pred), "seconds": round(bare + time.perf_counter() - t, 3)}
    log(f"  probe baseline: {row['baseline_probe']}")

    row["baseline_pixels"] = pixel_baseline(archive, train, val, class_id, args.seed)
    log(f"  pixel baseline: {row['baseline_pixels']}")
    acc = row["val_accuracy"]
    base = (row["baseline_pixels"]["val_accuracy"], row["baseline_probe"]["val_accuracy"])
    row["beats_baselines"] = None if acc is None else bool(acc >= max(base))
    row["cell_as_manifest"] = None if acc is None else row["cell"] == row["expected_cell"]
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    row["peak_rss_mib"] = round(rss / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Fields: see the module docstring.")
    ap.add_argument("zips", nargs="*", type=Path, help="dataset zips (default: every *.zip in the datasets dir)")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--budget", type=float, default=None, help="seconds bounding fine-tuning (FitConfig.budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep bundles under DIR/<dataset> (default: a temp dir, removed)")
    ap.add_argument("--only-baselines", action="store_true", help="skip the fit; baselines and bare extraction only")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0

    zips = args.zips or sorted(datasets_dir().glob("*.zip"))
    if not zips:
        log(f"no dataset zips given or found in {datasets_dir()}")
        return 2
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
        out = args.out or tmp
        for z in zips:
            cmd = [
                sys.executable,
                "-m",
                "tests.benchmarks.bench_engine",
                "--child",
                str(Path(z).resolve()),
                "--strategy",
                args.strategy,
                "--backbone",
                args.backbone,
                "--seed",
                str(args.seed),
                "--out",
                out,
            ]
            cmd += ["--budget", str(args.budget)] if args.budget is not None else []
            cmd += ["--only-baselines"] if args.only_baselines else []
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
            lines = proc.stdout.strip().splitlines()
            try:
                row = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
            except json.JSONDecodeError:
                row = None
            row = row or {"dataset": Path(z).name, "error": f"child exited {proc.returncode}"}
            rows.append(row)
            print(json.dumps(row), flush=True)

    ok = [r for r in rows if "error" not in r]
    ratios = [r["fit_over_bare"] for r in ok if r.get("fit_over_bare") is not None]
    summary = {
        "summary": True,
        "datasets": len(rows),
        "all_beat_baselines": bool(ok) and len(ok) == len(rows) and all(r.get("beats_baselines") for r in ok),
        "all_cells_as_manifest": bool(ok) and all(r.get("cell_as_manifest") for r in ok),
        "failed": [r["dataset"] for r in rows if "error" in r],
        "mean_fit_over_bare": round(sum(ratios) / len(ratios), 2) if ratios else None,
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(summary), flush=True)
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
