"""The model bundle: a self-describing folder (and zip) that serves on its own.

Layout:
    model.torchscript.pt   normalised (N,3,H,W) float batch -> logits
    labels.json            class names, index-aligned with the logits
    preprocessing.json     how to build the input batch from an RGB image
    metrics.json           validation metrics
    graft.json             machine-readable model card
    model_card.md          the same for people
"""

from __future__ import annotations

import json
import platform
import shutil
import warnings
import zipfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

from ml.backbones import Preprocessing

FORMAT_VERSION = 1
MODEL_FILE = "model.torchscript.pt"


def export_torchscript(model: nn.Module, prep: Preprocessing, path: Path) -> None:
    model = model.eval().cpu()
    example = torch.zeros(1, 3, prep.input_size, prep.input_size)
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but is still what the bundle contract promises.
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        try:
            scripted = torch.jit.script(model)
        except Exception:  # noqa: BLE001 - some third-party layers only trace
            with torch.no_grad():
                scripted = torch.jit.trace(model, example)
        torch.jit.save(scripted, str(path))


def write_bundle(
    out_dir: Path,
    *,
    model: nn.Module,
    classes: list[str],
    preprocessing: Preprocessing,
    metrics: dict,
    card: dict,
) -> Path:
    """Write the bundle folder and its zip; return the zip's path."""
    folder = out_dir / "bundle"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    export_torchscript(model, preprocessing, folder / MODEL_FILE)
    card = {
        "format_version": FORMAT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "classes": classes,
        "preprocessing": asdict(preprocessing),
        "versions": _versions(),
        **card,
    }
    _dump(folder / "labels.json", classes)
    _dump(folder / "preprocessing.json", asdict(preprocessing))
    _dump(folder / "metrics.json", metrics)
    _dump(folder / "graft.json", card)
    (folder / "model_card.md").write_text(_card_markdown(card, metrics), encoding="utf-8")
    archive = out_dir / "bundle.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        for f in sorted(folder.iterdir()):
            zf.write(f, f.name)
    return archive


def _dump(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _versions() -> dict:
    import torchvision

    import ml

    return {
        "graft_ml": ml.__version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
    }


def _card_markdown(card: dict, metrics: dict) -> str:
    strategy = card.get("strategy", {})
    lines = [
        f"# Model card: {', '.join(card['classes'])}",
        "",
        f"- Backbone: `{card.get('backbone')}` (weights `{card.get('weights_tag')}`)",
        f"- Strategy: `{strategy.get('name')}` ({strategy.get('cell') or 'cell not measured'})",
        f"- Why: {strategy.get('reason', '')}",
        f"- Validation accuracy: {metrics.get('val_accuracy', float('nan')):.4f} "
        f"on {metrics.get('num_val', '?')} images; macro-F1 {metrics.get('macro_f1', float('nan')):.4f}",
        f"- Data hash: `{card.get('data_hash')}`; seed {card.get('seed')}",
        f"- Hyperparameters: `{json.dumps(card.get('hyperparameters', {}))}`",
        f"- Versions: `{json.dumps(card['versions'])}`",
        f"- Created: {card['created']}",
        "",
        "## Input",
        "",
        "RGB image, EXIF orientation applied; shorter side resized to "
        f"{card['preprocessing']['resize_size']} px, centre crop "
        f"{card['preprocessing']['input_size']} px, scaled to [0, 1], normalised with mean "
        f"{card['preprocessing']['mean']} and std {card['preprocessing']['std']}. "
        "The TorchScript model returns logits; softmax gives class probabilities.",
        "",
    ]
    return "\n".join(lines)


def unpack_bundle(archive: Path, folder: Path) -> Path:
    """Extract a bundle zip (only its known flat files) into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if "/" in name or "\\" in name or name.startswith("."):
                continue  # bundles are flat; ignore anything else
            (folder / name).write_bytes(zf.read(name))
    return folder
