"""Serving a bundle: load once, predict many, as fast as the model itself.

The bundle carries the same network twice, as TorchScript and as parity-checked ONNX. At load,
`Predictor` times each runtime on the model's own input at batch 1 and serves with the faster
(`runtime="auto"`; ONNX Runtime usually wins on CPU). Concurrent callers share forward passes: a
`Batcher` per model runs what is waiting, up to `MAX_BATCH` images, as one pass, while the other
callers decode and transform their images on their own threads.

Torch is imported only to load the TorchScript model: a predictor for ONNX Runtime alone
(`runtime="onnxruntime"`) reads the bundle with ml.bundle_format and prepares images with
ml.preprocessing's numpy transform, so a web process serving it never imports torch or timm.
"""

from __future__ import annotations

import functools
import os
import platform
import statistics
import threading
import time
import warnings
import zipfile
from collections.abc import Callable, Collection, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from ml.archive import ArchiveLimits, DamagedMember, InflateBudget, read_member, scan_images
from ml.bundle_format import INT8_FILE, MODEL_FILE, ONNX_FILE, read_bundle, read_preprocessing
from ml.errors import DatasetError
from ml.images import DEFAULT_MAX_PIXELS, ImageDecodeError, decode_rgb
from ml.preprocessing import Preprocessing, numpy_eval_transform
from ml.report import Arithmetic

MAX_BATCH = 8  # images per forward pass (bounds activation memory; see Batcher for the measurement)
MAX_WAIT_S = 0.0  # how long a pass waits for more callers once one is waiting (see Batcher)
RUNTIMES = ("onnxruntime", "torchscript")
PRECISIONS = ("auto", "fp32", "int8")  # auto: int8 where it was kept, and this CPU does its arithmetic
EXACT: Arithmetic = "exact"  # how a CPU multiplies int8 (see int8_arithmetic)
SATURATING: Arithmetic = "saturating"
_FORWARD = threading.Lock()  # one forward pass at a time per process: each already uses every core

Array = np.ndarray[Any, np.dtype[np.float32]]
Forward = Callable[[Array], Array]  # float32 (N, 3, S, S) -> logits (N, classes)


