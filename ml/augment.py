"""Train-time augmentation: a ladder of strengths, and the transforms the invariance tests use.

The engine does not assume which invariances hold; it measures them (ml.fit): the
linear probe reads held-out training images once as they are and once through each
transformation, and a transformation whose views it reads worse is not one the data
has (a mirrored 7 or "keep right" sign changes the class). The levels, mildest first:

- `light`: random resized crop of 70-100% of the image, near-square, mild brightness/contrast;
- `medium`: crops of 35-100%, any sensible aspect, colour jitter;
- `strong`: `medium` plus TrivialAugmentWide (one random op per image, at a random magnitude).

Flips are added to any level only when the flip test holds. The first fine-tuning epoch
always runs `light`: the probe head was fitted on clean images, and a strong policy on the
first pass knocks it off before the backbone has adapted (LP-FT).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ml.backbones import Preprocessing
from ml.preprocess import INTERPOLATION

LEVELS = ("light", "medium", "strong")

_CROP = {
    "light": ((0.7, 1.0), (0.9, 1.1)),
    "medium": ((0.35, 1.0), (3 / 4, 4 / 3)),
    "strong": ((0.35, 1.0), (3 / 4, 4 / 3)),
}
_JITTER = {
    "light": {"brightness": 0.1, "contrast": 0.1},
    "medium": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3},
    "strong": {"brightness": 0.3, "contrast": 0.3, "saturation": 0.3},
}


def train_transform(
    prep: Preprocessing, level: str = "medium", *, hflip: bool = False, uint8: bool = False
) -> tuple[Callable[[Image.Image], torch.Tensor], dict[str, Any]]:
    """(transform, description) for one augmentation level; with `uint8`, the views stop before
    scaling and normalisation, as `eval_transform(uint8=True)` does."""
    if level not in LEVELS:
        raise ValueError(f"unknown augmentation level '{level}'. Valid choices: {', '.join(LEVELS)}.")
    interpolation = INTERPOLATION[prep.interpolation]
    scale, ratio = _CROP[level]
    steps: list[Any] = [
        T.PILToTensor(),
        T.RandomResizedCrop(prep.input_size, scale=scale, ratio=ratio, interpolation=interpolation, antialias=True),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(T.ColorJitter(**_JITTER[level]))
    if level == "strong":
        # Bilinear: on tensors torchvision's rotate and shear refuse bicubic.
        steps.append(T.TrivialAugmentWide(interpolation=T.InterpolationMode.BILINEAR))
    if not uint8:
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(prep.mean, prep.std)]
    description = {
        "level": level,
        "random_resized_crop": {"size": prep.input_size, "scale": list(scale), "ratio": [round(r, 3) for r in ratio]},
        "horizontal_flip": hflip,
        "color_jitter": _JITTER[level],
        "policy": "trivial_augment_wide" if level == "strong" else None,
    }
    return T.Compose(steps), description


def mirrored(transform: Callable[[Image.Image], torch.Tensor]) -> Callable[[Image.Image], torch.Tensor]:
    """`transform` applied to the mirror image: the view the flip test reads."""
    return lambda img: transform(img.transpose(Image.Transpose.FLIP_LEFT_RIGHT))
