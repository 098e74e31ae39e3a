"""The eval-time transform in torch, shared by feature extraction, training, and prediction where torch is loaded.

ml.preprocessing holds the same transform in numpy and Pillow, for serving without torch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from ml.preprocessing import Preprocessing

INTERPOLATION = {
    "bilinear": T.InterpolationMode.BILINEAR,
    "bicubic": T.InterpolationMode.BICUBIC,
}


def eval_transform(p: Preprocessing, *, uint8: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Resize, centre-crop, scale and normalise; with `uint8`, stop before scaling (a quarter of the
    bytes to move; `normalize` finishes the job where the model runs).

    The same kernels as `T.Compose([T.PILToTensor(), T.Resize(...), T.CenterCrop(...), T.ToDtype(...),
    T.Normalize(...)])`, bit for bit, called directly: the transforms' dispatch cost 0.3 ms of the
    1.0 ms this takes on a 0.2-MP photo, which a lone prediction waits for.
    """
    interpolation = INTERPOLATION[p.interpolation]
    mean, std = list(p.mean), list(p.std)

    def transform(img: Image.Image) -> torch.Tensor:
        x: torch.Tensor = F.pil_to_tensor(img)
        x = F.resize(x, [p.resize_size], interpolation=interpolation, antialias=True)
        x = F.center_crop(x, [p.input_size])
        if uint8:
            return x
        out: torch.Tensor = F.normalize(F.to_dtype(x, torch.float32, scale=True), mean, std)
        return out

    return transform


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """A uint8 (N, 3, H, W) batch scaled to [0, 1] and normalised, on the device it is on
    (`mean` and `std` shaped (1, 3, 1, 1) there): the last step of `eval_transform`."""
    return x.float().div_(255).sub_(mean).div_(std)


MIN_INPUT = 64  # smallest input: the backbones downsample 32x, leaving a 2x2 map
MAX_UPSCALE = 2  # enlarging small images further adds compute, not information


def choose_preprocessing(native: Preprocessing, short_sides: list[int]) -> tuple[Preprocessing, str]:
    """The input resolution follows the data: small images get a small input.

    Images at least as large as the backbone's native input use its native
    preprocessing. Smaller ones (8-px digits, 28-px crops) are upscaled at most
    2x, to a multiple of 32 and not below 64 px, and not centre-cropped (their
    edges carry the content). Compute falls with the square of the side: 64 px
    costs 1/12 of 224 px.
    """
    if not short_sides:
        return native, "no images to measure; the backbone's native input"
    median = sorted(short_sides)[len(short_sides) // 2]
    if median >= native.input_size:
        return native, (
            f"median short side {median} px >= the backbone's {native.input_size} px input: native preprocessing"
        )
    size = min(native.input_size, max(MIN_INPUT, -(-median * MAX_UPSCALE // 32) * 32))
    if size == native.input_size:
        return native, (f"median short side {median} px, upscaled {MAX_UPSCALE}x reaches the native {size} px input")
    prep = replace(native, input_size=size, resize_size=size)
    return prep, (
        f"median short side {median} px: input {size} px (at most {MAX_UPSCALE}x upscaled, multiple of 32, "
        f">= {MIN_INPUT}), no centre crop; {(native.input_size / size) ** 2:.0f}x less compute than "
        f"{native.input_size} px"
    )