@functools.cache
def int8_arithmetic() -> Arithmetic:
    """How ONNX Runtime multiplies this CPU's uint8 activations by int8 weights.

    `EXACT` where the CPU has a dot-product instruction for it (x86's VNNI or AMX, and ARM), which
    adds the products in 32 bits. `SATURATING` on other x86 CPUs (AVX2 or AVX-512 without VNNI, as
    AMD's before Zen 4): VPMADDUBSW adds each pair of products in 16 bits and clips the sum at
    32,767, as ONNX Runtime's quantization documentation warns, and the same int8 model answers
    otherwise. On an AVX2 EPYC, chest X-rays' int8 model agreed with fp32 on 50.5% of its check
    images, against 76.6% on a VNNI Xeon, and 76.2% on the EPYC with a kernel that cannot saturate
    (uint8 weights). So an int8 model is served only where the CPU does the arithmetic it was
    checked with, or exact arithmetic (`int8_served`)."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return arithmetic_of(platform.machine(), cpuinfo)


def arithmetic_of(machine: str, cpuinfo: str) -> Arithmetic:
    """`int8_arithmetic` for a CPU of `machine` (platform.machine()) whose /proc/cpuinfo reads
    `cpuinfo`: an x86 CPU whose flags cannot be read counts as saturating."""
    if machine.lower() in ("aarch64", "arm64"):
        return EXACT
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return EXACT if {"avx512_vnni", "avx_vnni", "amx_int8"} & set(flags) else SATURATING


def int8_served(check: dict[str, Any] | None, host: Arithmetic | None = None) -> bool:
    """Whether a model whose int8 step reported `check` (graft.json's `int8`) serves its int8 model on
    a CPU doing `host`'s int8 arithmetic (this one's by default): where it was kept, on a CPU that
    multiplies exactly, or with the saturating arithmetic it was itself checked with (saturation
    only adds error to what the check measured). A check from before the arithmetic was recorded
    ran on a VNNI CPU: exactly."""
    if not (isinstance(check, dict) and check.get("kept") is True):
        return False
    host = host or int8_arithmetic()
    return host == EXACT or check.get("arithmetic", EXACT) == host


@dataclass(frozen=True)
class Prediction:
    label: str
    score: float


def runtime_threads() -> int:
    """Threads for one forward pass: the cores this process may use (passes never overlap)."""
    return max(1, len(os.sched_getaffinity(0)))


_ARENA = threading.Lock()  # guards _arena_shared
_arena_shared = False


def _share_arena(ort: Any) -> None:
    """Register one CPU arena for the process's ONNX Runtime sessions to share (those that opt in).

    Passes never overlap in a process (_FORWARD), so one arena holding the largest pass's
    activations serves every model. Each session kept its own before: Lite1 at 240 px, 4 models in
    one process took 733 MB of RSS with an arena each and 340 MB sharing one; batch 1 and batch 8
    ran at the same speed (10.2-10.4 and 75-80 ms either way). Without an arena (malloc each pass)
    memory was lower still, but batch 8 took 113 ms."""
    global _arena_shared
    with _ARENA:
        if not _arena_shared:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg(0, -1, -1, -1))  # its defaults
            _arena_shared = True


def onnx_forward(path: Path, spin: bool = True) -> Forward:
    """An ONNX Runtime session of the model file at `path` on the CPU, as the server runs it."""
    import onnxruntime as ort

    _share_arena(ort)
    options = ort.SessionOptions()
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.intra_op_num_threads = runtime_threads()
    options.inter_op_num_threads = 1
    # With `spin`, pool threads spin between the operators of a pass and stop the moment it ends: a
    # lone pass then runs at the runtime's own speed (Lite1 at 240 px, 2 cores: 7.9 ms at batch 1,
    # against 9.7 ms for threads that sleep between operators), and the cores are free between passes.
    # Where several processes serve on the same cores their passes overlap, and spinning threads take
    # the cores from each other (bench_serve, 3 gunicorn workers, 8 clients: 48.5 images/s spinning,
    # 74.1 sleeping); the web tier sets it from GRAFT_SERVE_SPIN.
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    options.add_session_config_entry("session.force_spinning_stop", "1")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def _torchscript(folder: Path) -> Forward:
    import torch  # here alone: a predictor without TorchScript runs without torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        model = torch.jit.load(str(folder / MODEL_FILE), map_location="cpu").eval()

    def forward(x: Array) -> Array:
        with torch.inference_mode():
            logits: torch.Tensor = model(torch.from_numpy(x))
        return logits.numpy()

    return forward


def load_runtimes(
    folder: Path, names: tuple[str, ...] = RUNTIMES, *, spin: bool = True, int8: bool = False
) -> Iterator[tuple[str, Forward, int]]:
    """(name, forward, input side) for each runtime the bundle in `folder` carries; with `int8`,
    ONNX Runtime runs the bundle's int8 model."""
    folder = Path(folder)
    size = read_preprocessing(folder).input_size
    onnx = INT8_FILE if int8 else ONNX_FILE
    loaders: dict[str, tuple[str, Callable[[Path], Forward]]] = {
        "onnxruntime": (onnx, lambda f: onnx_forward(f / onnx, spin)),
        "torchscript": (MODEL_FILE, _torchscript),  # torch's threads are set process-wide, not here
    }
    for name in names:
        file, load = loaders[name]
        if (folder / file).is_file():
            yield name, load(folder), size


def time_forwards(
    forwards: dict[str, Forward], size: int, *, batch: int = 1, rounds: int = 7, warmup: int = 2, fastest: bool = False
) -> dict[str, float]:
    """Median seconds of one forward pass of each of `forwards` on the same random batch (with `fastest`,
    the fastest pass: another process only ever slows one, so on a busy machine that is the runtime's own
    speed, where the median is the machine's).

    The runtimes take turns, two passes each a round, and only the second of the two counts: each
    sees the same machine, and not the previous runtime's threads still winding down. Measured one
    after the other, a busy spell during one runtime's passes picked the slower one: in 2 of 19
    bench_serve runs a gunicorn worker, timing its model while the others loaded theirs, served
    TorchScript at 15 ms a pass where ONNX Runtime took 9. The `warmup` rounds are not counted
    (TorchScript's profiling executor optimises the graph over its first calls)."""
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    times: dict[str, list[float]] = {name: [] for name in forwards}
    for i in range(warmup + rounds):
        for name, forward in forwards.items():
            for _ in range(2):
                t = time.perf_counter()
                with _FORWARD:
                    forward(x)
                elapsed = time.perf_counter() - t
            if i >= warmup:
                times[name].append(elapsed)
    return {name: (min if fastest else statistics.median)(t) for name, t in times.items()}


@dataclass(eq=False)
class _Request:
    inputs: Array
    logits: Array | None = None
    error: BaseException | None = None
    done: bool = False


