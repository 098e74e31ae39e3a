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


@pytest.mark.slow
def test_concurrent_decodes_of_huge_pngs_stay_within_a_memory_bound(tmp_path):
    """Eight requests at once, each with 4 x 64-MP PNGs (200 KB each on the wire): through the
    pixel gate, with the reduction right after decoding, the process grows by under 500 MB
    (each decoded whole at once would be 8 x 256 MB)."""
    import subprocess
    import sys

    from PIL import Image

    from tests.conftest import ROOT

    path = tmp_path / "huge.png"
    Image.new("RGBA", (8000, 8000), (10, 200, 30, 255)).save(path)
    script = f"""
import resource
from concurrent.futures import ThreadPoolExecutor
from ml.images import PixelGate, decode_rgb, header_size
data = open({str(path)!r}, "rb").read()
gate = PixelGate(64_000_000)
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def request(_):
    for _ in range(4):
        w, h = header_size(data)
        with gate.hold(w * h):
            img = decode_rgb(data, max_pixels=64_000_000, min_side=274)
        assert min(img.size) >= 548 and img.mode == "RGB"
base = peak()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(request, range(8)))
print(round(peak() - base))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 500, f"{out.stdout.strip()} MB added"


def test_hostile_bytes_that_make_pillow_raise_anything_are_a_decode_error():
    """A 716-byte malformed TIFF made Pillow raise TypeError (a 500 on predict)."""
    import struct

    # A little-endian TIFF whose one IFD entry (StripOffsets) has a type Pillow cannot use.
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 1) + struct.pack("<HHII", 273, 99, 1, 0) + b"\0" * 700
    with pytest.raises(ImageDecodeError):
        decode_rgb(tiff)


def _two_tone(mode: str, size: tuple[int, int]) -> Image.Image:
    """Left half dark, right half bright, in `mode` (16-bit: its own scale)."""
    dark, bright = {"I;16": (4000, 8000), "1": (0, 1)}.get(mode, ((40, 60, 200), (250, 200, 20)))
    if mode in ("RGB", "RGBA", "P"):
        img = Image.new("RGB", size, dark)
        img.paste(bright, (size[0] // 2, 0, size[0], size[1]))
        return img.convert("P", palette=Image.Palette.ADAPTIVE) if mode == "P" else img.convert(mode)
    img = Image.new(mode, size, dark)
    img.paste(bright, (size[0] // 2, 0, size[0], size[1]))
    return img


@pytest.mark.parametrize(
    "mode,transparent", [("RGB", False), ("RGBA", False), ("P", False), ("P", True), ("I;16", False), ("1", False)]
)
def test_an_image_over_four_times_min_side_is_reduced_right_after_decoding_whatever_its_mode(mode, transparent):
    """Decoding for 100-px use, a 2000x1000 PNG is held at about twice that, not at full size (a
    64-MP palette or 16-bit PNG would otherwise be converted to RGB whole), with its colours."""
    img = _two_tone(mode, (2000, 1000))
    if transparent:  # the dark half's palette entry is see-through: it decodes white
        img.info["transparency"] = img.getpixel((0, 0))
    data = _encode(img, "PNG")
    full = decode_rgb(data)
    out = decode_rgb(data, min_side=100)
    assert out.mode == "RGB"
    assert 200 <= min(out.size) < 400 and out.size[0] == 2 * out.size[1], out.size
    for x in (0.25, 0.75):  # each half keeps its colour
        got = out.getpixel((int(x * out.size[0]), out.size[1] // 2))
        want = full.getpixel((int(x * full.size[0]), full.size[1] // 2))
        assert max(abs(g - w) for g, w in zip(got, want, strict=True)) <= 2, (got, want)
