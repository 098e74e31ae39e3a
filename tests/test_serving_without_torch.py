"""The serving app's modules import neither torch nor timm: a web process that serves with ONNX Runtime
(GRAFT_SERVE_RUNTIME=onnxruntime) loads them only if something else it runs needs them."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT

IMPORT_SERVING = """
import sys

import django

django.setup()
import apps.serving.api, apps.serving.batches, apps.serving.cache, apps.serving.services  # noqa: E401

print(" ".join(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)))
"""


def test_the_serving_modules_import_neither_torch_nor_timm():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_SERVING], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "", f"importing apps.serving loaded {out.stdout.strip()}"