class Batcher:
    """Runs concurrent callers' inputs through shared forward passes (flat combining).

    A caller that finds no pass running runs one itself, on its own thread, for its own inputs and
    whatever else is waiting (oldest first, up to `max_batch` images a pass), and goes on until its
    own rows are done; then the next waiting caller takes over. Under load, the requests that arrive
    during a pass share the next one. There is no thread per model to start, hand off to or stop
    (an unloaded model's late callers are simply served), and a lone request measured the same as
    with a batching thread (within 0.1 ms). `max_wait_s` lets a pass wait for more callers before
    it starts; the pass itself is the gathering window, and 0 measured best here (README, "Serving").
    """

    def __init__(self, forward: Forward, *, max_batch: int = MAX_BATCH, max_wait_s: float = MAX_WAIT_S) -> None:
        self._forward = forward
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._cond = threading.Condition()  # guards _waiting and _running
        self._waiting: list[_Request] = []
        self._running = False
        self.passes = 0  # forward passes run (for tests and figures)

    def __call__(self, inputs: Array) -> Array:
        """Logits for `inputs` (N, 3, S, S), computed in passes shared with other callers."""
        request = _Request(inputs)
        with self._cond:
            self._waiting.append(request)
            self._cond.notify_all()  # a pass that waits for more callers counts this one
            while self._running and not request.done:
                self._cond.wait()
            lead = not request.done
            if lead:
                self._running = True
        if lead:
            try:
                while not request.done:
                    taken = self._next_pass()
                    if not taken:  # only if the request left the queue unserved: never spin on nothing
                        raise RuntimeError("a prediction request was lost between forward passes")
                    self._serve(taken)
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if request.error is not None:
            raise request.error
        assert request.logits is not None
        return request.logits

    def close(self) -> None:
        """Nothing to stop: passes run on their callers' threads (kept for the Predictor's API)."""

    def _next_pass(self) -> list[_Request]:
        """The oldest waiting requests that fit one pass (at least one, however many images)."""
        with self._cond:
            if self.max_wait_s:
                self._cond.wait_for(lambda: self._images() >= self.max_batch, timeout=self.max_wait_s)
            taken: list[_Request] = []
            count = 0
            while self._waiting and (not taken or count + len(self._waiting[0].inputs) <= self.max_batch):
                count += len(self._waiting[0].inputs)
                taken.append(self._waiting.pop(0))
            return taken

    def _images(self) -> int:
        return sum(len(r.inputs) for r in self._waiting)

    def _serve(self, requests: list[_Request]) -> None:
        try:
            batch = np.concatenate([r.inputs for r in requests])
            logits = []
            for start in range(0, len(batch), self.max_batch):  # one request of many images: several passes
                with _FORWARD:
                    logits.append(self._forward(batch[start : start + self.max_batch]))
                self.passes += 1
            out = np.concatenate(logits)
        except BaseException as exc:  # every caller in the pass hears of it; the next pass still runs
            for r in requests:
                r.error = exc
        else:
            offset = 0
            for r in requests:
                r.logits = out[offset : offset + len(r.inputs)]
                offset += len(r.inputs)
        with self._cond:
            for r in requests:
                r.done = True
            self._cond.notify_all()


