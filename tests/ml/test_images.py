from __future__ import annotations

import io

import pytest
from PIL import Image

from ml.images import ImageDecodeError, decode_rgb


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("I;16", "PNG"),
        ("P", "GIF"),
        ("RGB", "WEBP"),
        ("RGB", "BMP"),
        ("RGB", "TIFF"),
    ],
)
def test_every_mode_becomes_rgb(mode, fmt):
    img = Image.new(mode, (20, 10))
    out = decode_rgb(_encode(img, fmt))
    assert out.mode == "RGB" and out.size == (20, 10)


def test_sixteen_bit_grayscale_keeps_its_range():
    img = Image.new("I;16", (4, 4), 4000)
    img.putpixel((0, 0), 8000)
    out = decode_rgb(_encode(img, "PNG"))
    assert out.getpixel((0, 0))[0] == 255 and 100 < out.getpixel((1, 1))[0] < 150


def test_exif_orientation_is_honoured():
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    out = decode_rgb(_encode(img, "JPEG", exif=exif))
    assert out.size == (20, 40)


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    assert decode_rgb(_encode(img, "PNG")).getpixel((0, 0)) == (255, 255, 255)


def test_gif_first_frame():
    frames = [Image.new("P", (8, 8), i) for i in (10, 200)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    assert decode_rgb(buf.getvalue()).size == (8, 8)


def test_pixel_limit_and_garbage():
    with pytest.raises(ImageDecodeError, match="over the limit"):
        decode_rgb(_encode(Image.new("L", (3000, 3000)), "PNG"), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_rgb(b"hello")


def test_jpeg_draft_keeps_requested_short_side():
    data = _encode(Image.new("RGB", (2000, 1000)), "JPEG")
    out = decode_rgb(data, min_side=256)
    assert min(out.size) >= 256 and out.size[0] < 2000
