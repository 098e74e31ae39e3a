"""Decoding user images safely into RGB PIL images.

Every image that enters Graft (ingestion, training, prediction) goes through
`decode_rgb`, so the rules (EXIF orientation, RGB conversion, pixel limit) are
the same everywhere.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

# Suffixes we attempt to decode; anything else in an archive is reported as "not an image".
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Default cap on decoded pixels (Pillow's own default is ~89 MP with a warning only).
DEFAULT_MAX_PIXELS = 64_000_000


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why."""


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode `data` into an upright RGB image.

    `min_side` lets JPEG decoding skip work: the decoder scales down by a power
    of two while keeping both sides >= `min_side` (Pillow's draft mode).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels")
            if min_side and img.format == "JPEG":
                img.draft("RGB", _draft_target(width, height, min_side))
            img.seek(0)  # first frame of animations (GIF, WebP, TIFF pages)
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except ImageDecodeError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(_reason(exc)) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise ImageDecodeError(f"corrupt or truncated image ({exc})") from None


def thumbnail_jpeg(data: bytes, side: int, *, max_pixels: int = DEFAULT_MAX_PIXELS, quality: int = 80) -> bytes:
    """A JPEG of the image at most `side` pixels on its longer side (decoded cheaply where JPEG allows)."""
    img = decode_rgb(data, max_pixels=max_pixels, min_side=side)
    img.thumbnail((side, side))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, or None if unreadable."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def _draft_target(width: int, height: int, min_side: int) -> tuple[int, int]:
    # draft() keeps the image at least this big; preserve aspect so the short side stays >= min_side.
    short = min(width, height)
    if short <= min_side:
        return width, height
    scale = min_side / short
    return max(1, int(width * scale)), max(1, int(height * scale))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grayscale: rescale to 8 bits instead of clipping at 255.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() or 1.0
        img = Image.fromarray((arr * (255.0 / hi)).astype("uint8"), mode="L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image Pillow can read"
    return f"decompression-bomb guard: {exc}"
