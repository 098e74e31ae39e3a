"""How far a dataset is from ImageNet, measured during the frozen feature pass.

Two signals, both free while features are being extracted:
- BatchNorm divergence: every BN layer of the pretrained backbone stores ImageNet's
  per-channel activation mean and variance. We collect the same statistics on the
  user's images (a forward pre-hook on each BN layer) and take the symmetric KL
  divergence between the two per-channel Gaussians, averaged over channels and layers.
- Head entropy: the pretrained 1000-way head's mean predictive entropy on the user's
  images, divided by ln(1000). ImageNet-like photos get confident predictions.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ml.strategy import SIMILARITY_THRESHOLD as SIMILARITY_THRESHOLD
from ml.strategy import Similarity as Similarity

STAT_GRID = 16  # positions per side sampled from each feature map for the BatchNorm statistics


class BatchNormStats:
    """Forward pre-hooks that accumulate per-channel input statistics of every BN layer."""

    def __init__(self, model: nn.Module, max_images: int | None = None) -> None:
        self.max_images = max_images  # statistics of this many images are plenty; later batches cost nothing
        self.layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        self._sum = [torch.zeros(m.num_features, dtype=torch.float64) for m in self.layers]
        self._sq = [torch.zeros(m.num_features, dtype=torch.float64) for m in self.layers]
        self._n = [0] * len(self.layers)
        self._images = [0] * len(self.layers)
        self._handles: list[RemovableHandle] = []

    def __enter__(self) -> BatchNormStats:
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._hook(i)))
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _hook(self, i: int) -> Callable[[nn.Module, tuple[torch.Tensor, ...]], None]:
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            if self.max_images is not None:
                room = self.max_images - self._images[i]
                if room <= 0:
                    return
                x = x[:room]
            images = x.shape[0]
            # A grid of at most ~16x16 positions per map: per-channel mean and variance from 256
            # images x 256 positions are as good as from every pixel, at a fraction of the memory traffic.
            step = max(1, min(x.shape[2], x.shape[3]) // STAT_GRID)
            x = x[:, :, ::step, ::step]
            # (pixels, channels) rows; mean and mean of squares beat var_mean ~2x on channels-last maps.
            rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]).float()
            n = rows.shape[0]
            self._sum[i] += rows.mean(0).double().cpu() * n
            self._sq[i] += (rows * rows).mean(0).double().cpu() * n
            self._n[i] += n
            self._images[i] += images

        return hook

    def divergence(self) -> list[float]:
        """Symmetric KL(user || ImageNet) per layer, averaged over channels."""
        out = []
        for layer, s, sq, n in zip(self.layers, self._sum, self._sq, self._n, strict=True):
            if n == 0 or layer.running_mean is None or layer.running_var is None:
                continue  # no images seen, or a layer that keeps no statistics to compare with
            mu_u = s / n
            var_u = (sq / n - mu_u**2).clamp_min(1e-5)
            mu_r = layer.running_mean.double().cpu()
            var_r = layer.running_var.double().cpu().clamp_min(1e-5)
            d2 = (mu_u - mu_r) ** 2
            kl_ur = 0.5 * (torch.log(var_r / var_u) + (var_u + d2) / var_r - 1)
            kl_ru = 0.5 * (torch.log(var_u / var_r) + (var_r + d2) / var_u - 1)
            out.append(float((kl_ur + kl_ru).mean() / 2))
        return out


def head_entropy(logits: torch.Tensor) -> float:
    """Mean entropy of softmax(logits), normalised to [0, 1] by ln(num_classes)."""
    logp = torch.log_softmax(logits.double(), dim=1)
    ent = -(logp.exp() * logp).sum(dim=1)
    return float(ent.mean() / math.log(logits.shape[1]))


# Calibration (docs in README, figures from `python -m ml similarity`): median BN divergence
# is 0.05-0.08 on ImageNet-like photos (hymenoptera, cats vs dogs) and 0.7-1.1 on digits and
# chest X-rays; DIVERGENCE_SCALE sits at their geometric middle, so it maps to a BN part of 0.5.
DIVERGENCE_SCALE = 0.24
BN_WEIGHT = 0.75  # the BN signal separates ~10x; entropy (0.23-0.44 vs 0.66-0.78) is the tie-breaker


def similarity_score(layer_divergences: list[float], entropy: float) -> Similarity:
    """Combine the two signals into one score in [0, 1]."""
    if not layer_divergences:  # no BatchNorm (ConvNeXt uses LayerNorm): the head's entropy alone
        return Similarity(score=1.0 - entropy, bn_divergence=None, head_entropy=entropy)
    div = float(torch.tensor(layer_divergences).median())
    bn_part = 1.0 / (1.0 + div / DIVERGENCE_SCALE)
    score = BN_WEIGHT * bn_part + (1 - BN_WEIGHT) * (1.0 - entropy)
    return Similarity(score=score, bn_divergence=div, head_entropy=entropy)
