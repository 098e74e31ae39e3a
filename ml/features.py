"""Batched, frozen-backbone feature extraction over images read from a zip.

Decoding runs in a thread pool (Pillow releases the GIL while decoding and
resizing) a couple of batches ahead of the model, so the CPU or GPU is not
left waiting on JPEG decoding; no worker processes, so this also runs inside
daemonised Celery workers.
"""

from __future__ import annotations

import os
import threading
import zipfile
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from ml.backbones import Backbone
from ml.images import decode_rgb
from ml.preprocess import eval_transform

ProgressFn = Callable[[int, int], None]


class ZipImages:
    """Decodes members of one zip into model-ready tensors, one zip handle per thread."""

    def __init__(self, archive: Path, transform: Callable, min_side: int | None = None) -> None:
        self.archive = archive
        self.transform = transform
        self.min_side = min_side  # lets JPEG decoding skip resolution the transform drops
        self._local = threading.local()

    def load(self, member: str) -> torch.Tensor:
        zf = getattr(self._local, "zf", None)
        if zf is None:
            zf = self._local.zf = zipfile.ZipFile(self.archive)
        return self.transform(decode_rgb(zf.read(member), min_side=self.min_side))


def iter_batches(
    load: Callable[[str], torch.Tensor],
    items: Sequence[str],
    batch_size: int,
    workers: int = min(8, (os.cpu_count() or 2) * 2),
) -> Iterator[torch.Tensor]:
    """Yield stacked batches in order, decoding up to two batches ahead."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future] = deque()
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


@torch.inference_mode()
def extract_features(
    backbone: Backbone,
    archive: Path,
    members: Sequence[str],
    *,
    batch_size: int = 64,
    device: torch.device = torch.device("cpu"),
    progress: ProgressFn | None = None,
) -> np.ndarray:
    """Pooled features (N, D) for `members`, in order."""
    prep = backbone.spec.preprocessing
    images = ZipImages(archive, eval_transform(prep), min_side=prep.resize_size)
    backbone.eval().to(device)
    out = np.empty((len(members), backbone.feature_dim), dtype=np.float32)
    done = 0
    for batch in iter_batches(images.load, members, batch_size):
        feats = backbone(batch.to(device, non_blocking=True))
        out[done : done + len(batch)] = feats.float().cpu().numpy()
        done += len(batch)
        if progress:
            progress(done, len(members))
    return out
