"""Process-level CPU tuning for PyTorch inference and training.

Convolution activations are tens of MB per layer. glibc's malloc serves such
blocks with mmap and returns them on free, so every layer of every batch pays
for fresh zeroed pages: on a 2-core CPU half the time went to the kernel. Raising
the mmap and trim thresholds keeps those blocks in the heap and reuses them
(measured: 14 -> 20-34 images/s for EfficientNet-Lite0 at 224 px, sys time ~0).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_THRESHOLD = 1 << 30  # 1 GiB: larger blocks still go to mmap


@functools.cache
def tune_allocator() -> bool:
    """Keep large tensors in the malloc heap (glibc only; a no-op elsewhere). Idempotent."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and friends have no mallopt
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _THRESHOLD))
