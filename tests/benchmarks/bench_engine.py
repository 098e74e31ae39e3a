"""Engine benchmark: what `python -m ml fit` costs, where its time goes, and whether it meets its targets.

Run from the repo root (prints figures; this is not a pass/fail test and pytest does not collect it):

    .venv/bin/python -m tests.benchmarks.bench_engine [DATASET_ZIP ...] [--strategy auto]
        [--backbone efficientnet_lite1] [--budget SECONDS] [--seed 0] [--out DIR] [--only-baselines]

With no zips it runs every *.zip in the shared datasets dir (GRAFT_DATASETS_DIR, else ../shared/datasets
beside the checkout, else /work/shared/datasets). Per dataset, one after the other (the machine may have
two cores), three processes run on the same seeded split:
  1. the fit: `python -m ml fit ZIP --out DIR --json` (with --strategy, --backbone, --seed, --budget),
     timed whole, from interpreter start to exit; its last stdout line is the FitResult summary;
  2. an analysis child: both baselines, an in-process bare extraction, and the fine-tuned network's
     training throughput on synthetic input;
  3. the bare pass: the issue's minimal program, timed whole, to compare process against process with (1).
     It reads each image from the zip, decodes it (JPEG draft mode, ml.images.decode_rgb) in a 2-thread
     pool one batch ahead, resizes and centre-crops (ml.preprocess.eval_transform), and runs one batched
     (64), channels-last, inference-mode pass of the same backbone at the fit's preprocessing, with the
     tuned allocator (ml.runtime.tune_allocator), over the fit's members. It runs after the fit, so the
     zip is in the page cache for both.
Progress goes to stderr (the fit's own progress bars to a log file, shown when it fails); stdout carries
one JSON line per dataset, then a summary line.

Per-dataset fields:
  dataset             zip file name
  device              where the fit ran (FitResult.device)
  backbone            backbone name
  cell, strategy, similarity, images_per_class   from FitResult.strategy (cell: e.g. "small-different")
  expected_cell, cell_as_manifest                the cell MANIFEST.md names for the zip, and whether it matches
  num_classes, num_train, num_val                of the seeded split (ml.splits.split_samples, val 0.2)
  val_accuracy, macro_f1, ece                    FitResult.metrics on the val split
  input_size          input side the fit chose (FitResult.preprocessing)
  best_epoch          fine-tune epoch restored (0: the probe it started from); null when it did not fine-tune
  phases              {decode, features, fit, export, total: {seconds, peak_rss_mib}} from FitResult.timings
                      and FitResult.peak_rss_mib (the process's peak RSS at the end of that phase; for
                      total, the largest: the fit process's peak)
  decisions           [{what, chosen, metric, scores: {candidate: score}, seconds}] from FitResult.decisions
                      (seconds: what measuring cost, as measurement_s counts it)
  measurement_s       seconds spent measuring candidates: the decisions' seconds, except the "finetune"
                      decision's and the kept learning-rate try's (those are the training itself). Not
                      counted: the features pass at each candidate input size other than the chosen one
                      (FitResult does not report it per size)
  measurement_share   measurement_s / phases.total.seconds
  finetune_images_per_s          training images/s of the fine-tune: the median over epochs >= 2 of the
                                 history's images_per_s (epoch 1 when it is the only one). An epoch's time
                                 is its training loop: data pipeline and EMA updates, not the held-out evaluation
  synthetic_train_images_per_s   the same network (ml.finetune.probe_model at the fine-tune's stage, its
                                 trainable layers as ml.finetune._prepare sets them for the same depth) on
                                 the same device: 8 timed training steps (after 2 warm-up) on random
                                 (32, 3, S, S) channels-last tensors, S = the fine-tune's input size
                                 (hyperparameters.finetune.input_size); BatchNorm frozen,
                                 autocast as the fine-tune (bf16/fp16 on CUDA). Measured in the analysis child
  data_pipeline_ratio            finetune_images_per_s / synthetic_train_images_per_s (1.0: the epoch runs
                                 at the speed of the bare training step)
  fit_process_s       wall seconds of the whole `python -m ml fit` process (the median of 3 runs when
                      the first took under 60 s: such fits are a few seconds over a noisy baseline)
  bare_process_s      wall seconds of the whole bare-pass process (likewise, alternating with the fits)
  process_runs_s      {fit: [...], bare: [...]}: each run's seconds
  fit_over_bare_process          fit_process_s / bare_process_s
  bare_peak_rss_mib   peak RSS of the bare-pass process
  bare_extraction_s   seconds of one frozen-backbone pass (ml.features.extract_features) over train+val at
                      the fit's preprocessing, inside the analysis child (backbone built before the clock)
  fit_over_bare       phases.total.seconds / bare_extraction_s
  baseline_pixels     {val_accuracy, macro_f1, seconds, size}: logistic regression on raw RGB pixels resized
                      to 32 x 32 (size: 32); C from 1e-4..10 by 3-fold CV on train; seconds = decode + CV +
                      refit + predict
  baseline_probe      {val_accuracy, macro_f1, seconds}: ml.probe.fit_probe on top-layer features at the
                      backbone's native preprocessing; seconds = extraction + probe fit (the extraction is
                      bare_extraction_s when the fit used the native preprocessing, as it is reused)
  auto_vs_best_baseline          val_accuracy - max(baseline_pixels, baseline_probe) val_accuracy
  auto_vs_probe                  val_accuracy - baseline_probe.val_accuracy
  large_different_ok             for an expected_cell of large-different: auto_vs_probe >= 0.02 and
                                 best_epoch > 0 (the fine-tune paid); null for the other cells
  time_ok             for a fit measured small-similar (cell): fit_over_bare_process <= 1.25; else null
  int8                the int8 step on the fit's bundle (`python -m ml quantize`, its own process, after the
                      fit and outside its time): {kept, reason, agreement (on held-out training images),
                      val_agreement, val_accuracy_fp32, val_accuracy_int8, val_within (where kept: the drop
                      is at most a point or one validation image), batch_1_ms_fp32, batch_1_ms_int8,
                      batch, batch_ms_fp32, batch_ms_int8 (the server's pass under load), seconds (the
                      step), process_s}; --no-int8 skips it
  meets_targets       auto_vs_best_baseline >= -0.01 and (num_val < 500 or auto_vs_probe >= 0) and
                      large_different_ok and time_ok where they apply
A dataset that fails prints {"dataset", "error"} instead. --only-baselines skips the fit and the bare-pass
process: its rows have only dataset, backbone, the split's counts, device, input_size (native), val_accuracy
(null), bare_extraction_s and the baselines at native preprocessing, synthetic_train_images_per_s, fit_over_bare
and data_pipeline_ratio (null), and the checks (null).

Summary line: {"summary": true, "datasets", "all_meet_targets", "missing_targets", "all_cells_as_manifest",
"failed", "mean_fit_over_bare", "mean_fit_over_bare_process", "seconds"} (missing_targets: the datasets whose
meets_targets is false; the two "all_" fields are null when no dataset was fitted; seconds: wall time of the whole
run). Exit status 1 when any dataset failed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ml.backbones import DEFAULT_BACKBONE

ROOT = Path(__file__).resolve().parents[2]
SELF = [sys.executable, "-m", "tests.benchmarks.bench_engine"]
FIT_PHASES = ("decode", "features", "fit", "export", "total")
REPEATS, REPEAT_UNDER_S = 3, 60  # fit processes shorter than this run 3 times, alternating with the bare pass


def datasets_dir() -> Path:
    from tests.conftest import DATASETS  # imported here: the bare-pass process must not pay for pytest

    return DATASETS  # found the way the tests find it


def expected_cells() -> dict[str, str]:
    """zip name -> the matrix cell its MANIFEST.md names (table rows: | name.zip | ... | `cell` | ...)."""
    manifest = datasets_dir() / "MANIFEST.md"
    if not manifest.is_file():
        return {}
    rows = re.findall(r"^\|\s*(\S+\.zip)\s*\|.*?`((?:small|large)-(?:similar|different))`", manifest.read_text(), re.M)
    return dict(rows)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


# --- the parent: one dataset = fit process, analysis child, bare-pass process --------------------


def run_process(cmd: list[str], stderr_path: Path | None = None) -> tuple[dict | None, float, int]:
    """(the last stdout line as JSON, or None; wall seconds of the whole process; exit status)."""
    start = time.perf_counter()
    with open(stderr_path, "w") if stderr_path else contextlib.nullcontext() as err:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=err, text=True)
    seconds = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
    except json.JSONDecodeError:
        out = None
    return out, seconds, proc.returncode


def run_fit(archive: Path, out: Path, scratch: Path, args: argparse.Namespace) -> tuple[dict, float]:
    """The FitResult summary of `python -m ml fit` and its whole process's wall seconds."""
    cmd = [sys.executable, "-m", "ml", "fit", str(archive), "--out", str(out / archive.stem), "--json"]
    cmd += ["--strategy", args.strategy, "--backbone", args.backbone, "--seed", str(args.seed)]
    cmd += ["--budget", str(args.budget)] if args.budget is not None else []
    log(f"{archive.name}: {' '.join(cmd[1:])}")
    stderr = scratch / f"{archive.stem}.fit.log"
    fit, seconds, status = run_process(cmd, stderr)
    if fit is None:
        tail = stderr.read_text(errors="replace").splitlines()[-5:]
        raise RuntimeError(f"ml fit exited {status}: " + " | ".join(tail))
    log(f"  fit process: {seconds:.1f} s, val_accuracy {fit['metrics'].get('val_accuracy')}")
    return fit, seconds


