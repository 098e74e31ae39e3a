"""Batched, frozen-backbone feature extraction over images read from a zip.

Decoding runs in a thread pool (Pillow releases the GIL while decoding and
resizing) a couple of batches ahead of the model, so the CPU or GPU is not
left waiting on JPEG decoding; no worker processes, so this also runs inside
daemonised Celery workers.
"""

from __future__ import annotations

import io
import os
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import nn

from ml.backbones import Backbone, Preprocessing
from ml.dataset import Sample, Tick
from ml.images import decode_rgb
from ml.preprocess import eval_transform
from ml.runtime import tune_allocator

TOP = "top"  # key of the pooled top-layer features


class GridPool(nn.Module):
    """Average-pool a feature map into a 2x2 grid and flatten: (N, C, H, W) -> (N, 4C).

    Global pooling throws away where things are, which is most of what tells a
    6 from a 9; intermediate stages are pooled into quadrants instead. Plain
    slicing (not adaptive pooling) so that TorchScript and ONNX export it as is.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2], x.shape[3]
        hh, hw = max(1, h // 2), max(1, w // 2)
        cells = [
            x[:, :, :hh, :hw],
            x[:, :, :hh, hw:] if w > 1 else x[:, :, :hh, :hw],
            x[:, :, hh:, :hw] if h > 1 else x[:, :, :hh, :hw],
            x[:, :, hh:, hw:] if h > 1 and w > 1 else x[:, :, :hh, :hw],
        ]
        return torch.cat([c.mean((2, 3)) for c in cells], 1)


Loaded = TypeVar("Loaded")  # what ZipImages makes of an image
Item = TypeVar("Item")  # what iter_batches' `load` takes: a member name, a position


class ZipImages(Generic[Loaded]):
    """Decodes members of one zip and applies `transform` (to model-ready tensors, say), one zip
    handle per thread."""

    def __init__(self, archive: Path, transform: Callable[[Image.Image], Loaded], min_side: int | None = None) -> None:
        self.archive = archive
        self.transform = transform
        self.min_side = min_side  # lets JPEG decoding skip resolution the transform drops
        self._local = threading.local()

    def load(self, member: str) -> Loaded:
        zf = getattr(self._local, "zf", None)
        if zf is None:
            zf = self._local.zf = zipfile.ZipFile(self.archive)
        return self.transform(decode_rgb(zf.read(member), min_side=self.min_side))


DECODE_WORKERS = min(16, (os.cpu_count() or 2) * 2)  # decoding threads (Pillow and zlib release the GIL)


def iter_batches(
    load: Callable[[Item], torch.Tensor],
    items: Sequence[Item],
    batch_size: int,
    workers: int = DECODE_WORKERS,
) -> Iterator[torch.Tensor]:
    """Yield stacked batches in order, decoding up to two batches ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[torch.Tensor]] = deque()
        it = iter(items)
        ahead = 3 * batch_size
        for item in it:
            pending.append(pool.submit(load, item))
            if len(pending) >= ahead:
                break
        batch: list[torch.Tensor] = []
        while pending:
            batch.append(pending.popleft().result())
            nxt = next(it, None)
            if nxt is not None:
                pending.append(pool.submit(load, nxt))
            if len(batch) == batch_size or not pending:
                yield torch.stack(batch)
                batch = []