class Predictor:
    """A loaded bundle. Thread-safe: concurrent `predict*` calls share forward passes."""

    def __init__(
        self,
        folder: Path | str,
        runtime: str = "auto",
        *,
        max_batch: int = MAX_BATCH,
        max_wait_s: float = MAX_WAIT_S,
        spin: bool = True,
        precision: str = "auto",
    ) -> None:
        folder = Path(folder)
        bundle = read_bundle(folder)
        self.labels: list[str] = bundle.classes
        self.preprocessing: Preprocessing = bundle.preprocessing
        self.card: dict[str, Any] = bundle.card
        if runtime not in ("auto", *RUNTIMES):
            raise ValueError(f"runtime must be auto or one of {', '.join(RUNTIMES)}, not {runtime!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
        if precision == "int8" and not (folder / INT8_FILE).is_file():
            raise FileNotFoundError(f"{folder} holds no int8 model")
        # The int8 model where it was kept and this CPU does its arithmetic: on ONNX Runtime only, and
        # faster than either fp32 runtime (so there is nothing to time against it).
        auto = precision == "auto" and int8_served(bundle.card.get("int8"))
        int8 = runtime != "torchscript" and (precision == "int8" or auto)
        self.precision = "int8" if int8 else "fp32"
        names = ("onnxruntime",) if int8 else RUNTIMES if runtime == "auto" else (runtime,)
        loaded = list(load_runtimes(folder, names, spin=spin, int8=int8))
        if not loaded:
            raise FileNotFoundError(f"{folder} holds no model file for {runtime}")
        # The runtime measured fastest on this model's input, at batch 1 (a lone request's latency).
        size, rounds = loaded[0][2], 7 if len(loaded) > 1 else 1  # one runtime: warm it up, nothing to choose
        self.timings_ms = {
            name: seconds * 1000
            for name, seconds in time_forwards({n: f for n, f, _ in loaded}, size, rounds=rounds).items()
        }
        self.runtime, forward, _ = min(loaded, key=lambda r: self.timings_ms[r[0]])
        del loaded
        self._batcher = Batcher(forward, max_batch=max_batch, max_wait_s=max_wait_s)
        self._transform = numpy_eval_transform(self.preprocessing)  # whichever runtime serves, torch or not

    def close(self) -> None:
        self._batcher.close()

    def decode(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
        """Decode one encoded image (raises ml.images.ImageDecodeError)."""
        return decode_rgb(data, max_pixels=max_pixels, min_side=self.preprocessing.resize_size)

    def prepare(self, data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Array:
        """One encoded image to the model's (3, S, S) input; the decoded image is dropped at once."""
        return self._transform(self.decode(data, max_pixels=max_pixels))

    def predict_bytes(self, images: list[bytes], k: int = 5) -> list[list[Prediction]]:
        return self.predict_tensors([self.prepare(b) for b in images], k=k)

    def predict(self, images: list[Image.Image], k: int = 5) -> list[list[Prediction]]:
        """Top-k (label, probability) for each RGB image."""
        return self.predict_tensors([self._transform(img) for img in images], k=k)

    def predict_tensors(self, inputs: Sequence[npt.ArrayLike], k: int = 5) -> list[list[Prediction]]:
        """Top-k (label, probability) for each prepared input, `prepare`'s arrays (CPU tensors do too);
        the forward passes are shared with other callers."""
        logits = self._batcher(np.stack([np.asarray(x, np.float32) for x in inputs])).astype(np.float32, copy=False)
        k = max(1, min(k, len(self.labels)))
        e = np.exp(logits - logits.max(axis=1, keepdims=True))  # softmax, as the bundle's predict.py takes it
        scores = e / e.sum(axis=1, keepdims=True)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # ties: the lower index first
        return [[Prediction(self.labels[i], float(row[i])) for i in top] for row, top in zip(scores, best, strict=True)]


@dataclass(frozen=True)
class FilePrediction:
    """One image of an archive: its top-k, or why it could not be read."""

    file: str
    predictions: list[Prediction]
    error: str = ""


def predict_archive(
    predictor: Predictor,
    path: Path,
    *,
    k: int = 5,
    limits: ArchiveLimits = ArchiveLimits(),
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: Callable[[int, int], None] | None = None,
    members: Collection[str] | None = None,
) -> Iterator[FilePrediction]:
    """Top-k for every image in a zip of unlabelled images (or those of its `members`), in name order.

    The zip is read under the dataset rules (names, sizes, inflated bytes); an image that cannot
    be read gets its error and the rest go on. Two threads decode one batch ahead of the forward
    passes; `progress(done, total)` after each batch.
    """
    names = scan_images(path, limits)
    if members is not None:  # a dataset version's images: its upload may hold images it removed
        names = [n for n in names if n in members]
    budget = InflateBudget(path, limits)

    def prepare(zf: zipfile.ZipFile, name: str) -> Array | str:
        try:
            return predictor.prepare(read_member(zf, name, limits.max_member_bytes, budget), max_pixels=max_pixels)
        except ImageDecodeError as exc:
            return f"cannot be read as an image: {exc}"
        except DatasetError as exc:
            if isinstance(exc, DamagedMember) or exc.details.get("file"):
                return exc.message  # this file only; an archive-wide limit (a bomb) stops everything
            raise

    with zipfile.ZipFile(path) as zf, ThreadPoolExecutor(2) as pool:
        chunks = [names[i : i + MAX_BATCH] for i in range(0, len(names), MAX_BATCH)]
        pending = [pool.submit(prepare, zf, name) for name in chunks[0]] if chunks else []
        done = 0
        for i, chunk in enumerate(chunks):
            prepared = [f.result() for f in pending]
            pending = [pool.submit(prepare, zf, name) for name in chunks[i + 1]] if i + 1 < len(chunks) else []
            inputs = [x for x in prepared if isinstance(x, np.ndarray)]
            rows = iter(predictor.predict_tensors(inputs, k=k) if inputs else [])
            for name, x in zip(chunk, prepared, strict=True):
                yield FilePrediction(name, next(rows), "") if isinstance(x, np.ndarray) else FilePrediction(name, [], x)
            done += len(chunk)
            if progress is not None:
                progress(done, len(names))
