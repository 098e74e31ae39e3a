"""A fit cut short after a fine-tune epoch goes on from its checkpoint, through `fit()` itself: the
checkpoint holds only what `torch.load(weights_only=True)` reads back (plain values and tensors)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ml.checkpoint import FileCheckpoints
from ml.fit import FitConfig, fit
from ml.report import EpochRow
from tests.conftest import class_folders, make_zip

pytestmark = pytest.mark.slow  # two real fits with a fine-tune, on tiny images


class Killed(Exception):
    pass


class DiesAfterFirstSave(FileCheckpoints):
    def save(self, record: dict) -> None:
        super().save(record)
        raise Killed


def test_a_fit_killed_after_an_epoch_resumes_from_its_checkpoint(tmp_path: Path):
    archive = make_zip(tmp_path / "data.zip", class_folders({"ants": 12, "bees": 12}))
    config = FitConfig(strategy="partial", max_epochs=3, resolution="native")
    ckpt = tmp_path / "ckpt.pt"
    with pytest.raises(Killed):
        fit(archive, tmp_path / "first", config, checkpoints=DiesAfterFirstSave(ckpt))
    assert ckpt.exists()

    result = fit(archive, tmp_path / "second", config, checkpoints=FileCheckpoints(ckpt))
    log = "\n".join(result.log)
    assert "resuming from a checkpoint" in log
    assert "finished tries taken from the checkpoint" in log  # the checkpoint was read, not refused
    assert "starts over" not in log
    assert "resumed after epoch 1" in log
    tries: dict[float | None, list[int]] = {}  # a pilot that fails is tried again at a lower rate
    for row in result.history:
        if isinstance(row, EpochRow):
            tries.setdefault(row.lr_multiplier, []).append(row.epoch)
    assert all(epochs == list(range(len(epochs))) for epochs in tries.values()), tries  # each epoch once
