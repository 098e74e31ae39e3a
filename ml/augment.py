"""Train-time augmentation, chosen per plan and limited to the invariances the user allows."""

from __future__ import annotations

from collections.abc import Callable

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from ml.backbones import Preprocessing
from ml.preprocess import INTERPOLATION


def train_transform(
    prep: Preprocessing, *, similar: bool, large: bool, hflip: bool = True
) -> tuple[Callable[[Image.Image], torch.Tensor], dict]:
    """(transform, description) for fine-tuning.

    - random resized crop: a wide scale range for ImageNet-like photos, a gentler one
      for other domains (an X-ray or a digit cropped to 8% is no longer the same class);
    - horizontal flip unless the user switched it off (text, digits, chirality);
    - colour jitter: full for photos, brightness/contrast only elsewhere;
    - a stronger policy for larger sets: TrivialAugmentWide for photos whose mirror image
      is the same class; elsewhere a milder RandAugment (its rotations and shears stay small,
      so a 6 does not become a 9 and an X-ray is not solarised to noise).
    """
    scale = (0.25, 1.0) if similar else (0.6, 1.0)
    steps: list = [
        T.PILToTensor(),
        T.RandomResizedCrop(
            prep.input_size, scale=scale, interpolation=INTERPOLATION[prep.interpolation], antialias=True
        ),
    ]
    if hflip:
        steps.append(T.RandomHorizontalFlip())
    jitter = dict(brightness=0.3, contrast=0.3, saturation=0.3) if similar else dict(brightness=0.2, contrast=0.2)
    steps.append(T.ColorJitter(**jitter))
    policy = None
    if large:
        interpolation = INTERPOLATION[prep.interpolation]
        if similar and hflip:
            policy, op = "trivial_augment_wide", T.TrivialAugmentWide(interpolation=interpolation)
        else:
            policy, op = "rand_augment(2, 5)", T.RandAugment(num_ops=2, magnitude=5, interpolation=interpolation)
        steps.append(op)
    steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(prep.mean, prep.std)]
    description = {
        "random_resized_crop": {"size": prep.input_size, "scale": list(scale)},
        "horizontal_flip": hflip,
        "color_jitter": jitter,
        "policy": policy,
    }
    return T.Compose(steps), description
