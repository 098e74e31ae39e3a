"""A model's input, without torch: the `Preprocessing` record and its eval transform in numpy and Pillow.

Serving reads bundles with it (through ml.bundle_format), and a predictor that runs ONNX Runtime
alone prepares its images with it, so a web process need never import torch. The transform is
ml.preprocess.eval_transform's, bit for bit: the same resize kernel (torchvision's antialiased uint8
resize, ATen's separable fixed-point kernel), the same centre crop, the same scaling and
normalisation (tests/ml/test_torch_free.py). It takes about twice torch's time: numpy has no int16
multiply-add, which ATen's kernel is built on.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

F32 = np.ndarray[Any, np.dtype[np.float32]]
U8 = np.ndarray[Any, np.dtype[np.uint8]]
I32 = np.ndarray[Any, np.dtype[np.int32]]
F64 = np.ndarray[Any, np.dtype[np.float64]]


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


# --- torchvision's antialiased uint8 resize -------------------------------------------------------
# ATen's separable kernel (UpSampleKernel.cpp), as ml/standalone_predict.py writes it out (the
# bundle's predict.py imports nothing of Graft, so it keeps its own copy), here vectorised, with each
# axis's weights cached, computing only the rows and columns the centre crop keeps (each output
# pixel depends on its own taps alone, so the crop's pixels are unchanged). On hymenoptera's photos,
# bicubic 272/240: median 2.4 ms a photo here, 21 ms there.


def _triangle(x: F64) -> F64:
    x = np.abs(x)
    out: F64 = np.where(x < 1.0, 1.0 - x, 0.0)
    return out


def _keys_cubic(x: F64) -> F64:
    a = -0.5  # Keys' cubic, as Pillow and torchvision use with antialiasing
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    out: F64 = np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))
    return out


FILTERS: dict[str, tuple[Callable[[F64], F64], int]] = {"bilinear": (_triangle, 2), "bicubic": (_keys_cubic, 4)}


@functools.lru_cache(maxsize=64)  # 8 bytes a tap, ~20-60 kB a side; photos come in few sizes
def _weights(in_size: int, out_size: int, interpolation: str) -> tuple[I32, I32, int]:
    """Per output pixel: its source indices and int16-range fixed-point weights; and their precision (bits).

    ATen's `_compute_indices_min_size_weights_aa` in double, operation for operation, so the
    rounding to fixed point lands where it does there. Unused taps get weight 0 and the first
    source index (so the indices' span is the span read)."""
    filter_fn, interp_size = FILTERS[interpolation]
    scale = in_size / out_size
    support = interp_size * 0.5 * scale if scale >= 1.0 else interp_size * 0.5
    taps = math.ceil(support) * 2 + 1
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    center = scale * (np.arange(out_size, dtype=np.float64) + 0.5)
    xmin = np.maximum(np.trunc(center - support + 0.5), 0).astype(np.int64)
    xmax = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)
    xsize = np.minimum(np.maximum(xmax - xmin, 0), taps)
    j = np.arange(taps)
    used = j[None, :] < xsize[:, None]
    weight = np.where(used, filter_fn(((j[None, :] + xmin[:, None]) - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(out_size)
    for k in range(taps):  # summed in tap order, as the kernel does
        total = total + weight[:, k]
    weight = np.where(total[:, None] != 0.0, weight / np.where(total == 0.0, 1.0, total)[:, None], weight)
    precision = 0
    while precision < 22 and int(0.5 + weight.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    scaled = weight * (1 << precision)
    fixed = np.where(scaled < 0, np.trunc(scaled - 0.5), np.trunc(scaled + 0.5)).astype(np.int32)
    index = np.where(used, j[None, :] + xmin[:, None], xmin[:, None]).astype(np.int32)
    index.flags.writeable = fixed.flags.writeable = False  # shared by every caller of the cache
    return index, fixed, precision


def _rows_read(in_size: int, out_size: int, interpolation: str, start: int, stop: int) -> tuple[int, int]:
    """The source rows (first, past the last) that output rows `start:stop` read."""
    index = _weights(in_size, out_size, interpolation)[0][start:stop]
    return int(index.min()), int(index.max()) + 1


def _resample_rows(x: U8, in_size: int, out_size: int, interpolation: str, start: int, stop: int, first: int = 0) -> U8:
    """Output rows `start:stop` of an (in_size, W, C) image resampled along its first axis to `out_size`
    rows; `x` holds its rows from `first` on, at least those they read.

    Int32 sums of uint8 x int16-range products, rounded and clipped as ATen does. Along the first
    axis every tap is a gather of whole rows, which numpy does fast (columns it does ~40x slower)."""
    index, fixed, precision = _weights(in_size, out_size, interpolation)
    index, fixed = index[start:stop] - first, fixed[start:stop]
    acc = np.full((stop - start, *x.shape[1:]), 1 << (precision - 1), np.int32)
    for k in range(index.shape[1]):
        if fixed[:, k].any():
            acc += np.multiply(x[index[:, k]], fixed[:, k, None, None], dtype=np.int32)
    acc >>= precision
    out: U8 = np.clip(acc, 0, 255).astype(np.uint8)
    return out


def _transposed(x: U8 | Image.Image) -> U8:
    """(H, W, 3) as (W, H, 3): Pillow transposes RGB about twice as fast as numpy copies a transposed view."""
    img = x if isinstance(x, Image.Image) else Image.fromarray(x)
    out: U8 = np.asarray(img.transpose(Image.Transpose.TRANSPOSE))
    return out


def resized_crop(img: Image.Image, resize_size: int, crop: int, interpolation: str) -> U8:
    """torchvision's `center_crop(resize(x, [resize_size], antialias=True), [crop])` of an RGB image, as
    uint8 (crop, crop, 3). The resize is ATen's: horizontal pass first, then vertical, each rounded to
    uint8; a side that keeps its length is not resampled."""
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
    # The source rows the crop's rows read: the horizontal pass needs no others.
    first, last = _rows_read(h, new_h, interpolation, top, top + crop) if new_h != h else (top, top + crop)
    if new_w != w:
        wide = _transposed(img)[:, first:last]  # (W, rows, 3)
        x = _transposed(_resample_rows(wide, w, new_w, interpolation, left, left + crop))
    else:
        x = np.asarray(img)[first:last, left : left + crop]
    return _resample_rows(x, h, new_h, interpolation, top, top + crop, first) if new_h != h else x


def numpy_eval_transform(p: Preprocessing) -> Callable[[Image.Image], F32]:
    """ml.preprocess.eval_transform in numpy and Pillow, bit for bit: an RGB image to the model's
    (3, S, S) float32 input (resize the shorter side, centre-crop, scale to [0, 1], normalise)."""
    mean = np.asarray(p.mean, np.float32).reshape(3, 1, 1)
    std = np.asarray(p.std, np.float32).reshape(3, 1, 1)
    scale = np.float32(1.0 / 255)  # what torchvision's to_dtype(scale=True) multiplies by

    def transform(img: Image.Image) -> F32:
        x = resized_crop(img, p.resize_size, p.input_size, p.interpolation)
        scaled = x.transpose(2, 0, 1).astype(np.float32, order="C") * scale
        out: F32 = (scaled - mean) / std
        return out

    return transform
