"""Serving: the runtime is chosen by measurement, and shared forward passes give every caller its own rows."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from torch import nn

from ml.backbones import Preprocessing
from ml.bundle import unpack_bundle, write_bundle
from ml.predict import Batcher, Predictor, time_forwards
from tests.conftest import ROOT, image_bytes


def test_concurrent_callers_share_passes_and_each_gets_its_own_rows():
    calls = []

    def forward(x: np.ndarray) -> np.ndarray:
        calls.append(len(x))
        time.sleep(0.05)  # a pass long enough for the other callers to queue up behind it
        return x[:, :, 0, 0] * 10  # each row's logits are its own input, scaled

    batcher = Batcher(forward, max_batch=8)
    start = threading.Barrier(24)

    def call(i: int) -> np.ndarray:
        rows = 1 + i % 3  # requests of 1, 2 and 3 images
        x = np.full((rows, 3, 2, 2), i, dtype=np.float32) + np.arange(rows, dtype=np.float32)[:, None, None, None]
        start.wait()
        return batcher(x)

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(call, range(24)))
    for i, out in enumerate(results):
        rows = 1 + i % 3
        assert out.shape == (rows, 3)
        assert np.array_equal(out[:, 0], (i + np.arange(rows)) * 10), f"caller {i} got another caller's rows"
    assert sum(calls) == sum(1 + i % 3 for i in range(24))
    assert max(calls) <= 8 and len(calls) < 24 / 2  # passes were shared, and none was over the cap
    batcher.close()


def test_a_failed_pass_fails_its_callers_and_the_next_one_still_runs():
    def forward(x: np.ndarray) -> np.ndarray:
        if (x < 0).any():
            raise RuntimeError("bad batch")
        return x[:, :, 0, 0]

    batcher = Batcher(forward)
    with pytest.raises(RuntimeError, match="bad batch"):
        batcher(-np.ones((1, 3, 2, 2), dtype=np.float32))
    assert batcher(np.ones((2, 3, 2, 2), dtype=np.float32)).shape == (2, 3)
    batcher.close()


def test_a_caller_still_gets_its_answer_after_the_batcher_is_closed():
    """A model is unloaded (closed) while a request that already holds it is still decoding."""
    batcher = Batcher(lambda x: x[:, :, 0, 0])
    assert batcher(np.ones((1, 3, 2, 2), dtype=np.float32)).shape == (1, 3)
    batcher.close()
    answers: list[np.ndarray] = []
    late = threading.Thread(target=lambda: answers.append(batcher(np.full((2, 3, 2, 2), 7, dtype=np.float32))))
    late.daemon = True  # with no batcher thread left to serve it, it used to wait forever
    late.start()
    late.join(10)
    assert answers and np.array_equal(answers[0], np.full((2, 3), 7))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    prep = Preprocessing(input_size=32, resize_size=36, mean=(0.5,) * 3, std=(0.25,) * 3)
    out = tmp_path_factory.mktemp("bundle")
    archive = write_bundle(
        out, model=model, classes=["a", "b", "c", "d"], preprocessing=prep, metrics={}, card={"backbone": "tiny"}
    )
    return unpack_bundle(archive, out / "unpacked")


def test_the_runtime_is_the_one_measured_fastest(bundle):
    predictor = Predictor(bundle)
    assert set(predictor.timings_ms) == {"onnxruntime", "torchscript"}
    assert predictor.runtime == min(predictor.timings_ms, key=predictor.timings_ms.get)
    assert Predictor(bundle, runtime="torchscript").runtime == "torchscript"
    with pytest.raises(ValueError, match="runtime"):
        Predictor(bundle, runtime="tensorrt")


def test_runtimes_take_turns_so_that_a_busy_spell_does_not_pick_the_slower_one():
    """A worker times its runtimes while the host is busy for a while (other workers loading):
    timed one after the other, the first runtime took the whole spell and the slower one won."""
    busy = {"passes": 12}  # the host's first 12 passes, whichever runtime runs them, are slowed

    def runtime(ms: float):
        def forward(x: np.ndarray) -> np.ndarray:
            slowed = busy["passes"] > 0
            busy["passes"] -= 1
            time.sleep((ms + 20 * slowed) / 1000)
            return x

        return forward

    timings = time_forwards({"fast": runtime(2), "slow": runtime(5)}, size=4)
    assert timings["fast"] < timings["slow"], timings


@pytest.mark.parametrize("runtime", ["onnxruntime", "torchscript"])
def test_concurrent_predictions_of_distinct_images_match_one_at_a_time(bundle, runtime):
    predictor = Predictor(bundle, runtime=runtime)
    images = [
        image_bytes(color=(i * 9 % 256, 255 - i * 7 % 256, i * 31 % 256), size=(40, 40), seed=i) for i in range(32)
    ]
    alone = [predictor.predict_bytes([data], k=4)[0] for data in images]
    assert len({tuple(p.label for p in preds) + (round(preds[0].score, 4),) for preds in alone}) > 8  # distinct

    start = threading.Barrier(16)

    def call(i: int):
        start.wait()
        return predictor.predict_bytes([images[i], images[i + 16]], k=4)

    with ThreadPoolExecutor(16) as pool:
        together = [row for pair in pool.map(call, range(16)) for row in pair]
    expected = [alone[i] for pair in zip(range(16), range(16, 32), strict=True) for i in pair]
    for got, want in zip(together, expected, strict=True):
        assert [p.label for p in got] == [p.label for p in want]
        assert [p.score for p in got] == pytest.approx([p.score for p in want], abs=1e-5)
    predictor.close()


LOAD_FOUR = """
import sys
from pathlib import Path

import torch

from ml.predict import Predictor


def rss_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


inputs = [torch.rand(3, 224, 224) for _ in range(8)]
added = []
predictors = []
for _ in range(4):
    before = rss_mb()
    predictor = Predictor(Path(sys.argv[1]), runtime="onnxruntime")
    predictor.predict_tensors(inputs)  # a full batch: the largest activations a pass holds
    predictors.append(predictor)
    added.append(rss_mb() - before)
print(*added)
"""


def test_models_in_one_process_share_one_activation_arena(tmp_path):
    """Four models loaded in one process: the first brings the arena for a full batch's activations
    (8 x 32 x 222 x 222 floats, 50 MB, here); the others add only their weights and plans."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 2))
    prep = Preprocessing(input_size=224, resize_size=224, mean=(0.5,) * 3, std=(0.25,) * 3)
    archive = write_bundle(
        tmp_path, model=model.eval(), classes=["a", "b"], preprocessing=prep, metrics={}, card={"backbone": "tiny"}
    )
    folder = unpack_bundle(archive, tmp_path / "unpacked")
    out = subprocess.run(
        [sys.executable, "-c", LOAD_FOUR, str(folder)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    first, *others = (float(x) for x in out.stdout.split())
    assert first > 50, f"the first model added {first:.0f} MB: no full batch's activations were held"
    assert sum(others) < first / 2, f"the first model added {first:.0f} MB, the next three {others} MB"
