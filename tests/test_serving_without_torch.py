"""The web tier imports neither torch nor timm: the serving modules, and the whole WSGI application
with every view its URLs route to, as gunicorn --preload loads it on the default settings
(GRAFT_SERVE_RUNTIME=onnxruntime). Prediction needs ONNX Runtime, numpy and Pillow alone."""

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


IMPORT_WEB_TIER = """
import sys

from django.urls import get_resolver

import apps.wsgi  # as gunicorn loads it (django.setup() included)
from django.conf import settings


def walk(patterns):
    for p in patterns:
        if hasattr(p, "url_patterns"):
            walk(p.url_patterns)
        else:
            p.callback  # the view, imported


walk(get_resolver().url_patterns)
import apps.web.views, apps.web.fit_form, apps.serving.quantization  # noqa: E401

# What web requests run beyond importing: a job's options checked (job_create), the train form made.
from apps.web.fit_form import form_fields
from ml.config import FitConfig
from ml.weights import available_backbones

FitConfig(backbone="efficientnet_lite0").validate()
form_fields(available_backbones().items())

print(settings.GRAFT_SERVE_RUNTIME, " ".join(sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules)))
"""


def test_the_web_tier_imports_neither_torch_nor_timm():
    env = {k: v for k, v in os.environ.items() if k not in ("GRAFT_SERVE_RUNTIME", "GRAFT_SERVE_PRECISION")}
    env["DJANGO_SETTINGS_MODULE"] = "tests.settings"
    out = subprocess.run(
        [sys.executable, "-c", IMPORT_WEB_TIER], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    runtime, _, loaded = out.stdout.strip().partition(" ")
    assert runtime == "onnxruntime"  # the default: TorchScript would need torch
    assert loaded == "", f"the web tier loaded {loaded}"
