"""The web process's decode budget: every image a request decodes (predictions, thumbnails)
holds its pixels from one shared `PixelGate`, so concurrent requests cannot add up to gigabytes."""

from __future__ import annotations

import functools

from django.conf import settings

from ml.images import PixelGate


@functools.cache
def decode_gate() -> PixelGate:
    return PixelGate(settings.GRAFT_DECODE_PIXELS)
