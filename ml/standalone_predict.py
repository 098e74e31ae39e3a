"""Predict with a Graft model bundle, anywhere: it needs only onnxruntime, numpy and Pillow.

    pip install onnxruntime numpy pillow
    python predict.py photo.jpg [more.png ...] [--k 5] [--precision auto|fp32|int8]

Each image gives one JSON line, `{"file", "predictions": [{"label", "score"}, ...]}` best first,
or `{"file", "error"}` when it cannot be read (the others go on; the exit status is then 1).
The model, its labels (labels.json) and its preprocessing (preprocessing.json) are read from the
folder this file is in: the unzipped bundle. The model is model.int8.onnx where the bundle has one
(Graft kept it because it predicts as the fp32 model does; graft.json's `int8` has the figures)
and this CPU multiplies int8 as the one that checked it did, else model.onnx; `--precision fp32`
runs model.onnx always, `--precision int8` the int8 model always.

The preprocessing is the server's, number for number: Graft decodes with Pillow (EXIF orientation,
grayscale/RGBA/CMYK/16-bit to RGB, JPEG decoded at a reduced size where the input allows) and
resizes with Pillow's antialiased filter, over the centre crop's own source box.

In the Graft repository this file is ml/standalone_predict.py; every bundle carries it as
predict.py. It imports nothing from Graft.
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

try:
    import numpy as np
    import onnxruntime as ort
    from PIL import Image, ImageOps, UnidentifiedImageError
except ImportError as exc:  # pragma: no cover - the message is for a machine without them
    sys.exit(f"predict.py needs onnxruntime, numpy and Pillow ({exc}): pip install onnxruntime numpy pillow")

HERE = Path(__file__).resolve().parent
DEFAULT_K = 5  # what the server's prediction endpoint returns
MAX_PIXELS = 64_000_000  # the server's cap on decoded pixels

U8 = np.ndarray[Any, np.dtype[np.uint8]]
F32 = np.ndarray[Any, np.dtype[np.float32]]


# --- Decoding: the server's ml.images.decode_rgb, with min_side = resize_size -------------------


class TooLarge(ValueError):
    """More pixels than the server decodes."""


def decode_rgb(data: bytes, min_side: int, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """An upright RGB image, decoded (and reduced) exactly as the server decodes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        img: Image.Image = Image.open(io.BytesIO(data))
        width, height = img.size
        if width * height > max_pixels:
            raise TooLarge(f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels")
        if img.format == "JPEG":  # the decoder scales down by a power of two, keeping min_side
            img.draft("RGB", _draft_target(width, height, min_side))
        img.seek(0)  # first frame of animations
        img.load()
        img = _reduce(img, min_side)
        img = ImageOps.exif_transpose(img)
        return _to_rgb(img)


def _draft_target(width: int, height: int, min_side: int) -> tuple[int, int]:
    short = min(width, height)
    if short <= min_side:
        return width, height
    scale = min_side / short
    return max(1, int(width * scale)), max(1, int(height * scale))


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    """A non-JPEG image over 4x the input is box-reduced to about twice it before anything else."""
    factor = min(img.size) // (2 * min_side)
    if factor < 2:
        return img
    try:
        if img.mode == "P":
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode.startswith("I;16"):
            img = img.convert("I")
        elif img.mode == "1":
            img = img.convert("L")
        if "A" in img.mode:
            return Image.merge(img.mode, [img.getchannel(b).reduce(factor) for b in img.getbands()])
        return img.reduce(factor)
    except ValueError:
        return img


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescaled, not clipped
        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).astype("uint8"), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")  # transparent pixels go on white
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


# --- Resizing: the server's ml.preprocessing, Pillow's antialiased filter over the crop's box ---------

_RESAMPLING = getattr(Image, "Resampling", Image)  # Pillow before 9.1 keeps the filters on Image itself
FILTERS = {"bilinear": _RESAMPLING.BILINEAR, "bicubic": _RESAMPLING.BICUBIC}