@dataclass(frozen=True)
class Pass:
    """How a frozen pass runs: on which device, in batches of how many images, telling whom (done, total)."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 64
    progress: Tick | None = None


def extract_features(
    backbone: Backbone,
    archive: Path,
    members: Sequence[str],
    *,
    preprocessing: Preprocessing | None = None,
    how: Pass = Pass(),
) -> np.ndarray:
    """Pooled top-layer features (N, D) for `members`, in order."""
    return extract_stage_features(backbone, archive, members, preprocessing=preprocessing, how=how)[TOP]


def extract_stage_features(
    backbone: Backbone,
    archive: Path,
    members: Sequence[str],
    *,
    taps: Sequence[str] = (),
    preprocessing: Preprocessing | None = None,
    how: Pass = Pass(),
) -> dict[str, np.ndarray]:
    """Features for `members`, in order: `TOP` (the pooled output) and each stage in `taps`.

    A tapped stage's output is pooled into a 2x2 grid (`GridPool`). All of them
    come from the one forward pass.
    """
    tune_allocator()
    prep = preprocessing or backbone.spec.preprocessing
    images = ZipImages(archive, eval_transform(prep), min_side=prep.resize_size)
    # Outside inference mode: converted parameters made inside it would be inference
    # tensors, unusable for export or fine-tuning afterwards.
    # torch's stubs lack the (device, memory_format) form of Module.to, which it accepts.
    device, batch_size, progress = how.device, how.batch_size, how.progress
    body = backbone.eval().to(device, memory_format=torch.channels_last).body  # type: ignore[call-overload]
    modules = dict(body.named_modules())
    captured: dict[str, torch.Tensor] = {}
    pool = GridPool()

    def tap(name: str) -> Callable[[nn.Module, tuple[Any, ...], torch.Tensor], None]:
        return lambda _module, _inputs, output: captured.__setitem__(name, pool(output))

    hooks = [modules[name].register_forward_hook(tap(name)) for name in taps]
    out: dict[str, np.ndarray] = {}
    done = 0
    try:
        with torch.inference_mode():
            for batch in iter_batches(images.load, members, batch_size):
                x = batch.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
                captured[TOP] = body(x)
                for name, feats in captured.items():
                    if name not in out:
                        out[name] = np.empty((len(members), feats.shape[1]), dtype=np.float32)
                    out[name][done : done + len(batch)] = feats.float().cpu().numpy()
                done += len(batch)
                if progress:
                    progress(done, len(members))
    finally:
        for h in hooks:
            h.remove()
    return out


class EmbeddingCache:
    """Embeddings by image content: view key -> {sha256 -> vector}.

    A view key names everything a vector depends on besides the image's bytes (backbone, input size,
    the duplicate view's coarse side and version), so one cache serves every version of a dataset:
    relabels and removals reuse every vector, added images are embedded alone. A vector is kept in the
    dtype it is given: the finders' own views as float16 (`find_issues` rounds fresh ones the same way,
    so a run that reads the cache and one that fills it see the same numbers), the fit's features
    (`ml.measure`) as float32, exactly as a fit extracts them. `to_bytes`/`from_bytes` round-trip
    through an .npz (no pickle)."""

    def __init__(self) -> None:
        self._views: dict[str, dict[str, np.ndarray]] = {}
        self._values: dict[str, np.ndarray] = {}  # measurements of a set of images (not one image's)

    def value(self, name: str) -> np.ndarray | None:
        return self._values.get(name)

    def put_value(self, name: str, vector: np.ndarray) -> None:
        """Keep a measurement of a set of images (the similarity of a version's first training images),
        under a name that says which set (see `ml.measure`)."""
        self._values[name] = np.asarray(vector)

    def get(self, view: str, sha256: str) -> np.ndarray | None:
        return self._views.get(view, {}).get(sha256)

    def put(self, view: str, sha256: str, vector: np.ndarray) -> None:
        self._views.setdefault(view, {})[sha256] = np.asarray(vector)

    def has(self, view: str, sha256: str) -> bool:
        return sha256 in self._views.get(view, {})

    def stack(self, view: str, sha256s: Sequence[str]) -> np.ndarray:
        """The vectors of these images, in order, as one float32 matrix (every one must be held)."""
        vectors = self._views[view]
        return np.stack([vectors[s] for s in sha256s]).astype(np.float32, copy=False)

    def counts(self) -> dict[str, int]:
        """How many images each view holds."""
        return {view: len(vectors) for view, vectors in self._views.items()}

    def images(self) -> set[str]:
        return {sha for vectors in self._views.values() for sha in vectors}

    def __len__(self) -> int:
        return len(self.images())

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {
            "views": np.array(list(self._views), dtype=str),
            "values": np.array(list(self._values), dtype=str),
        }
        for i, vector in enumerate(self._values.values()):
            arrays[f"value_{i}"] = vector
        for i, vectors in enumerate(self._views.values()):
            arrays[f"sha_{i}"] = np.array(list(vectors), dtype=str)
            dim = next(iter(vectors.values())).shape[0] if vectors else 0
            arrays[f"vec_{i}"] = np.stack(list(vectors.values())) if vectors else np.zeros((0, dim), np.float16)
        buf = io.BytesIO()
        np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> EmbeddingCache:
        cache = cls()
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            for i, view in enumerate(z["views"]):
                shas, vectors = z[f"sha_{i}"], z[f"vec_{i}"]
                cache._views[str(view)] = {str(s): v for s, v in zip(shas, vectors, strict=True)}
            for i, name in enumerate(z["values"] if "values" in z else ()):
                cache._values[str(name)] = z[f"value_{i}"]
        return cache


MAX_CACHED_BYTES = 2 * 1024**3  # decoded images kept in memory for fine-tuning; beyond, decode per epoch


class ImageSource:
    """Decoded, size-reduced RGB images by position; kept in memory when they fit."""

    def __init__(self, archive: Path, samples: list[Sample], prep: Preprocessing) -> None:
        self.images: ZipImages[Image.Image] = ZipImages(archive, lambda img: img, min_side=prep.resize_size)
        self.members = [s.member for s in samples]
        self.min_side = prep.resize_size
        # Kept images have a short side of at most 2 x resize_size; PIL holds RGB in 4 bytes/pixel.
        cap = 2 * prep.resize_size
        est = sum(
            4 * min(s.width * s.height, cap * cap * max(s.width, s.height) / max(1, min(s.width, s.height)))
            for s in samples
        )
        self.cache: dict[int, Image.Image] | None = {} if est <= MAX_CACHED_BYTES else None

    def image(self, i: int) -> Image.Image:
        if self.cache is not None and i in self.cache:
            return self.cache[i]
        img = self.images.load(self.members[i])
        short = min(img.size)
        if short > 2 * self.min_side:  # keep the cache small: crops never need more than ~2x
            scale = 2 * self.min_side / short
            img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        if self.cache is not None:
            self.cache[i] = img
        return img
