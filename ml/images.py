"""Decoding user images safely into RGB PIL images.

Every image that enters Graft (ingestion, training, prediction) goes through
`decode_rgb`, so the rules (EXIF orientation, RGB conversion, pixel limit) are
the same everywhere.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageOps, UnidentifiedImageError

# Suffixes we attempt to decode; anything else in an archive is reported as "not an image".
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Default cap on decoded pixels (Pillow's own default is ~89 MP with a warning only).
DEFAULT_MAX_PIXELS = 64_000_000

# Pillow holds big images in blocks (16 MB by default). The C allocator keeps freed blocks of
# that size in per-thread arenas, so a process that decodes large images in several threads
# grows by a full image per thread. Blocks of 64 MB are mapped and unmapped directly instead.
Image.core.set_block_size(64 * 1024 * 1024)


class ImageDecodeError(ValueError):
    """The bytes are not an image we can read; the message says why."""


def decode_rgb(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode `data` into an upright RGB image.

    `min_side` lets decoding skip work and memory: JPEG scales down by a power of two
    while keeping both sides >= `min_side` (Pillow's draft mode); an image of another
    format more than 4x that size is reduced right after decoding, to about twice it,
    before any conversion copies it (a 64-MP PNG then holds its full size once, briefly).
    Any failure of the decoder on hostile bytes is an `ImageDecodeError`.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img: Image.Image = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"image is {width}x{height} pixels, over the limit of {max_pixels:,} pixels")
            if min_side and img.format == "JPEG":
                img.draft("RGB", _draft_target(width, height, min_side))
            img.seek(0)  # first frame of animations (GIF, WebP, TIFF pages)
            img.load()
            if min_side:
                img = _reduce(img, min_side)
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)
    except (ImageDecodeError, MemoryError):
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(_reason(exc)) from None
    except Exception as exc:  # noqa: BLE001 - hostile bytes make decoders raise anything (TypeError, ...)
        raise ImageDecodeError(f"corrupt or truncated image ({exc.__class__.__name__}: {exc})") from None


def _reduce(img: Image.Image, min_side: int) -> Image.Image:
    factor = min(img.size) // (2 * min_side)
    if factor < 2:
        return img
    try:
        if img.mode == "P":  # reduce() has no palette mode: 4 bytes a pixel, as the decode gate counts
            img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        elif img.mode.startswith("I;16"):
            img = img.convert("I")
        elif img.mode == "1":  # bilevel: reduce() has no such mode either
            img = img.convert("L")
        if "A" in img.mode:  # reduce() would first copy it whole, premultiplied: a band at a time instead
            return Image.merge(img.mode, [img.getchannel(b).reduce(factor) for b in img.getbands()])
        return img.reduce(factor)
    except ValueError:  # a mode reduce() does not handle (16-bit, palette): the full size stays
        return img


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
    except MemoryError:
        raise
    except Exception:  # noqa: BLE001 - unreadable, whatever the decoder raised
        return None


def header_pixels(data: bytes) -> int:
    """Pixels the header declares (what decoding will hold), or 1 when it is unreadable."""
    size = header_size(data)
    return size[0] * size[1] if size else 1


class PixelGate:
    """A counting semaphore in pixels: decodes wait until the pixels they will hold fit.

    Many small images decode at once; one huge image waits for the others and then runs
    alone (a request for more than the capacity is admitted alone, never refused here).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free = capacity
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        need = max(1, min(pixels, self.capacity))
        with self._cond:
            self._cond.wait_for(lambda: self._free >= need)
            self._free -= need
        try:
            yield
        finally:
            with self._cond:
                self._free += need
                self._cond.notify_all()


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