def run_int8(archive: Path, bundle: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """The int8 step (`python -m ml quantize`) on the fit's bundle, as the worker runs it after a job."""
    cmd = [sys.executable, "-m", "ml", "quantize", str(bundle), str(archive), "--seed", str(args.seed), "--json"]
    check, seconds, status = run_process(cmd, scratch / f"{archive.stem}.int8.log")
    if check is None:
        return {"error": f"ml quantize exited {status}"}
    keys = ("kept", "reason", "agreement", "val_agreement", "val_accuracy_fp32", "val_accuracy_int8")
    row = {key: check[key] for key in keys}
    fp32, int8, n = check["val_accuracy_fp32"], check["val_accuracy_int8"], check["val_images"]
    drop = fp32 - int8 if fp32 is not None and int8 is not None else None
    row["val_within"] = drop <= max(0.01, 1 / n) + 1e-9 if check["kept"] and drop is not None else None
    timed = ("batch_1_ms_fp32", "batch_1_ms_int8", "batch", "batch_ms_fp32", "batch_ms_int8", "seconds")
    row.update({key: check[key] for key in timed})
    row["process_s"] = round(seconds, 1)
    log(f"  int8: {'kept' if check['kept'] else 'refused'}, val {fp32} -> {int8}, {check['seconds']} s")
    return row


def fit_fields(fit: dict) -> dict:
    """The row's fields that come from the FitResult summary alone."""
    st, m = fit["strategy"], fit["metrics"]
    timings = fit["timings"]
    measured = measurement_seconds(fit.get("decisions", []))
    return {
        "device": fit["device"],
        "cell": st.get("cell"),
        "strategy": st.get("name"),
        "similarity": st.get("similarity"),
        "images_per_class": st.get("images_per_class"),
        "val_accuracy": m.get("val_accuracy"),
        "macro_f1": m.get("macro_f1"),
        "ece": m.get("ece"),
        "input_size": fit["preprocessing"]["input_size"],
        "best_epoch": ((fit.get("hyperparameters") or {}).get("finetune") or {}).get("best_epoch"),
        "phases": phases(timings, fit.get("peak_rss_mib", {})),
        "decisions": [compact_decision(d) for d in fit.get("decisions", [])],
        "measurement_s": round(measured, 3),
        "measurement_share": round(measured / timings["total"], 4) if timings.get("total") else None,
        "finetune_images_per_s": finetune_images_per_s(fit.get("history", [])),
    }


def phases(timings: dict, peak_rss: dict) -> dict:
    """{phase: {seconds, peak_rss_mib}}; the total's peak is the largest phase's (RSS peaks only grow)."""
    rows = {}
    for name in FIT_PHASES:
        if name in timings:
            rss = peak_rss.get(name) if name != "total" else max(peak_rss.values(), default=None)
            rows[name] = {"seconds": timings[name], "peak_rss_mib": rss}
    return rows


def compact_decision(decision: dict) -> dict:
    return {
        "what": decision["what"],
        "chosen": decision["chosen"],
        "metric": decision.get("metric"),
        "scores": {c["name"]: c["score"] for c in decision["candidates"]},
        "seconds": round(decision_overhead(decision), 2),
    }


def decision_overhead(decision: dict) -> float:
    """Seconds a decision spent measuring: its candidates' seconds, less the training it kept (the
    fine-tune decision is the training itself; the learning-rate try that was kept is the fine-tune)."""
    if decision["what"] == "finetune":
        return 0.0
    kept = decision["chosen"] if decision["what"] == "learning_rate" else None
    return sum(c["seconds"] for c in decision["candidates"] if c["name"] != kept)


def measurement_seconds(decisions: list[dict]) -> float:
    """Seconds spent measuring candidates (decision_overhead, summed)."""
    return sum(decision_overhead(d) for d in decisions)


def finetune_images_per_s(history: list[dict]) -> float | None:
    """Median training images/s over epochs >= 2 (the first epoch pays for warm-up), else epoch 1's."""
    rates = {
        r["epoch"]: r["images_per_s"]
        for r in history
        if r.get("phase") == "finetune" and (r.get("epoch") or 0) >= 1 and r.get("images_per_s")
    }
    later = [rate for epoch, rate in rates.items() if epoch >= 2]
    if later:
        return round(statistics.median(later), 1)
    return rates.get(1)


def run_child(archive: Path, scratch: Path, fit_json: Path | None, args: argparse.Namespace) -> dict:
    """The analysis child's fields (baselines, bare extraction, synthetic throughput); writes the bare spec."""
    cmd = [*SELF, "--child", str(archive), "--backbone", args.backbone, "--seed", str(args.seed)]
    cmd += ["--bare-spec", str(scratch / f"{archive.stem}.bare.json")]
    cmd += ["--fit-json", str(fit_json)] if fit_json else []
    row, _, status = run_process(cmd)
    if row is None:
        raise RuntimeError(f"analysis child exited {status}")
    return row


def run_bare(spec: Path, backbone: str) -> tuple[dict, float]:
    """The bare-pass process's own report and its whole wall seconds."""
    report, seconds, status = run_process([*SELF, "--bare", str(spec), "--backbone", backbone])
    if report is None:
        raise RuntimeError(f"bare pass exited {status}")
    log(f"  bare process: {seconds:.1f} s ({report['images']} images)")
    return report, seconds


def target_checks(row: dict) -> dict:
    """The issue's targets; null when there is no fit to check."""
    keys = ("auto_vs_best_baseline", "auto_vs_probe", "large_different_ok", "time_ok", "meets_targets")
    acc = row.get("val_accuracy")
    if acc is None:
        return dict.fromkeys(keys)
    probe = row["baseline_probe"]["val_accuracy"]
    vs_best = acc - max(row["baseline_pixels"]["val_accuracy"], probe)
    vs_probe = acc - probe
    eps = 1e-9  # accuracies are fractions of val images: keep float noise from flipping a tie
    large_different = row.get("expected_cell") == "large-different"
    ld_ok = (vs_probe >= 0.02 - eps and (row.get("best_epoch") or 0) > 0) if large_different else None
    over = row.get("fit_over_bare_process")
    time_ok = over <= 1.25 if row.get("cell") == "small-similar" and over is not None else None
    meets = vs_best >= -0.01 - eps and (row["num_val"] < 500 or vs_probe >= -eps) and ld_ok is not False
    meets = meets and time_ok is not False
    return dict(zip(keys, (round(vs_best, 4), round(vs_probe, 4), ld_ok, time_ok, bool(meets)), strict=True))


def ratio(a: float | None, b: float | None, digits: int = 2) -> float | None:
    return round(a / b, digits) if a is not None and b else None


def bench_dataset(archive: Path, out: Path, scratch: Path, args: argparse.Namespace) -> dict:
    """One dataset's row: the fit process, then the analysis child, then the bare-pass process."""
    row: dict = {"dataset": archive.name, "backbone": args.backbone}
    fit_json = fit = None
    if not args.only_baselines:
        fit, fit_seconds = run_fit(archive, out, scratch, args)
        fit_json = scratch / f"{archive.stem}.fit.json"
        fit_json.write_text(json.dumps(fit))
        row.update(fit_fields(fit), expected_cell=expected_cells().get(archive.name))
        row["cell_as_manifest"] = row["cell"] == row["expected_cell"]
        if args.int8:  # before the repeats below, which write the bundle again
            row["int8"] = run_int8(archive, out / archive.stem / "bundle", scratch, args)
    row.update(run_child(archive, scratch, fit_json, args))
    total = row["phases"]["total"]["seconds"] if fit else None
    row["fit_over_bare"] = ratio(total, row["bare_extraction_s"])
    row["data_pipeline_ratio"] = ratio(row.get("finetune_images_per_s"), row.get("synthetic_train_images_per_s"), 3)
    if fit:
        spec = scratch / f"{archive.stem}.bare.json"
        bare, bare_seconds = run_bare(spec, args.backbone)
        fits, bares = [fit_seconds], [bare_seconds]
        if fit_seconds < REPEAT_UNDER_S:  # short fits: alternate more runs of both, and quote medians
            for _ in range(REPEATS - 1):
                fits.append(run_fit(archive, out, scratch, args)[1])
                bares.append(run_bare(spec, args.backbone)[1])
        fit_s, bare_s = statistics.median(fits), statistics.median(bares)
        row.update(fit_process_s=round(fit_s, 2), bare_process_s=round(bare_s, 2))
        row["process_runs_s"] = {"fit": [round(x, 2) for x in fits], "bare": [round(x, 2) for x in bares]}
        row.update(fit_over_bare_process=ratio(fit_s, bare_s), bare_peak_rss_mib=bare["peak_rss_mib"])
    row.update(target_checks(row))
    return row


def summarize(rows: list[dict], seconds: float) -> dict:
    ok = [r for r in rows if "error" not in r]
    failed = [r["dataset"] for r in rows if "error" in r]
    fitted = [r for r in ok if r.get("meets_targets") is not None]  # none under --only-baselines

    def mean(key: str) -> float | None:
        values = [r[key] for r in ok if r.get(key) is not None]
        return round(sum(values) / len(values), 2) if values else None

    return {
        "summary": True,
        "datasets": len(rows),
        "all_meet_targets": None if not (fitted or failed) else not failed and all(r["meets_targets"] for r in fitted),
        "missing_targets": [r["dataset"] for r in fitted if not r["meets_targets"]],
        "all_cells_as_manifest": all(r["cell_as_manifest"] for r in fitted) if fitted else None,
        "failed": failed,
        "mean_fit_over_bare": mean("fit_over_bare"),
        "mean_fit_over_bare_process": mean("fit_over_bare_process"),
        "int8_kept": [r["dataset"] for r in ok if (r.get("int8") or {}).get("kept")],
        "int8_refused": [r["dataset"] for r in ok if (r.get("int8") or {}).get("kept") is False],
        "int8_kept_within": all(r["int8"]["val_within"] for r in ok if (r.get("int8") or {}).get("kept")),
        "seconds": round(seconds, 1),
    }


# --- the analysis child: baselines, bare extraction, synthetic training throughput -----------------


def scores(y_true, y_pred) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    return {
        "val_accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
    }


PIXEL_SIZE = 32  # the pixel baseline: 32 x 32 RGB


def pixel_baseline(archive: Path, train, val, class_id: dict, seed: int) -> dict:
    import zipfile

    import numpy as np
    from PIL import Image
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV, StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from ml.images import decode_rgb

    t, s = time.perf_counter(), PIXEL_SIZE

    def pixels(data: bytes) -> np.ndarray:
        img = decode_rgb(data, min_side=s).resize((s, s), Image.BILINEAR)
        return np.asarray(img, dtype=np.float32).ravel() / 255.0

    with zipfile.ZipFile(archive) as zf:
        X = np.stack([pixels(zf.read(x.member)) for x in [*train, *val]])
    y_train = np.array([class_id[x.label] for x in train])
    y_val = np.array([class_id[x.label] for x in val])
    k = int(min(3, np.bincount(y_train).min()))
    search = GridSearchCV(
        make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000)),
        {"logisticregression__C": np.logspace(-4, 1, 6)},
        cv=StratifiedKFold(k, shuffle=True, random_state=seed),
        n_jobs=-1,  # worker processes: sidesteps thread oversubscription beside torch
    ).fit(X[: len(train)], y_train)
    log(f"  pixels {s}x{s}: cv accuracy {search.best_score_:.4f} (C={search.best_params_['logisticregression__C']:g})")
    pred = search.best_estimator_.predict(X[len(train) :])
    return {**scores(y_val, pred), "seconds": round(time.perf_counter() - t, 3), "size": s}


