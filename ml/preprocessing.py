"""A model's input, without torch: the `Preprocessing` record and its eval transform in numpy and Pillow.

Serving reads bundles with it (through ml.bundle_format), and every predictor prepares its images with
it, so a web process need never import torch. The transform is ml.preprocess.eval_transform's (resize
the shorter side with antialiasing, centre-crop, scale, normalise), with the resize done by Pillow:
torchvision's antialiased uint8 kernel was written after Pillow's, and the two differ only in how
they round the filter weights to fixed point (ATen to 16 bits at a precision of its own, Pillow to
22 bits). Held to torchvision within a stated tolerance (tests/ml/test_torch_free.py): at most 2
levels of 255 on at most 3 % of the values of any image, 0.1-0.5 % on real photos (at most 1 %); a Lite1 model
gave the same top-1 on all 398 of hymenoptera's photos either way (probabilities within 0.0024).
An exact numpy copy of ATen's kernel served before: 4.7 ms a photo against Pillow's 2.4 ms on an
AVX2 EPYC (bicubic 272/240), 1.9 against 1.5 on a Zen 4.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

F32 = np.ndarray[Any, np.dtype[np.float32]]
U8 = np.ndarray[Any, np.dtype[np.uint8]]


@dataclass(frozen=True)
class Preprocessing:
    """How to turn a decoded RGB image into the backbone's input tensor."""

    input_size: int
    resize_size: int  # shorter side before the centre crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bilinear"

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Preprocessing:
        """The record `dataclasses.asdict` made, read back from JSON (its lists are tuples again)."""
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
        return cls(**values)


# Pillow's filters for the interpolations a Preprocessing names (torchvision's antialiased ones).
FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


def resized_crop(img: Image.Image, resize_size: int, crop: int, interpolation: str) -> U8:
    """torchvision's `center_crop(resize(x, [resize_size], antialias=True), [crop])` of an RGB image, as
    uint8 (crop, crop, 3), within the module's tolerance. Pillow resamples the crop's own source box
    alone: each output pixel depends on its own taps, so the crop's pixels are those of the whole
    resized image, at a fraction of the work; a side that keeps its length is copied as it is."""
    if interpolation not in FILTERS:
        raise ValueError(f"interpolation must be one of {', '.join(FILTERS)}, not {interpolation!r}")
    if img.mode != "RGB":
        raise ValueError(f"the transform takes an RGB image (ml.images.decode_rgb makes one), not mode {img.mode}")
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if crop > new_w or crop > new_h:  # torchvision would pad; Graft's resize side is never below its crop
        raise ValueError(f"a {new_w}x{new_h} resized image is smaller than the {crop}-px crop")
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))  # torchvision's offsets
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    out: U8 = np.asarray(img.resize((crop, crop), FILTERS[interpolation], box=box, reducing_gap=None))
    return out


def numpy_eval_transform(p: Preprocessing) -> Callable[[Image.Image], F32]:
    """ml.preprocess.eval_transform in numpy and Pillow (within the module's tolerance): an RGB image to
    the model's (3, S, S) float32 input (resize the shorter side, centre-crop, scale to [0, 1],
    normalise, with torchvision's float operations in its order)."""
    mean = np.asarray(p.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(p.std, np.float32).reshape(3, 1, 1)
    scale = np.float32(1.0 / 255)  # what torchvision's to_dtype(scale=True) multiplies by

    def transform(img: Image.Image) -> F32:
        x = resized_crop(img, p.resize_size, p.input_size, p.interpolation)
        out: F32 = x.transpose(2, 0, 1).astype(np.float32, order="C")
        out *= scale
        out -= mean
        out /= std
        return out

    return transform
