"""Serving a bundle: load once, predict many."""

from __future__ import annotations

import json
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ml.backbones import Preprocessing
from ml.bundle import MODEL_FILE
from ml.images import DEFAULT_MAX_PIXELS, decode_rgb
from ml.preprocess import eval_transform

MAX_BATCH = 8  # images per forward pass (bounds activation memory)
_FORWARD = threading.Lock()


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


class Predictor:
    """A loaded bundle. Thread-safe for concurrent `predict` calls (inference only)."""

    def __init__(self, folder: Path) -> None:
        folder = Path(folder)
        self.labels: list[str] = json.loads((folder / "labels.json").read_text("utf-8"))
        fields: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in json.loads((folder / "preprocessing.json").read_text("utf-8")).items()
        }
        self.preprocessing = Preprocessing(**fields)
        self.card: dict[str, Any] = json.loads((folder / "graft.json").read_text("utf-8"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
            self.model = torch.jit.load(str(folder / MODEL_FILE), map_location="cpu").eval()
        self._transform = eval_transform(self.preprocessing)

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode one encoded image (raises ml.images.ImageDecodeError)."""
        return decode_rgb(data, max_pixels=max_pixels, min_side=self.preprocessing.resize_size)

    def prepare(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
        """One encoded image to the model's input tensor; the decoded image is dropped at once."""
        return self._transform(self.decode(data, max_pixels=max_pixels))

    def predict_bytes(self, images: list[bytes], k: int = 5) -> list[list[Prediction]]:
        return self.predict_tensors([self.prepare(b) for b in images], k=k)

    def predict(self, images: list[Image.Image], k: int = 5) -> list[list[Prediction]]:
        """Top-k (label, probability) for each RGB image."""
        return self.predict_tensors([self._transform(img) for img in images], k=k)

    def predict_tensors(self, inputs: list[torch.Tensor], k: int = 5) -> list[list[Prediction]]:
        """Top-k (label, probability) for each prepared input.

        Forward passes run one at a time per process, at most `MAX_BATCH` images each: on a CPU
        each already uses every core, and concurrent ones would only add their activations up.
        """
        chunks = []
        for start in range(0, len(inputs), MAX_BATCH):
            batch = torch.stack(inputs[start : start + MAX_BATCH])
            with _FORWARD, torch.inference_mode():
                chunks.append(self.model(batch).softmax(dim=1))
        probs = torch.cat(chunks)
        k = max(1, min(k, len(self.labels)))
        scores, idx = probs.topk(k, dim=1)
        return [
            [Prediction(self.labels[i], float(s)) for s, i in zip(row_s, row_i, strict=True)]
            for row_s, row_i in zip(scores.tolist(), idx.tolist(), strict=True)
        ]
