"""Writing the model bundle: export the model (TorchScript, and ONNX checked against it) and write
the folder and its zip. The layout, its names and reading a bundle are in ml.bundle_format, which
serving imports without torch.
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import math
import platform
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ml.bundle_format import (
    CARD_FILE,
    CARD_MARKDOWN_FILE,
    LABELS_FILE,
    METRICS_FILE,
    PREDICT_FILE,
    PREPROCESSING_FILE,
    README_FILE,
    zip_bundle,
)
from ml.bundle_format import FORMAT_VERSION as FORMAT_VERSION
from ml.bundle_format import MODEL_FILE as MODEL_FILE
from ml.bundle_format import ONNX_FILE as ONNX_FILE
from ml.bundle_format import unpack_bundle as unpack_bundle
from ml.errors import MLError
from ml.preprocessing import Preprocessing

log = logging.getLogger(__name__)

ONNX_OPSET = 18
# The parity check feeds ONNX Runtime random images in batches of these (distinct) sizes,
# so it also exercises the dynamic batch axis; PyTorch sees them as one batch.
PARITY_BATCHES = (1, 2)
# The bundle's own predictor: a module of this package that imports nothing from it.
STANDALONE_PREDICT = Path(__file__).with_name("standalone_predict.py")


class ExportError(MLError):
    """The model could not be exported, or its export does not reproduce the PyTorch model."""


def export_torchscript(model: nn.Module, prep: Preprocessing, path: Path) -> None:
    """Write `model` as TorchScript: traced at the bundle's input size, and checked against the module
    on a batch of two (the trace saw one), else scripted.

    Tracing comes first: scripting fails on the EfficientNet-Lite models (their padding), and the
    failed try, then the tracer's own check (which traces again), took 3.5 of the export's 8.3 s in
    a hymenoptera fit. The bundle's input size is fixed, and a trace that baked in its batch size, or
    anything else the check's random batch reaches, fails the check and is scripted instead. (A
    branch on the input's values that both the zeros traced and the check's batch take would pass:
    none of the registry's models has one.)"""
    model = model.eval().cpu()
    example = torch.zeros(1, 3, prep.input_size, prep.input_size)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but is still what the bundle contract promises.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # what the check below would catch
        try:
            with torch.no_grad():
                scripted = torch.jit.trace(model, example, check_trace=False)
            _check_torchscript(model, scripted, prep.input_size)
        except Exception as traced:  # noqa: BLE001 - data-dependent control flow: scripting may still cope
            log.debug("TorchScript: the trace failed (%s); scripting instead", traced)
            try:
                scripted = torch.jit.script(model)
                _check_torchscript(model, scripted, prep.input_size)
            except Exception as error:
                raise _export_failed("TorchScript", error) from error
        torch.jit.save(scripted, str(path))


def _check_torchscript(model: nn.Module, scripted: torch.jit.ScriptModule, input_size: int) -> None:
    """Raise ExportError where `scripted` does not reproduce `model` on a random batch of two."""
    x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = model(x), scripted(x)
    if got.shape != expected.shape or not torch.allclose(got, expected, atol=1e-4, rtol=1e-4):
        raise ExportError("The TorchScript model does not reproduce the PyTorch model on random inputs.")


def export_onnx(model: nn.Module, prep: Preprocessing, path: Path) -> dict[str, Any]:
    """Write `model` as ONNX and check it against PyTorch; return what graft.json records.

    Raises ExportError when neither exporter succeeds or the outputs disagree.
    """
    model = model.eval().cpu()
    example = torch.zeros(2, 3, prep.input_size, prep.input_size)
    try:
        _export_traced(model, example, path)
        exporter = "torchscript"
    except Exception:  # noqa: BLE001 - the dynamo exporter may still cope
        try:
            _export_dynamo(model, example, path)
        except Exception as error:  # its logged traceback includes the first exporter's
            raise _export_failed("ONNX", error) from error
        exporter = "dynamo"
    max_abs_diff = check_onnx_parity(model, path, prep.input_size)
    return {
        "file": ONNX_FILE,
        "opset": ONNX_OPSET,
        "exporter": exporter,
        "input": "image",
        "output": "logits",
        "max_abs_diff": max_abs_diff,
    }


def _export_failed(target: str, error: BaseException) -> ExportError:
    """The error a user reads when an exporter fails. The exporter's own text names internals and
    server paths: it goes to the log, under an incident id the message gives."""
    incident = uuid.uuid4().hex[:8]
    log.error("export to %s failed (incident %s)", target, incident, exc_info=error)
    return ExportError(
        f"The trained model could not be exported to {target}, so no bundle was made (incident {incident}); "
        "the details are in the log.",
        incident=incident,
    )