def resized_crop(img: Image.Image, resize_size: int, crop: int, interpolation: str) -> U8:
    """The centre `crop` x `crop` of `img` with its shorter side resized to `resize_size`, as uint8
    (crop, crop, 3): Pillow resamples the crop's source box alone, with torchvision's offsets."""
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize_size, int(resize_size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    if crop > new_w or crop > new_h:  # never from Graft: its resize side is at least its crop
        raise ValueError(f"a {new_w}x{new_h} resized image is smaller than the {crop}-px crop")
    top, left = int(round((new_h - crop) / 2.0)), int(round((new_w - crop) / 2.0))
    sx, sy = w / new_w, h / new_h
    box = (left * sx, top * sy, (left + crop) * sx, (top + crop) * sy)
    out: U8 = np.asarray(img.resize((crop, crop), FILTERS[interpolation], box=box, reducing_gap=None))
    return out


def preprocess(img: Image.Image, prep: dict[str, Any]) -> F32:
    """An RGB image to the model's (3, S, S) float32 input: resize, centre crop, scale, normalise."""
    if prep["interpolation"] not in FILTERS:
        raise ValueError(f"interpolation must be one of {', '.join(FILTERS)}, not {prep['interpolation']!r}")
    x = resized_crop(img, prep["resize_size"], prep["input_size"], prep["interpolation"])
    out: F32 = x.transpose(2, 0, 1).astype(np.float32, order="C")
    out *= np.float32(1.0 / 255)
    out -= np.asarray(prep["mean"], np.float32).reshape(3, 1, 1)
    out /= np.asarray(prep["std"], np.float32).reshape(3, 1, 1)
    return out


# --- The model ------------------------------------------------------------------------------------


class Model:
    """The bundle in `folder`: its ONNX model, labels and preprocessing."""

    def __init__(self, folder: Path = HERE, precision: str = "auto") -> None:
        self.labels: list[str] = json.loads((folder / "labels.json").read_text("utf-8"))
        self.prep: dict[str, Any] = json.loads((folder / "preprocessing.json").read_text("utf-8"))
        int8 = folder / "model.int8.onnx"
        if precision == "int8" and not int8.is_file():
            raise FileNotFoundError("this bundle has no int8 model (model.int8.onnx)")
        card = folder / "graft.json"
        checked = (json.loads(card.read_text("utf-8")).get("int8") or {}) if card.is_file() else {}
        same = _int8_arithmetic() in ("exact", checked.get("arithmetic", "exact"))
        auto = precision == "auto" and same
        self.file = int8 if int8.is_file() and (precision == "int8" or auto) else folder / "model.onnx"
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        self.session = ort.InferenceSession(str(self.file), options, providers=["CPUExecutionProvider"])
        self.input = self.session.get_inputs()[0].name

    def predict(self, data: bytes, k: int = DEFAULT_K) -> list[dict[str, Any]]:
        """Top-k {label, score} for one encoded image, best first (softmax probabilities)."""
        x = preprocess(decode_rgb(data, self.prep["resize_size"]), self.prep)
        logits = self.session.run(None, {self.input: x[None]})[0][0].astype(np.float32)
        e = np.exp(logits - logits.max())
        scores = e / e.sum()
        best = np.argsort(-scores, kind="stable")[: max(1, min(k, len(self.labels)))]
        return [{"label": self.labels[i], "score": float(scores[i])} for i in best]


def _int8_arithmetic() -> str:
    """ "exact" where this CPU adds int8 products in 32 bits (x86 with VNNI or AMX, ARM), else
    "saturating": x86 without VNNI adds pairs in 16 bits and clips, and the int8 model answers
    otherwise there. Graft's ml/predict.py `int8_arithmetic` says more."""
    if platform.machine().lower() in ("aarch64", "arm64"):
        return "exact"
    try:
        lines = Path("/proc/cpuinfo").read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    return "exact" if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags) else "saturating"


def _reason(exc: Exception) -> str:
    """The server's words for an image it cannot decode."""
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    if isinstance(exc, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return f"decompression-bomb guard: {exc}"
    if isinstance(exc, TooLarge):
        return str(exc)
    return f"corrupt or truncated image ({exc.__class__.__name__}: {exc})"


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, not {text!r}")
    return int(text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Top-k labels for images, one JSON line per image.")
    parser.add_argument("images", nargs="+", type=Path)
    parser.add_argument("--k", "-k", type=_positive, default=DEFAULT_K, help=f"labels per image (default {DEFAULT_K})")
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "int8"],
        default="auto",
        help="auto: the int8 model where the bundle has one and this CPU multiplies int8 as the one that checked it, "
        "else the fp32 model",
    )
    args = parser.parse_args(argv)
    try:
        model = Model(precision=args.precision)
    except FileNotFoundError as exc:
        parser.error(str(exc))
    failed = 0
    for path in args.images:
        line: dict[str, Any] = {"file": str(path)}
        try:
            data = path.read_bytes()
        except OSError as exc:
            line["error"] = f"cannot be read: {exc.strerror or exc}"
        else:
            try:
                line["predictions"] = model.predict(data, args.k)
            except Exception as exc:  # noqa: BLE001 - hostile bytes make decoders raise anything
                line["error"] = f"cannot be read as an image: {_reason(exc)}"
        failed += "error" in line
        print(json.dumps(line, ensure_ascii=False), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