def extract(backbone, archive: Path, members, device, prep):
    """(features, seconds) of one bare frozen pass."""
    from ml.features import Pass, extract_features

    synchronize(device)
    t = time.perf_counter()
    feats = extract_features(backbone, archive, members, preprocessing=prep, how=Pass(device, 64))
    return feats, time.perf_counter() - t


def synthetic_train_images_per_s(
    backbone_name: str, finetune: dict, num_classes: int, size: int, device, *, steps: int = 8, warmup: int = 2
) -> float:
    """Training images/s of the fine-tuned network on random input: the training step with no data to load."""
    import torch
    from torch import nn

    from ml.backbones import create_backbone
    from ml.finetune import FinetuneConfig, Start, _prepare, freeze_batchnorm, probe_model

    batch, stage = 32, finetune["model_stage"]
    backbone = create_backbone(backbone_name)  # fresh: the extraction left the other one in inference shape
    with torch.no_grad():
        width = probe_model(backbone, nn.Identity(), stage)[:-1].eval()(torch.zeros(1, 3, size, size)).shape[1]
    config = FinetuneConfig(depth=finetune["depth"], batch_size=batch)
    model, _, _, optimizer = _prepare(Start(backbone, nn.Linear(width, num_classes), stage), config, device)
    # Autocast as the fine-tune runs it (ml.finetune: bf16 where the GPU has it, else fp16 with a scaler).
    amp = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if device.type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
    torch.backends.cudnn.benchmark = device.type == "cuda"
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(num_classes, (batch,), device=device)
    model.train()
    freeze_batchnorm(model)

    def step() -> None:
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            feats = model[:-1](x)
        loss = nn.functional.cross_entropy(model[-1](feats.float()), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(warmup):
        step()
    synchronize(device)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return steps * batch / (time.perf_counter() - t)


def child(args: argparse.Namespace) -> dict:
    from dataclasses import asdict

    import numpy as np
    import torch

    from ml.backbones import Preprocessing, create_backbone
    from ml.dataset import IngestConfig, index_dataset
    from ml.probe import fit_probe
    from ml.splits import split_samples

    archive = Path(args.child)
    torch.manual_seed(args.seed)
    fit = json.loads(Path(args.fit_json).read_text()) if args.fit_json else None
    backbone = create_backbone(args.backbone)
    native = backbone.spec.preprocessing
    prep, device = native, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if fit:
        prep = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in fit["preprocessing"].items()})
        device = torch.device(fit["device"])

    log(f"{archive.name}: index for the baselines")
    index = index_dataset(archive, IngestConfig())
    train, val = split_samples(index, 0.2, args.seed)
    class_id = {c: i for i, c in enumerate(index.classes)}
    y_train = np.array([class_id[s.label] for s in train])
    y_val = np.array([class_id[s.label] for s in val])
    members = [s.member for s in train] + [s.member for s in val]
    row: dict = {"num_classes": len(index.classes), "num_train": len(train), "num_val": len(val)}
    if not fit:
        row.update(device=str(device), input_size=prep.input_size, val_accuracy=None)
    spec = {"archive": str(archive), "members": members, "preprocessing": asdict(prep), "device": str(device)}
    Path(args.bare_spec).write_text(json.dumps(spec))  # for the bare-pass process: the same images and input

    log(f"  bare extraction of {len(members)} images on {device}")
    feats, bare = extract(backbone, archive, members, device, prep)
    row["bare_extraction_s"] = round(bare, 3)
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

    finetune = ((fit or {}).get("hyperparameters") or {}).get("finetune")
    row["synthetic_train_images_per_s"] = None
    if finetune:
        size = finetune.get("input_size", prep.input_size)  # the fine-tune's own input (its cheapest candidate)
        rate = synthetic_train_images_per_s(args.backbone, finetune, len(index.classes), size, device)
        row["synthetic_train_images_per_s"] = round(rate, 1)
        log(f"  synthetic training: {rate:.1f} images/s")
    return row