def _export_traced(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    with warnings.catch_warnings():
        # The TorchScript-based exporter is deprecated, but it takes ~1.5 s where the dynamo
        # exporter takes ~7 s for EfficientNet-Lite0; the parity check guards what it writes,
        # including the tracer's "might not generalize" cases.
        warnings.filterwarnings("ignore", "You are using the legacy TorchScript-based ONNX export", DeprecationWarning)
        warnings.filterwarnings("ignore", "The feature will be removed", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (example,),
            str(path),
            dynamo=False,
            opset_version=ONNX_OPSET,
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        )


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    torch.onnx.export(
        model,
        (example,),
        str(path),
        dynamo=True,
        opset_version=ONNX_OPSET,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        external_data=False,  # one self-contained file in the bundle
        verbose=False,
    )


def check_onnx_parity(
    model: nn.Module, path: Path, input_size: int, *, atol: float = 1e-3, rtol: float = 1e-3, seed: int = 0
) -> float:
    """Compare the ONNX file's logits with `model`'s (eval mode, CPU) on random batches.

    Returns the largest absolute difference; raises ExportError when it exceeds
    `atol + rtol * max|logit|`.
    """
    import onnxruntime as ort  # only needed when exporting; serving imports this module too

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    # Idle runtime threads must not spin: they would take the CPU from PyTorch's on a busy host.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    x = torch.randn(sum(PARITY_BATCHES), 3, input_size, input_size, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = model(x).float().numpy()
    got = np.concatenate([session.run(["logits"], {"image": part.numpy()})[0] for part in x.split(PARITY_BATCHES)])
    if got.shape != expected.shape:
        raise ExportError(f"The ONNX model returns shape {got.shape} where PyTorch returns {expected.shape}.")
    diff = float(np.abs(got - expected).max())
    tolerance = atol + rtol * float(np.abs(expected).max())
    if not diff <= tolerance:  # also catches NaN
        raise ExportError(
            f"The ONNX model disagrees with the PyTorch model: logits differ by up to {diff:.3g} "
            f"(tolerance {tolerance:.3g}) on random inputs.",
            max_abs_diff=diff,
            tolerance=tolerance,
        )
    return diff


def write_bundle(
    out_dir: Path,
    *,
    model: nn.Module,
    classes: list[str],
    preprocessing: Preprocessing,
    metrics: dict[str, Any],
    card: dict[str, Any],
    on_step: Callable[[float, str], None] | None = None,
) -> Path:
    """Write the bundle folder and its zip; return the zip's path."""
    folder, archive = out_dir / "bundle", out_dir / "bundle.zip"
    if folder.exists():
        shutil.rmtree(folder)
    archive.unlink(missing_ok=True)
    folder.mkdir(parents=True)
    try:
        step = on_step or (lambda _share, _what: None)  # the share of the export done, for a progress bar
        step(0.0, "TorchScript")
        export_torchscript(model, preprocessing, folder / MODEL_FILE)
        step(0.3, "ONNX, checked against TorchScript")
        onnx_info = export_onnx(model, preprocessing, folder / ONNX_FILE)
        step(0.9, "the bundle's files")
    except Exception:
        shutil.rmtree(folder)  # never leave a half-written or disagreeing bundle behind
        raise
    card = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": classes,
        "preprocessing": asdict(preprocessing),
        "onnx": onnx_info,
        "versions": _versions(),
        **card,
    }
    _dump(folder / LABELS_FILE, classes)
    _dump(folder / PREPROCESSING_FILE, asdict(preprocessing))
    _dump(folder / METRICS_FILE, metrics)
    _dump(folder / CARD_FILE, card)
    (folder / CARD_MARKDOWN_FILE).write_text(_card_markdown(card, metrics), encoding="utf-8")
    shutil.copyfile(STANDALONE_PREDICT, folder / PREDICT_FILE)
    (folder / README_FILE).write_text(_readme(classes), encoding="utf-8")
    return zip_bundle(folder, archive)


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict[str, str | None]:
    import ml

    return {
        "graft_ml": ml.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        **{name: _dist_version(name) for name in ("torchvision", "timm", "onnx", "onnxruntime")},
    }


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _readme(classes: list[str]) -> str:
    return "\n".join(
        [
            f"# Graft model bundle: {', '.join(_md(c) for c in classes)}",
            "",
            "Run the model on any machine with Python 3; nothing from Graft is needed:",
            "",
            "```sh",
            "pip install onnxruntime numpy pillow",
            "python predict.py photo.jpg",
            "```",
            "",
            "Each image prints one JSON line, its labels best first with their probabilities:",
            "",
            "```",
            json.dumps(
                {
                    "file": "photo.jpg",
                    "predictions": [{"label": c, "score": s} for c, s in zip(classes, (0.93, 0.05), strict=False)],
                },
                ensure_ascii=False,
            ),
            "```",
            "",
            "`--k 3` keeps three labels (default 5); several images may follow. An image that cannot be read "
            'prints `{"file": ..., "error": ...}`, the rest go on, and the exit status is 1.',
            "",
            "`predict.py` reads `model.onnx`, `labels.json` and `preprocessing.json` from its own folder and "
            "prepares each image as the Graft server does (EXIF orientation, conversion to RGB, resize, centre "
            "crop, normalisation), so its scores are the server's.",
            "",
            "Also here: `model.torchscript.pt` (the same model for PyTorch), `metrics.json` (validation "
            "metrics), `graft.json` and `model_card.md` (how the model was made).",
            "",
        ]
    )


