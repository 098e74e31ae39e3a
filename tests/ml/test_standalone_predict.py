"""The bundle's predict.py: the server's answers from onnxruntime, numpy and Pillow alone.

The fast tests hold its preprocessing to the server's (ml.preprocessing), bit for bit, and run it in a
tiny bundle.
The slow one trains a real linear probe, then runs the bundle's predict.py in a fresh venv that
holds only onnxruntime, numpy and Pillow, with no Graft code on its path.
"""

from __future__ import annotations

import importlib.metadata
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from ml import standalone_predict
from ml.backbones import Preprocessing
from ml.bundle import unpack_bundle, write_bundle
from ml.images import decode_rgb
from ml.predict import Predictor
from ml.preprocessing import numpy_eval_transform, resized_crop
from tests.conftest import IN_CI, ROOT

PACKAGES = ("onnxruntime", "numpy", "pillow")


def _encode(img: Image.Image, fmt: str, **params) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **params)
    return buf.getvalue()


def awkward_images(photo: Image.Image) -> dict[str, bytes]:
    """One RGB photo in each form the server's decoder turns around or converts."""
    rgb = photo.convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored turned; a viewer (and Graft) turns it 90 degrees clockwise
    alpha = Image.linear_gradient("L").resize(rgb.size)  # from opaque to transparent, top to bottom
    deep = (np.asarray(rgb.convert("L"), np.uint16) * 200).astype(np.uint16)  # 16-bit, not full range
    w, h = rgb.size
    return {
        "exif-rotated.jpg": _encode(rgb.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=92),
        "grayscale.png": _encode(rgb.convert("L"), "PNG"),
        "rgba.png": _encode(Image.merge("RGBA", (*rgb.split(), alpha)), "PNG"),
        "cmyk.jpg": _encode(rgb.convert("CMYK"), "JPEG", quality=92),
        "16-bit.png": _encode(Image.fromarray(deep), "PNG"),
        "palette.gif": _encode(rgb.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0),
        "big.png": _encode(rgb.resize((w * 1200 // min(w, h), h * 1200 // min(w, h))), "PNG"),  # reduced first
        "tiny.jpg": _encode(rgb.resize((40, 30)), "JPEG"),  # enlarged, not reduced
    }


def _photo(seed: int, size: tuple[int, int] = (500, 375)) -> Image.Image:
    """Smooth shapes and fine noise: something for a resize to blur, like a photo."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / 40.0
    channels = [np.sin(x * rng.uniform(0.5, 2) + y * rng.uniform(0.5, 2) + rng.uniform(0, 6)) for _ in range(3)]
    base = (np.stack(channels, -1) + 1) * 100 + rng.normal(0, 20, (size[1], size[0], 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


PREPROCESSINGS = [
    Preprocessing(240, 272, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # EfficientNet-Lite0 (timm)
    Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),  # torchvision zoo
    Preprocessing(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # small images: no centre crop
]


@pytest.mark.parametrize("prep", PREPROCESSINGS, ids=lambda p: f"{p.interpolation}-{p.resize_size}-{p.input_size}")
def test_preprocessing_is_the_servers_bit_for_bit(prep):
    server = numpy_eval_transform(prep)
    images = {f"{name} of {i}": data for i, photo in enumerate([_photo(0), _photo(1, (333, 517))])
              for name, data in awkward_images(photo).items()}  # fmt: skip
    images["plain.jpg"] = _encode(_photo(2, (1024, 683)), "JPEG")  # decoded at a reduced size (draft)
    for name, data in images.items():
        theirs = server(decode_rgb(data, min_side=prep.resize_size))
        ours = standalone_predict.preprocess(standalone_predict.decode_rgb(data, prep.resize_size), asdict(prep))
        assert ours.dtype == np.float32 and ours.shape == theirs.shape, name
        assert np.array_equal(ours, theirs), f"{name}: differs by up to {np.abs(ours - theirs).max()}"


def test_the_resize_is_the_servers_at_any_scale():
    rng = np.random.default_rng(0)
    for interpolation in ("bilinear", "bicubic"):
        for h, w, size, crop in [(5, 7, 64, 64), (300, 299, 272, 240), (2000, 90, 256, 224), (64, 64, 64, 64),
                                 (1, 9, 3, 3), (97, 513, 96, 96)]:  # fmt: skip
            img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
            theirs = resized_crop(img, size, crop, interpolation)
            ours = standalone_predict.resized_crop(img, size, crop, interpolation)
            assert np.array_equal(ours, theirs), (interpolation, h, w, size, crop)


# --- predict.py in a bundle ----------------------------------------------------------------------------


def run_predict_py(python: str | Path, folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`python -I predict.py ARGS` in the unzipped bundle: isolated, so nothing of Graft is on its path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return subprocess.run(
        [str(python), "-I", "predict.py", *args], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 6)).eval()
    prep = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic")
    out = tmp_path_factory.mktemp("bundle")
    archive = write_bundle(
        out, model=model, classes=list("abcdef"), preprocessing=prep, metrics={}, card={"backbone": "tiny"}
    )
    return unpack_bundle(archive, tmp_path_factory.mktemp("unzipped"))


def test_every_bundle_carries_predict_py_and_a_readme(tiny_bundle):
    assert (tiny_bundle / "predict.py").read_bytes() == Path(standalone_predict.__file__).read_bytes()
    readme = (tiny_bundle / "README.md").read_text()
    assert "pip install onnxruntime numpy pillow" in readme and "python predict.py photo.jpg" in readme


def test_predict_py_prints_a_json_line_per_image_and_goes_on_past_a_bad_one(tiny_bundle, tmp_path):
    images = {name: data for name, data in awkward_images(_photo(3, (120, 90))).items() if name != "big.png"}
    for name, data in images.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    files = [str(tmp_path / n) for n in [*images, "broken.jpg", "missing.png"]]

    proc = run_predict_py(sys.executable, tiny_bundle, "--k", "3", *files)

    assert proc.returncode == 1, proc.stderr  # two of them failed
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == files
    assert lines[-2]["error"] == "cannot be read as an image: not an image Pillow can read"
    assert lines[-1]["error"].startswith("cannot be read: ")
    server = Predictor(tiny_bundle, runtime="onnxruntime")
    for line, data in zip(lines[: len(images)], images.values(), strict=True):
        expected = server.predict_bytes([data], k=3)[0]
        assert [p["label"] for p in line["predictions"]] == [p.label for p in expected], line["file"]
        assert max(abs(p["score"] - e.score) for p, e in zip(line["predictions"], expected, strict=True)) < 1e-6


def test_predict_py_returns_the_servers_k_by_default(tiny_bundle, tmp_path):
    (tmp_path / "a.png").write_bytes(_encode(_photo(4, (50, 60)), "PNG"))
    proc = run_predict_py(sys.executable, tiny_bundle, str(tmp_path / "a.png"))
    assert proc.returncode == 0, proc.stderr
    (line,) = [json.loads(x) for x in proc.stdout.splitlines()]
    scores = [p["score"] for p in line["predictions"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)


# --- A real bundle in a clean environment --------------------------------------------------------------


def clean_python() -> Path:
    """A venv holding only onnxruntime, numpy and Pillow (this environment's versions), cached in the temp
    dir under a name made of the versions. Skips when pip cannot reach the registry, except in CI."""
    pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
    key = f"py{sys.version_info.major}.{sys.version_info.minor}-" + "-".join(p.replace("==", "") for p in pins)
    home = Path(tempfile.gettempdir()) / "graft-predict-venv" / key
    python = home / "bin" / "python"
    if (home / "ready").is_file():
        return python
    building = home.with_name(f"{key}.{os.getpid()}")
    shutil.rmtree(building, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(building)], check=True, timeout=300)
    pip = subprocess.run(
        [str(building / "bin" / "python"), "-m", "pip", "install", "--no-input", "--disable-pip-version-check", *pins],
        capture_output=True,
        text=True,
        timeout=900,
    )
    if pip.returncode != 0:
        shutil.rmtree(building, ignore_errors=True)
        unreachable = any(hint in pip.stdout + pip.stderr for hint in NETWORK_FAILURES)
        if unreachable and not IN_CI:
            pytest.skip(f"pip cannot reach the package registry to build a clean venv: {pip.stderr.strip()[-300:]}")
        pytest.fail(f"pip install {' '.join(pins)} failed:\n{pip.stderr[-3000:]}")
    (building / "ready").write_text("\n".join(pins) + "\n")
    try:
        building.rename(home)  # (building's venv scripts name it, but `bin/python -I` needs nothing of them)
    except OSError:  # another run finished first: use its venv
        shutil.rmtree(building, ignore_errors=True)
    return python


NETWORK_FAILURES = (
    "No matching distribution found",
    "Max retries exceeded",
    "NewConnectionError",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
)


def _subset(source: Path, out: Path, per_class: dict[str, int]) -> Path:
    """The first images of each class of each split, by name (a quick, real training set)."""
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(out, "w") as dst:
        names = sorted(n for n in src.namelist() if n.endswith(".jpg"))
        for split, n in per_class.items():
            for cls in ("ants", "bees"):
                for name in [x for x in names if x.startswith(f"{split}/{cls}/")][:n]:
                    dst.writestr(name, src.read(name))
    return out


@pytest.mark.slow
def test_a_fresh_venv_gets_the_servers_answers_from_a_real_bundle(datasets_dir, tmp_path):
    python = clean_python()
    data = _subset(datasets_dir / "hymenoptera.zip", tmp_path / "ants-bees.zip", {"train": 12, "val": 10})
    fit = subprocess.run(
        [sys.executable, "-m", "ml", "fit", str(data), "--out", str(tmp_path / "fit"), "--strategy", "linear",
         "--resolution", "native"],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    bundle = tmp_path / "bundle"
    with zipfile.ZipFile(tmp_path / "fit" / "bundle.zip") as zf:
        zf.extractall(bundle)  # as a user unzips it
    # The validation images, and one of them in each awkward form.
    images = tmp_path / "images"
    images.mkdir()
    with zipfile.ZipFile(data) as zf:
        val = sorted(n for n in zf.namelist() if n.startswith("val/"))
        for name in val:
            (images / name.replace("/", "_")).write_bytes(zf.read(name))
        awkward = awkward_images(Image.open(io.BytesIO(zf.read(val[0]))))
    for name, data_ in awkward.items():
        (images / name).write_bytes(data_)
    files = sorted(images.iterdir())

    proc = run_predict_py(python, bundle, "--k", "2", *(str(f) for f in files))

    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(f) for f in files]
    servers = {runtime: Predictor(bundle, runtime=runtime) for runtime in ("onnxruntime", "torchscript")}
    worst = {runtime: 0.0 for runtime in servers}
    for line, file in zip(lines, files, strict=True):
        for runtime, server in servers.items():
            (expected,) = server.predict_bytes([file.read_bytes()], k=2)
            assert line["predictions"][0]["label"] == expected[0].label, (file.name, runtime, line, expected)
            diff = max(abs(p["score"] - e.score) for p, e in zip(line["predictions"], expected, strict=True))
            worst[runtime] = max(worst[runtime], diff)
    print(f"\npredict.py in a clean venv: {len(lines)} images ({len(awkward)} awkward forms), the server's top-1 "
          f"on all; largest score difference {worst['onnxruntime']:.2g} against ONNX Runtime, "
          f"{worst['torchscript']:.2g} against TorchScript")  # fmt: skip
    assert worst["onnxruntime"] < 1e-4 and worst["torchscript"] < 1e-4, worst