# --- the bare pass: the minimal program, run as its own process ------------------------------


def bare(args: argparse.Namespace) -> dict:
    """Decode (2 threads, one batch ahead) and one inference pass over the fit's members; nothing else."""
    import threading
    import zipfile
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from ml.backbones import Preprocessing, create_backbone
    from ml.images import decode_rgb
    from ml.preprocess import eval_transform
    from ml.run import peak_rss_mib
    from ml.runtime import tune_allocator

    tune_allocator()
    spec = json.loads(Path(args.bare).read_text())
    prep = Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["preprocessing"].items()})
    device, members = torch.device(spec["device"]), spec["members"]
    body = create_backbone(args.backbone).eval().to(device, memory_format=torch.channels_last).body
    transform, local = eval_transform(prep), threading.local()

    def load(member: str) -> torch.Tensor:
        if not hasattr(local, "zf"):
            local.zf = zipfile.ZipFile(spec["archive"])  # one handle per thread: ZipFile is not thread-safe
        return transform(decode_rgb(local.zf.read(member), min_side=prep.resize_size))

    start = time.perf_counter()
    chunks = [members[i : i + 64] for i in range(0, len(members), 64)]
    with ThreadPoolExecutor(2) as pool, torch.inference_mode():
        ahead = [pool.submit(load, m) for m in chunks[0]] if chunks else []
        for i in range(len(chunks)):
            current = ahead
            ahead = [pool.submit(load, m) for m in chunks[i + 1]] if i + 1 < len(chunks) else []
            x = torch.stack([f.result() for f in current]).to(device).contiguous(memory_format=torch.channels_last)
            body(x).float().cpu()  # the features come back to the host, as the fit's do
    return {"images": len(members), "seconds": round(time.perf_counter() - start, 3), "peak_rss_mib": peak_rss_mib()}


