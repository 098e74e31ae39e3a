"""Serving without torch: a bundle is read, and its images prepared and run through ONNX Runtime, by
modules that import neither torch nor timm (ml.bundle_format, ml.preprocessing, ml.predict).

The numpy transform (Pillow's resize) is held to torchvision's (ml.preprocess.eval_transform), which
prepared the model's training and validation images, within a stated tolerance: at most 2 levels of
255 on any value, on at most 3 % of an image's values (1 % on real photos), on real photos of the
shared datasets and on random images at awkward scales. The two resize with the same antialiased
filters and differ only in how they round the weights to fixed point.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

from ml.bundle import unpack_bundle, write_bundle
from ml.bundle_format import read_bundle
from ml.images import decode_rgb
from ml.preprocess import eval_transform
from ml.preprocessing import Preprocessing, numpy_eval_transform, resized_crop
from tests.conftest import ROOT, image_bytes

PREPROCESSINGS = [
    Preprocessing(240, 272, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # EfficientNet-Lite1 (timm)
    Preprocessing(224, 256, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear"),  # torchvision zoo
    Preprocessing(64, 64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic"),  # small images: upscaled, no crop
]

# A few photos of each kind the engine meets: RGB photos (hymenoptera, flowers), grayscale X-rays,
# small signs (upscaled), 8-px digits.
SAMPLES = {
    "hymenoptera.zip": 24,
    "flowers-5class-small.zip": 6,
    "chest_xray_pneumonia_subset.zip": 4,
    "gtsrb-8class-signs.zip": 6,
    "sklearn_digits.zip": 4,
}


def _sample(datasets_dir: Path) -> dict[str, bytes]:
    """Images spread evenly over each zip's sorted names (every split and class), read from the zip."""
    out = {}
    for zip_name, n in SAMPLES.items():
        with zipfile.ZipFile(datasets_dir / zip_name) as zf:
            names = sorted(name for name in zf.namelist() if not name.endswith("/"))
            for name in names[:: max(1, len(names) // n)][:n]:
                out[f"{zip_name}:{name}"] = zf.read(name)
    return out


LEVELS = 2  # the most a value may differ from torchvision's, in levels of 255
SHARE_PHOTOS, SHARE_ANY = 0.01, 0.03  # the most of an image's values that may differ at all


def _levels_apart(got: np.ndarray, want: np.ndarray, std: tuple[float, float, float]) -> np.ndarray:
    """How many levels of 255 apart two normalised (3, S, S) inputs are, per value."""
    scale = np.asarray(std, np.float64).reshape(3, 1, 1) * 255
    return np.rint(np.abs(got.astype(np.float64) - want.astype(np.float64)) * scale)


@pytest.mark.parametrize("prep", PREPROCESSINGS, ids=lambda p: f"{p.interpolation}-{p.resize_size}-{p.input_size}")
def test_the_numpy_transform_is_torchvisions_within_two_levels_on_real_photos(datasets_dir, prep):
    """Each input is decoded as the server decodes it (reduced by the JPEG decoder where the input
    allows), then prepared by both transforms."""
    torchs, numpys = eval_transform(prep), numpy_eval_transform(prep)
    for name, data in _sample(datasets_dir).items():
        img = decode_rgb(data, min_side=prep.resize_size)
        want, got = torchs(img).numpy(), numpys(img)
        assert got.dtype == np.float32 and got.shape == want.shape == (3, prep.input_size, prep.input_size), name
        assert got.flags.c_contiguous, name
        apart = _levels_apart(got, want, prep.std)
        assert apart.max() <= LEVELS, f"{name} {img.size}: {apart.max():.0f} levels apart"
        assert (apart > 0).mean() <= SHARE_PHOTOS, f"{name} {img.size}: {(apart > 0).mean():.2%} of values differ"


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
def test_the_resize_and_crop_are_torchvisions_at_any_scale(interpolation):
    """Down and up, by whole and awkward factors, portrait and landscape, sides left as they are."""
    rng = np.random.default_rng(0)
    cases = [(5, 7, 64, 64), (300, 299, 272, 240), (2000, 90, 256, 224), (64, 64, 64, 64), (1, 9, 3, 3),
             (97, 513, 96, 96), (375, 500, 272, 240), (1200, 1600, 272, 240), (8, 8, 64, 64), (40, 1000, 272, 240),
             (272, 400, 272, 240), (401, 272, 272, 240), (33, 2, 2, 1)]  # fmt: skip
    for h, w, size, crop in cases:
        x = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        chw = torch.from_numpy(x).permute(2, 0, 1)
        want = F.center_crop(F.resize(chw, [size], InterpolationMode(interpolation), antialias=True), [crop])
        got = resized_crop(Image.fromarray(x), size, crop, interpolation)
        apart = np.abs(got.astype(int) - want.permute(1, 2, 0).numpy().astype(int))
        case = (interpolation, h, w, size, crop)
        assert got.shape == (crop, crop, 3) and apart.max() <= LEVELS and (apart > 0).mean() <= SHARE_ANY, case
        if min(h, w) == size:  # nothing to resize: the crop's pixels are the image's own
            assert np.array_equal(got, want.permute(1, 2, 0).numpy()), case


def test_the_transform_names_what_it_takes():
    prep = Preprocessing(32, 36, (0.5,) * 3, (0.5,) * 3, "lanczos")
    with pytest.raises(ValueError, match="bilinear, bicubic"):
        numpy_eval_transform(prep)(Image.new("RGB", (40, 40)))
    with pytest.raises(ValueError, match="RGB"):
        numpy_eval_transform(PREPROCESSINGS[0])(Image.new("L", (300, 300)))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    prep = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3, interpolation="bicubic")
    out = tmp_path_factory.mktemp("bundle")
    archive = write_bundle(
        out, model=model, classes=["a", "b", "c", "d"], preprocessing=prep, metrics={"val_accuracy": 0.5}, card={}
    )
    return archive


SERVE_WITHOUT_TORCH = """
import json, sys, zipfile
from pathlib import Path

from ml.bundle_format import read_bundle, unpack_bundle
from ml.predict import Predictor, predict_archive
from ml.preprocessing import numpy_eval_transform

archive, folder, images = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
unpack_bundle(archive, folder)
info = read_bundle(folder)
transform = numpy_eval_transform(info.preprocessing)
predictor = Predictor(folder, runtime="onnxruntime")
first = bytes.fromhex(images[0])
alone = predictor.predict_bytes([bytes.fromhex(h) for h in images], k=2)
batch = folder.parent / "batch.zip"
with zipfile.ZipFile(batch, "w") as zf:
    for i, h in enumerate(images):
        zf.writestr(f"img_{i}.png", bytes.fromhex(h))
archived = [row.predictions for row in predict_archive(predictor, batch, k=2)]
print(json.dumps({
    "classes": info.classes,
    "metrics": info.metrics,
    "input": list(transform(predictor.decode(first)).shape),
    "prepare_agrees": bool((transform(predictor.decode(first)) == predictor.prepare(first)).all()),
    "alone": [[(p.label, p.score) for p in row] for row in alone],
    "archived": [[(p.label, p.score) for p in row] for row in archived],
    "imported": sorted(m for m in ("torch", "timm", "torchvision") if m in sys.modules),
}))
"""


def test_a_bundle_is_read_and_served_with_onnx_runtime_without_importing_torch_or_timm(bundle, tmp_path):
    """In a fresh process: unpack, read the bundle and its preprocessing, build the numpy transform,
    predict one image at a time and an archive; then neither torch, timm nor torchvision is loaded.
    The answers are those of a predictor that runs the bundle's TorchScript model on the same inputs."""
    images = [image_bytes(color=(i * 40, 200 - i * 30, 90), size=(48 + i * 7, 40), seed=i) for i in range(4)]
    out = subprocess.run(
        [sys.executable, "-c", SERVE_WITHOUT_TORCH, str(bundle), str(tmp_path / "unpacked"),
         json.dumps([data.hex() for data in images])],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout)
    assert got["imported"] == [], f"serving imported {got['imported']}"
    assert got["classes"] == ["a", "b", "c", "d"] and got["metrics"] == {"val_accuracy": 0.5}
    assert got["input"] == [3, 32, 32] and got["prepare_agrees"]
    assert got["archived"] == got["alone"]

    from ml.predict import Predictor

    torchscript = Predictor(unpack_bundle(bundle, tmp_path / "again"), runtime="torchscript")
    for row, data in zip(got["alone"], images, strict=True):
        (expected,) = torchscript.predict_bytes([data], k=2)
        assert [label for label, _ in row] == [p.label for p in expected]
        assert [score for _, score in row] == pytest.approx([p.score for p in expected], abs=1e-5)


def test_bundles_read_back_what_was_written(bundle, tmp_path):
    info = read_bundle(unpack_bundle(bundle, tmp_path))
    assert info.preprocessing == Preprocessing(32, 36, (0.5,) * 3, (0.25,) * 3, "bicubic")
    assert info.card["format_version"] == 1 and info.card["classes"] == info.classes == ["a", "b", "c", "d"]
    assert info.metrics == {"val_accuracy": 0.5}
