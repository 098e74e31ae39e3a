"""An export that fails tells the user so in a sentence; the exporter's own text goes to the log."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from torch import nn

from ml import bundle
from ml.backbones import Preprocessing
from ml.bundle import ExportError, write_bundle

# What a failing exporter says: internals, a server path, a traceback.
RAW = (
    "Traceback (most recent call last):\n"
    '  File "/srv/graft/.venv/lib/python3.12/site-packages/torch/onnx/utils.py", line 1612, in _export\n'
    "RuntimeError: Unsupported: ONNX export of operator aten::_secret_op at /srv/graft/var/work/jobs/7"
)
LEAKS = ("Traceback", "/srv/graft", "aten::", "RuntimeError", "site-packages", "line 1612")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()


def _fail(*args, **kwargs):
    raise RuntimeError(RAW)


def _write(tmp_path):
    prep = Preprocessing(input_size=16, resize_size=18, mean=(0.5,) * 3, std=(0.25,) * 3)
    return write_bundle(tmp_path / "out", model=_model(), classes=["a", "b"], preprocessing=prep, metrics={}, card={})


def _assert_readable(exc: ExportError, caplog, tmp_path) -> None:
    shown = f"{exc.message} {exc} {exc.details}"
    assert not [leak for leak in LEAKS if leak in shown], shown
    incident = re.search(r"incident ([0-9a-f]{8})", exc.message)
    assert incident, exc.message
    # The details are in the log, under the incident the user was told.
    logged = [r for r in caplog.records if incident.group(1) in r.getMessage()]
    assert logged and any(RAW in logging.Formatter().format(r) for r in logged)
    assert not (tmp_path / "out" / "bundle").exists()  # nothing half-written left behind


def test_an_onnx_export_failure_reaches_the_user_as_a_sentence(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(bundle, "_export_traced", _fail)
    monkeypatch.setattr(bundle, "_export_dynamo", _fail)
    with caplog.at_level(logging.ERROR, logger="ml.bundle"), pytest.raises(ExportError) as raised:
        _write(tmp_path)
    assert "ONNX" in raised.value.message
    _assert_readable(raised.value, caplog, tmp_path)


def test_a_torchscript_export_failure_reaches_the_user_as_a_sentence(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(torch.jit, "script", _fail)
    monkeypatch.setattr(torch.jit, "trace", _fail)
    with caplog.at_level(logging.ERROR, logger="ml.bundle"), pytest.raises(ExportError) as raised:
        _write(tmp_path)
    assert "TorchScript" in raised.value.message
    _assert_readable(raised.value, caplog, tmp_path)