# --- entry point ------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Fields: see the module docstring.")
    ap.add_argument("zips", nargs="*", type=Path, help="dataset zips (default: every *.zip in the datasets dir)")
    ap.add_argument("--strategy", default="auto")
    ap.add_argument("--backbone", default=DEFAULT_BACKBONE)
    ap.add_argument("--budget", type=float, default=None, help="seconds bounding fine-tuning (ml fit --budget)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="keep bundles under DIR/<dataset> (default: a temp dir, removed)")
    ap.add_argument("--only-baselines", action="store_true", help="skip the fit; baselines and bare extraction only")
    ap.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True, help="the int8 step after the fit")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)  # analysis child: the zip
    ap.add_argument("--fit-json", default=None, help=argparse.SUPPRESS)  # analysis child: the fit's summary
    ap.add_argument("--bare-spec", default=None, help=argparse.SUPPRESS)  # analysis child writes the bare spec
    ap.add_argument("--bare", default=None, help=argparse.SUPPRESS)  # bare-pass process: the spec to run
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.child or args.bare:
        print(json.dumps(child(args) if args.child else bare(args)), flush=True)
        return 0

    zips = [Path(z).resolve() for z in args.zips] or sorted(datasets_dir().glob("*.zip"))
    if not zips:
        log(f"no dataset zips given or found in {datasets_dir()}")
        return 2
    start, rows = time.perf_counter(), []
    with tempfile.TemporaryDirectory(prefix="graft-bench-") as tmp:
        scratch = Path(tmp)
        out = Path(args.out) if args.out else scratch
        for archive in zips:
            try:
                row = bench_dataset(archive, out, scratch, args)
            except RuntimeError as exc:
                log(f"{archive.name}: {exc}")
                row = {"dataset": archive.name, "error": str(exc)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = summarize(rows, time.perf_counter() - start)
    print(json.dumps(summary), flush=True)
    return 0 if not summary["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
