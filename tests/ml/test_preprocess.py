"""The eval transform: torchvision's own pipeline, bit for bit, at every preprocessing the engine uses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ml.backbones import Preprocessing
from ml.preprocess import INTERPOLATION, eval_transform

PREPS = [
    Preprocessing(240, 272, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # Lite1, native
    Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),
    Preprocessing(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # small images: upscaled, no crop
]


def _compose(p: Preprocessing, uint8: bool) -> T.Compose:
    steps = [
        T.PILToTensor(),
        T.Resize(p.resize_size, interpolation=INTERPOLATION[p.interpolation], antialias=True),
        T.CenterCrop(p.input_size),
    ]
    if not uint8:
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(p.mean, p.std)]
    return T.Compose(steps)


@pytest.mark.parametrize("uint8", [False, True])
@pytest.mark.parametrize("p", PREPS, ids=lambda p: f"{p.input_size}-{p.interpolation}")
@pytest.mark.parametrize("size", [(500, 375), (343, 496), (8, 8), (1000, 40)])
def test_the_transform_equals_torchvisions_pipeline(p, uint8, size):
    rng = np.random.default_rng(sum(size))
    img = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    want, got = _compose(p, uint8)(img), eval_transform(p, uint8=uint8)(img)
    assert got.dtype == want.dtype and got.shape == (3, p.input_size, p.input_size)
    assert torch.equal(got, want)
