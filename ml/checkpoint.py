"""Where a fit keeps its checkpoint, so that a fit cut short (a worker lost) resumes instead of restarting.

`fit(..., checkpoints=...)` takes any object with `load()` and `save(record)`; the app
keeps them in object storage, `python -m ml fit --checkpoint FILE` in a file.
A record is a dict of tensors and plain values (no code), loaded with `weights_only`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import IO, Any, Protocol


class Checkpoints(Protocol):
    def load(self) -> dict[str, Any] | None:
        """The last record saved, or None."""

    def save(self, record: dict[str, Any]) -> None:
        """Keep `record` (serialise it before returning: its tensors are live weights)."""

    # Optional: `discard(everything: bool)`, called when the fit will not go on from the record
    # it loaded (another configuration, or a fine-tune measured differently this time).


def write_record(record: dict[str, Any], fh: IO[bytes]) -> None:
    import torch  # here: the app's web processes import this module, and never torch

    torch.save(record, fh)


def read_record(fh: IO[bytes]) -> dict[str, Any]:
    import torch

    record: dict[str, Any] = torch.load(fh, map_location="cpu", weights_only=True)
    return record


class FileCheckpoints:
    """One file, replaced atomically at each save."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Any] | None:
        if not self.path.exists():
            return None
        with self.path.open("rb") as fh:
            return read_record(fh)

    def save(self, record: dict[str, Any]) -> None:
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with tmp.open("wb") as fh:
            write_record(record, fh)
        os.replace(tmp, self.path)