def _data_lines(about: dict[str, Any]) -> list[str]:
    """What the data was to the app that trained it: a dataset's name and version."""
    if not about.get("dataset"):
        return []
    version = f", version {about['dataset_version']}" if about.get("dataset_version") else ""
    return [f"- Trained on: dataset {_md(str(about['dataset']))}{version}"]


def _card_markdown(card: dict[str, Any], metrics: dict[str, Any]) -> str:
    strategy = card.get("strategy", {})
    onnx = card["onnx"]
    lines = [
        f"# Model card: {', '.join(_md(c) for c in card['classes'])}",
        "",
        f"- Backbone: `{card.get('backbone')}` (weights `{card.get('weights_tag')}`)",
        f"- Strategy: `{strategy.get('name')}` ({strategy.get('cell') or 'cell not measured'})",
        f"- Why: {strategy.get('reason', '')}",
        f"- Validation accuracy: {metrics.get('val_accuracy', float('nan')):.4f} "
        f"on {metrics.get('num_val', '?')} images; macro-F1 {metrics.get('macro_f1', float('nan')):.4f}",
        *_calibration_lines(metrics),
        *_data_lines(card.get("data") or {}),
        f"- Data hash: `{card.get('data_hash')}`; seed {card.get('seed')}",
        f"- Hyperparameters: `{json.dumps(card.get('hyperparameters', {}))}`",
        f"- ONNX: `{onnx['file']}` (opset {onnx['opset']}, {onnx['exporter']} exporter); its logits match "
        f"PyTorch's to {onnx['max_abs_diff']:.1e} (max absolute difference on random inputs)",
        f"- Versions: `{json.dumps(card['versions'])}`",
        f"- Created: {card['created']}",
        "",
        "## Input",
        "",
        "RGB image, EXIF orientation applied; shorter side resized to "
        f"{card['preprocessing']['resize_size']} px, centre crop "
        f"{card['preprocessing']['input_size']} px, scaled to [0, 1], normalised with mean "
        f"{card['preprocessing']['mean']} and std {card['preprocessing']['std']}. "
        "Both models (TorchScript and ONNX, input `image`, output `logits`) return logits; "
        "softmax gives class probabilities.",
        "",
        *_decision_lines(card.get("decisions") or []),
    ]
    return "\n".join(lines)


def _decision_lines(decisions: list[dict[str, Any]]) -> list[str]:
    if not decisions:
        return []
    lines = [
        "## Why this model",
        "",
        "Each choice was measured on the training split (cross-validation or a held-out slice of it); "
        "the validation split above chose nothing.",
        "",
    ]
    for d in decisions:
        candidates = "; ".join(
            f"{_md(c['name'])} {_score(c.get('score'), c.get('detail'))}{' (kept)' if c['name'] == d['chosen'] else ''}"
            for c in d.get("candidates", [])
        )
        metric = f" ({_md(d['metric'])})" if d.get("metric") else ""
        lines.append(f"- **{_md(d['what'])}: {_md(d['chosen'])}** — {_md(d.get('reason', ''))}")
        if candidates:
            lines.append(f"  Candidates{metric}: {candidates}")
    lines.append("")
    return lines


# Characters that make Markdown (or GitHub's math) or raw HTML anywhere on a line. The rest only
# matter at the start of a line, which _md's folded whitespace never gives user text, or right
# after a "]", which is escaped.
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>#|~&$])")


def _md(text: object) -> str:
    """User text (class names, candidate names) as literal Markdown: no markup, no HTML."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def _score(score: float | None, detail: dict[str, Any] | None = None) -> str:
    """A candidate's score; without one, what it measured instead (the range test: where the loss blew up)."""
    if isinstance(score, int | float) and math.isfinite(score):
        return f"{score:.1%}"
    shown = [f"{_md(k.replace('_', ' '))} {'never' if v is None else _md(f'{v:.3g}' if isinstance(v, float) else v)}"
             for k, v in (detail or {}).items()]  # fmt: skip
    return ", ".join(shown) or "not measured"


def _calibration_lines(metrics: dict[str, Any]) -> list[str]:
    lines = []
    if "top_k_accuracy" in metrics:
        top_k = ", ".join(f"{k} {v:.4f}" for k, v in metrics["top_k_accuracy"].items())
        lines.append(f"- Top-k accuracy: {top_k}")
    if "ece" in metrics:
        lines.append(f"- Expected calibration error: {metrics['ece']:.4f}")
    return lines
