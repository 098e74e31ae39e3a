"""The model bundle's layout, and reading one: what serving needs of a bundle, without torch.

A bundle is a self-describing folder (and zip) that serves on its own:
    model.torchscript.pt   normalised (N,3,H,W) float batch -> logits
    model.onnx             the same model as ONNX: input `image` (dynamic N), output `logits`;
                           checked against PyTorch before the bundle is written
    model.int8.onnx        the ONNX model quantized to int8, where it predicts as model.onnx does
                           (added after the fit by ml.quantize; graft.json's `int8` says how it did)
    labels.json            class names, index-aligned with the logits
    preprocessing.json     how to build the input batch from an RGB image
    metrics.json           validation metrics
    graft.json             machine-readable model card
    model_card.md          the same for people
    predict.py             runs the ONNX model with onnxruntime, numpy and Pillow alone, preprocessing
                           as the server does (ml/standalone_predict.py, copied)
    README.md              how to run it

ml.bundle writes bundles (and needs torch to export the model); this module only names and reads.
"""

from __future__ import annotations

import json
import os
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ml.preprocessing import Preprocessing

FORMAT_VERSION = 1
MODEL_FILE = "model.torchscript.pt"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
LABELS_FILE = "labels.json"
PREPROCESSING_FILE = "preprocessing.json"
METRICS_FILE = "metrics.json"
CARD_FILE = "graft.json"
CARD_MARKDOWN_FILE = "model_card.md"
PREDICT_FILE = "predict.py"
README_FILE = "README.md"


@dataclass(frozen=True)
class BundleInfo:
    """What a bundle folder says about its model (everything but the model files)."""

    classes: list[str]  # index-aligned with the logits
    preprocessing: Preprocessing
    card: dict[str, Any]  # graft.json
    metrics: dict[str, Any]


def _load(path: Path) -> Any:
    return json.loads(path.read_text("utf-8"))


def read_preprocessing(folder: Path) -> Preprocessing:
    """The input the bundle in `folder` expects."""
    return Preprocessing.from_dict(_load(Path(folder) / PREPROCESSING_FILE))


def read_bundle(folder: Path) -> BundleInfo:
    """The labels, preprocessing, model card and metrics of the (unpacked) bundle in `folder`."""
    folder = Path(folder)
    return BundleInfo(
        classes=_load(folder / LABELS_FILE),
        preprocessing=read_preprocessing(folder),
        card=_load(folder / CARD_FILE),
        metrics=_load(folder / METRICS_FILE),
    )


def zip_bundle(folder: Path, archive: Path) -> Path:
    """Write the bundle folder's files into `archive` (written aside, then renamed into place)."""
    part = archive.with_name(f".{archive.name}.{os.getpid()}.part")
    with zipfile.ZipFile(part, "w") as zf:
        for f in sorted(Path(folder).iterdir()):
            if f.name.startswith("."):
                continue
            # Float weights barely deflate (~7%) and deflating them took ~1 s; text files shrink well.
            stored = f.suffix in (".pt", ".onnx")
            zf.write(f, f.name, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
    os.replace(part, archive)
    return archive


def unpack_bundle(archive: Path, folder: Path) -> Path:
    """Extract a bundle zip (only its known flat files) into `folder`.

    Each file appears whole or not at all (written aside, then renamed), so another process
    unpacking the same bundle into the same folder never lets a reader see half a file."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if "/" in name or "\\" in name or name.startswith("."):
                continue  # bundles are flat; ignore anything else
            part = folder / f".{name}.{os.getpid()}-{threading.get_ident()}.part"
            part.write_bytes(zf.read(name))
            os.replace(part, folder / name)
    return folder
