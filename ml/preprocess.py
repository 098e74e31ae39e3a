"""The eval-time transform, shared by feature extraction, export and prediction."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ml.backbones import Preprocessing

_INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def eval_transform(p: Preprocessing) -> Callable[[Image.Image], torch.Tensor]:
    return T.Compose(
        [
            T.PILToTensor(),
            T.Resize(p.resize_size, interpolation=_INTERPOLATION[p.interpolation], antialias=True),
            T.CenterCrop(p.input_size),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize(p.mean, p.std),
        ]
    )
