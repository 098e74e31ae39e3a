from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The shared benchmark datasets sit beside the checkout (../shared/datasets); GRAFT_DATASETS_DIR overrides.
_CANDIDATES = [os.environ.get("GRAFT_DATASETS_DIR", ""), ROOT.parent / "shared" / "datasets", "/work/shared/datasets"]
DATASETS = next((Path(c) for c in _CANDIDATES if c and Path(c).is_dir()), ROOT.parent / "shared" / "datasets")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not DATASETS.is_dir():
        pytest.fail(f"shared datasets not found at {DATASETS}") if IN_CI else pytest.skip("no ../shared/datasets")
    return DATASETS


def image_bytes(color=(200, 30, 30), size=(32, 32), fmt="PNG", mode="RGB", seed: int | None = None) -> bytes:
    """A small, valid image; `seed` makes its pixels (and so its hash) unique."""
    import io
    import random

    from PIL import Image

    img = Image.new(mode, size, color if mode == "RGB" else 128)
    if seed is not None:
        rng = random.Random(seed)
        for _ in range(20):
            img.putpixel((rng.randrange(size[0]), rng.randrange(size[1])), (rng.randrange(256),) * len(img.getbands()))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def class_folders(classes: dict[str, int], prefix: str = "") -> dict[str, bytes]:
    """{'cats': 6, 'dogs': 6} -> members with that many distinct images per class folder."""
    out, seed = {}, 0
    for name, n in classes.items():
        for i in range(n):
            seed += 1
            out[f"{prefix}{name}/img_{i}.png"] = image_bytes(seed=seed)
    return out
