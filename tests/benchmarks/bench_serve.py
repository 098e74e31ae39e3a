"""Serving speed: the prediction endpoint against the model's own forward pass, under load.

Run from the repo root (prints one JSON line; not a pass/fail test):

    .venv/bin/python -m tests.benchmarks.bench_serve [--dataset ZIP] [--requests 200] [--clients 1 8 32]
        [--max-batch N] [--wait-ms MS]   (the server's micro-batching; default: settings' defaults)
        [--workers N] [--client stdlib|requests] [--no-preload] [--precision auto|fp32] [--runtime NAME]
        [--spin | --no-spin]   (the server's GRAFT_SERVE_PRECISION, GRAFT_SERVE_RUNTIME, GRAFT_SERVE_SPIN)

It trains a linear probe on the dataset (default: hymenoptera.zip from the shared datasets, the
ants/bees model; EfficientNet-Lite1, as the engine chooses) and makes its int8 model as a worker
does after a job (ml.quantize; `int8` in the output: kept or not, and the figures), then:
  raw       the bundle's models alone, in this process, on that model's input: ONNX Runtime and
            TorchScript (fp32), and ONNX Runtime on the int8 model (`onnxruntime_int8`), at batch 1 and
            batch 8 (median ms per forward pass, and images/s), loaded here by the benchmark itself
            with one thread per core, while the server is idle;
  endpoint  gunicorn as deploy/ starts it (3 workers, gthread, 8 threads each, --preload; --workers to change)
            on embedded defaults in a temporary GRAFT_DATA_DIR, with a real token; a bounded
            client of our own (threads, one keep-alive connection each: the standard library's
            http.client with the multipart bodies built beforehand, since the client shares the
            server's two cores; `--client requests` for the requests library) posts one validation
            JPEG per request. Per client count: requests, errors, images/s (the median round's), p50/p95/p99 ms
            over all requests; server_p50_ms, the median of gunicorn's own request time (its access
            log), so that what the HTTP round trip and the client add shows; and cpu_busy, the share
            of the machine's cores busy during the phase. Raw passes and each client count take turns,
            in --rounds rounds, so that both see the same machine (it is shared, and its speed changes
            by the minute);
  floor     the same load (1 and 8 clients) on a bare WSGI app under the same gunicorn: no Django,
            no authentication, no limits, only read the body, decode, transform and predict with the
            same Predictor and settings (tests/benchmarks/serve_floor.py), running beside the app
            and taking turns with it in every round. What the floor takes over the raw forward is
            what any server of this model pays on this machine (a JPEG to decode, HTTP); what the
            endpoint takes over the floor is the app's own cost;
  memory    each web process's RSS and PSS (MiB) with 1 model loaded, then with 4 (copies of the
            same bundle as 4 models: each is loaded separately, in every worker); PSS counts a page
            shared by n processes as 1/n in each, so the workers' PSS and the master's add up to
            what the web tier takes of the host (`total_4`). With --preload (deploy/'s, and the
            default; --no-preload to compare) the master imports the app and the workers share
            those pages.
Ratios: p50 at 1 client over the fastest raw fp32 batch-1 forward (either runtime), and throughput
at 8 clients over the best raw fp32 batched rate (batch 8, either runtime): what the server makes of
the model it was trained as (`ratios`); `ratios_int8` holds the same against the raw int8 passes.
Every raw figure is from the fastest round (the median pass of the round with the fastest median:
another process only ever slows a pass, and whole rounds of raw passes sometimes ran twice as
slow); the same for the floor,
and the endpoint's p50 at 1 client less the floor's (ms). Traffic stays on loopback;
every phase is bounded in requests and seconds.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"
PHASE_SECONDS = 120  # no load phase runs longer than this, whatever its request count
RAW_PASSES = {1: 12, 8: 4}  # raw forward passes per round, by batch size


def main() -> None:
    from tests.conftest import DATASETS

    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, default=DATASETS / "hymenoptera.zip")
    parser.add_argument("--requests", type=int, default=200, help="requests per client count, over all rounds")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3, help="gunicorn worker processes (deploy/ runs 3)")
    parser.add_argument(
        "--preload", action=argparse.BooleanOptionalAction, default=True, help="gunicorn --preload, as deploy/ runs it"
    )
    parser.add_argument("--max-batch", type=int, help="the server's GRAFT_SERVE_MAX_BATCH (default: its own)")
    parser.add_argument("--wait-ms", type=float, help="the server's GRAFT_SERVE_BATCH_WAIT_MS (default: its own)")
    parser.add_argument("--precision", choices=["auto", "fp32"], help="the server's GRAFT_SERVE_PRECISION")
    parser.add_argument("--runtime", choices=["auto", "onnxruntime", "torchscript"], help="GRAFT_SERVE_RUNTIME")
    parser.add_argument("--spin", action=argparse.BooleanOptionalAction, help="the server's GRAFT_SERVE_SPIN")
    parser.add_argument(
        "--client", choices=["stdlib", "requests"], default="stdlib", help="the load client's HTTP library"
    )
    args = parser.parse_args()

    data_dir = Path(tempfile.mkdtemp(prefix="graft-bench-serve-"))
    env = {
        **os.environ,
        "GRAFT_DATA_DIR": str(data_dir),
        "SECRET_KEY": os.urandom(32).hex(),
        "DJANGO_SETTINGS_MODULE": "apps.settings",
        "GRAFT_THROTTLE_USER": "1000000/min",
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),  # as deploy/Dockerfile sets it
    }
    if args.max_batch is not None:
        env["GRAFT_SERVE_MAX_BATCH"] = str(args.max_batch)
    if args.wait_ms is not None:
        env["GRAFT_SERVE_BATCH_WAIT_MS"] = str(args.wait_ms)
    if args.precision is not None:
        env["GRAFT_SERVE_PRECISION"] = args.precision
    if args.runtime is not None:
        env["GRAFT_SERVE_RUNTIME"] = args.runtime
    if args.spin is not None:
        env["GRAFT_SERVE_SPIN"] = "1" if args.spin else "0"
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    _log(f"training a linear probe on {args.dataset.name}")
    model_ids, bundle, int8 = _prepare(args.dataset, data_dir)
    images = _validation_jpegs(args.dataset, 64)
    runtimes = list(_runtimes(bundle))
    raw: dict[str, dict[int, list[float]]] = {name: {batch: [] for batch in RAW_PASSES} for name, _, _ in runtimes}
    load: dict[int, list[dict]] = {clients: [] for clients in args.clients}

    from django.conf import settings

    floor_env = {
        **env,
        "GRAFT_FLOOR_BUNDLE": str(bundle),
        "GRAFT_SERVE_RUNTIME": settings.GRAFT_SERVE_RUNTIME,
        "GRAFT_SERVE_MAX_BATCH": str(settings.GRAFT_SERVE_MAX_BATCH),
        "GRAFT_SERVE_BATCH_WAIT_MS": str(settings.GRAFT_SERVE_BATCH_WAIT_MS),
        "GRAFT_SERVE_SPIN": "1" if settings.GRAFT_SERVE_SPIN else "0",
        "GRAFT_SERVE_PRECISION": settings.GRAFT_SERVE_PRECISION,
    }
    floor_clients = [c for c in args.clients if c <= 8]
    floor: dict[int, list[dict]] = {clients: [] for clients in floor_clients}
    result: dict = {
        "dataset": args.dataset.name,
        "workers": args.workers,
        "preload": args.preload,
        "max_batch": settings.GRAFT_SERVE_MAX_BATCH,
        "wait_ms": settings.GRAFT_SERVE_BATCH_WAIT_MS,
        "spin": settings.GRAFT_SERVE_SPIN,  # GRAFT_SERVE_SPIN from the environment
        "runtime": settings.GRAFT_SERVE_RUNTIME,
        "precision": settings.GRAFT_SERVE_PRECISION,
        "client": args.client,
        "int8": int8,
    }
    servers: list[subprocess.Popen] = []
    try:
        base, access_log, server = _gunicorn("apps.wsgi", args.workers, env, data_dir / "access.log", args.preload)
        servers.append(server)
        floor_base, floor_log, floor_server = _gunicorn(
            "tests.benchmarks.serve_floor", args.workers, floor_env, data_dir / "floor-access.log", args.preload
        )
        servers.append(floor_server)
        token = _start(base)
        url, floor_url = f"{base}/api/v1/models/{model_ids[0]}/predict/", f"{floor_base}/predict/"
        # Load the model in every worker (each loads its own copy on its first request): concurrent
        # connections spread over the workers, so that no load lands in a timed phase.
        _load(url, token, images, clients=4 * args.workers, requests=16 * args.workers)
        _wait_up(f"{floor_base}/")
        _load(floor_url, "", images, clients=4 * args.workers, requests=16 * args.workers)
        pids = _worker_pids(server.pid)
        # Each worker chose its runtime when it loaded the model: concurrent asks reach them all
        result["server_runtimes"] = _runtimes_seen(
            lambda: _model_runtime(base, token, model_ids[0], images[0]), args.workers
        )
        result["floor_runtimes"] = _runtimes_seen(lambda: _floor_runtime(floor_base), args.workers)
        # Rounds of raw passes and load, so that both see the same machine (it is shared and noisy).
        for round_ in range(args.rounds):
            _log(f"round {round_ + 1} of {args.rounds}")
            for name, forward, size in runtimes:
                for batch, passes in RAW_PASSES.items():
                    raw[name][batch] += _forward_times(forward, size, batch, passes)
            for clients in args.clients:
                load[clients].append(_phase(url, token, images, clients, args, access_log))
            for clients in floor_clients:
                floor[clients].append(_phase(floor_url, "", images, clients, args, floor_log))
        _stop(floor_server)  # not to share the libraries' pages (and their PSS) with the app's processes
        rss, pss = {"1": _mib(pids, "status", "VmRSS")}, {"1": _mib(pids, "smaps_rollup", "Pss")}
        for model_id in model_ids[1:]:  # each model to every worker (4 clients a worker spread over them)
            _load(
                f"{base}/api/v1/models/{model_id}/predict/",
                token,
                images,
                clients=4 * args.workers,
                requests=8 * args.workers,
            )
        rss["4"], pss["4"] = _mib(pids, "status", "VmRSS"), _mib(pids, "smaps_rollup", "Pss")
        result["rss_mib"] = rss
        result["torch_loaded"] = [_maps_torch(pid) for pid in [server.pid, *pids]]  # the master, then each worker
        # PSS shares each page among the processes that map it: with the master's, the sum is what
        # the web tier takes of the host's memory (this process maps torch's and ONNX Runtime's
        # libraries too, and takes its share of their pages)
        result["pss_mib"] = {**pss, "master": _mib([server.pid], "smaps_rollup", "Pss")[0]}
        result["pss_mib"]["total_4"] = round(sum(pss["4"]) + result["pss_mib"]["master"], 1)
    finally:
        for process in servers:
            _stop(process)

    result["raw"] = {name: _raw_summary(times) for name, times in raw.items()}
    result["endpoint"] = {str(clients): _summary(rounds) for clients, rounds in load.items()}
    # Against the fastest round: another process's work only ever slows a pass, and rounds of raw
    # passes ran twice as slow now and then, whole (which would flatter the endpoint's ratios). The
    # baseline is the model as trained (fp32), on whichever runtime runs it faster.
    fp32 = [r for name, r in result["raw"].items() if name != "onnxruntime_int8"]
    raw_1 = min(r["batch_1_ms_best_round"] for r in fp32)
    best_batched = max(r["batch_8_images_per_s_best_round"] for r in fp32)
    one, eight = result["endpoint"].get("1"), result["endpoint"].get("8")
    result["ratios"] = _ratios(one, eight, raw_1, best_batched)
    if (int8_raw := result["raw"].get("onnxruntime_int8")) is not None:
        raw_int8 = (int8_raw["batch_1_ms_best_round"], int8_raw["batch_8_images_per_s_best_round"])
        result["ratios_int8"] = _ratios(one, eight, *raw_int8)
    result["floor"] = {str(clients): _summary(rounds) for clients, rounds in floor.items()}
    floor_one, floor_eight = result["floor"].get("1"), result["floor"].get("8")
    result["floor_ratios"] = _ratios(floor_one, floor_eight, raw_1, best_batched)
    result["floor_ratios"]["endpoint_p50_1_client_over_floor_ms"] = (
        round(one["p50_ms"] - floor_one["p50_ms"], 2)
        if one and floor_one and one["p50_ms"] and floor_one["p50_ms"]
        else None
    )
    print(json.dumps(result), flush=True)


def _raw_summary(times: dict[int, list[float]]) -> dict:
    """Medians over every pass, each round's median batch-1 pass (how much the machine's speed
    moved during the run), and the fastest round's medians."""
    rounds = {
        batch: [times[batch][i : i + n] for i in range(0, len(times[batch]), n)] for batch, n in RAW_PASSES.items()
    }
    best = {batch: min(statistics.median(r) for r in rounds[batch]) for batch in RAW_PASSES}
    return {
        "batch_1_ms": _ms(statistics.median(times[1])),
        "batch_8_ms": _ms(statistics.median(times[8])),
        "batch_8_images_per_s": round(8 / statistics.median(times[8]), 1),
        "batch_1_ms_rounds": [_ms(statistics.median(r)) for r in rounds[1]],
        "batch_1_ms_best_round": _ms(best[1]),
        "batch_8_images_per_s_best_round": round(8 / best[8], 1),
    }


def _ratios(one: dict | None, eight: dict | None, raw_1: float, best_batched: float) -> dict:
    """p50 at 1 client over the raw batch-1 pass, and images/s at 8 clients over the best raw batched
    rate (None where a phase did not run or had no successful request)."""
    return {
        "p50_1_client_over_raw_batch_1": round(one["p50_ms"] / raw_1, 2) if one and one["p50_ms"] else None,
        "throughput_8_clients_over_raw_batch_8": (
            round(eight["images_per_s"] / best_batched, 2) if eight and eight["images_per_s"] else None
        ),
    }


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(40)  # gunicorn gives its workers 30 s to finish
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _runtimes_seen(ask: Callable[[], str | None], workers: int) -> dict[str, int]:
    """How many of 4 asks a worker (made at once, to spread over the workers) each runtime answered."""
    with ThreadPoolExecutor(4 * workers) as pool:
        answers = list(pool.map(lambda _: ask() or "not said", range(4 * workers)))
    return {runtime: answers.count(runtime) for runtime in sorted(set(answers))}


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _log(msg: str) -> None:
    print(f"[bench_serve] {msg}", file=sys.stderr, flush=True)


def _prepare(dataset: Path, data_dir: Path) -> tuple[list[int], Path, dict]:
    """A user and four models (one trained bundle, with its int8 model made as a worker makes it
    after a job, stored as four models); the unpacked bundle; the int8 step's figures."""
    from django.contrib.auth.models import User

    from apps.serving.models import TrainedModel
    from apps.serving.services import bundle_store, model_create
    from apps.training.models import Job
    from ml.bundle import unpack_bundle
    from ml.config import VAL_FRACTION_OPTION
    from ml.dataset import index_dataset
    from ml.fit import FitConfig, fit
    from ml.quantize import quantize_bundle_zip

    user = User.objects.create_user("bench", password=PASSWORD)
    fitted = fit(dataset, data_dir / "fit", FitConfig(strategy="linear"))
    _log("making its int8 model")
    bundle, check = quantize_bundle_zip(
        Path(fitted.artifacts["bundle"]), data_dir / "int8", dataset, index_dataset(dataset),
        val_fraction=VAL_FRACTION_OPTION.default_value(),
    )  # fmt: skip
    status = TrainedModel.Int8.KEPT if check.kept else TrainedModel.Int8.REFUSED
    ids = []
    for _ in range(4):
        job = Job.objects.create(owner=user, status=Job.Status.SUCCEEDED, config={"backbone": ""})
        model = model_create(job=job, bundle=bundle_store(str(bundle)), result=fitted)
        TrainedModel.objects.filter(pk=model.pk).update(int8_status=status, int8=check.to_json())
        ids.append(model.pk)
    keys = ("kept", "agreement", "val_agreement", "val_accuracy_fp32", "val_accuracy_int8", "seconds")
    return ids, unpack_bundle(bundle, data_dir / "bundle"), {key: check.to_json()[key] for key in keys}


def _validation_jpegs(dataset: Path, n: int) -> list[bytes]:
    with zipfile.ZipFile(dataset) as zf:
        names = sorted(m for m in zf.namelist() if "val" in m.split("/")[:-1] and m.lower().endswith((".jpg", ".jpeg")))
        names = names or sorted(m for m in zf.namelist() if m.lower().endswith((".jpg", ".jpeg")))
        return [zf.read(m) for m in names[:n]]


def _forward_times(forward, size: int, batch: int, passes: int) -> list[float]:
    """Seconds of each of `passes` forward passes on a random batch, after one warm-up pass."""
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    forward(x)
    times = []
    for _ in range(passes):
        t = time.perf_counter()
        forward(x)
        times.append(time.perf_counter() - t)
    return times


def _runtimes(bundle: Path):
    """The bundle's two model files, loaded here on their own (not through the code under test),
    each with as many threads as this process has cores."""
    import numpy as np
    import onnxruntime as ort
    import torch

    size = json.loads((bundle / "preprocessing.json").read_text())["input_size"]
    cores = len(os.sched_getaffinity(0))
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = cores, 1
    session = ort.InferenceSession(str(bundle / "model.onnx"), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    yield "onnxruntime", lambda x: session.run(None, {name: x})[0], size
    if (bundle / "model.int8.onnx").is_file():
        int8 = ort.InferenceSession(str(bundle / "model.int8.onnx"), options, providers=["CPUExecutionProvider"])
        yield "onnxruntime_int8", lambda x: int8.run(None, {name: x})[0], size
    torch.set_num_threads(cores)
    model = torch.jit.load(str(bundle / "model.torchscript.pt"), map_location="cpu").eval()

    def torchscript(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    yield "torchscript", torchscript, size


def _gunicorn(
    app: str, workers: int, env: dict[str, str], access_log: Path, preload: bool
) -> tuple[str, Path, subprocess.Popen]:
    """gunicorn serving `app` as deploy/ starts it, on a free loopback port: (base URL, its access log
    (method, path, status, microseconds), the master process)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", app, "-b", f"127.0.0.1:{port}", "-w", str(workers),
         "-k", "gthread", "--threads", "8", "--timeout", "300", *(["--preload"] if preload else []),
         "--access-logfile", str(access_log), "--access-logformat", "%(m)s %(U)s %(s)s %(D)s"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    return f"http://127.0.0.1:{port}", access_log, server


def _wait_up(url: str) -> None:
    import requests

    deadline = time.monotonic() + 120
    while True:
        try:  # the first request imports the app
            if requests.get(url, timeout=60).ok:
                return
        except requests.RequestException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _start(base: str) -> str:
    import requests

    _wait_up(f"{base}/health/live/")
    r = requests.post(f"{base}/api/v1/auth/token/", json={"username": "bench", "password": PASSWORD}, timeout=60)
    r.raise_for_status()
    return r.json()["token"]


def _model_runtime(base: str, token: str, model_id: int, image: bytes) -> str | None:
    """The runtime the server chose for the model, and its precision (given with each prediction)."""
    import requests

    r = requests.post(
        f"{base}/api/v1/models/{model_id}/predict/",
        headers={"Authorization": f"Token {token}"},
        files={"image": ("x.jpg", image, "image/jpeg")},
        timeout=60,
    )
    model = r.json()["model"]
    return f"{model['runtime']} {model.get('precision', 'fp32')}" if model.get("runtime") else None


def _phase(url: str, token: str, images: list[bytes], clients: int, args: argparse.Namespace, access_log: Path) -> dict:
    """One round's load at `clients` clients, with the CPU it kept busy and the server's own times."""
    seen, cpu = access_log.stat().st_size, _cpu_times()
    phase = _load(url, token, images, clients=clients, requests=args.requests // args.rounds, client=args.client)
    phase["cpu_busy"] = _busy_since(cpu)
    phase["server_s"] = _server_seconds(access_log, seen, len(phase["latencies"]))
    return phase


def _floor_runtime(base: str) -> str:
    import requests

    return requests.get(f"{base}/", timeout=60).text


def _load(url: str, token: str, images: list[bytes], *, clients: int, requests: int, client: str = "stdlib") -> dict:
    """`requests` posts of one image each, spread over `clients` threads with a keep-alive connection
    each: the standard library's http.client sending multipart bodies built beforehand (the client
    shares the server's cores, so it should cost as little as it can), or `requests`."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + PHASE_SECONDS
    bodies = _multipart_bodies(images) if client == "stdlib" else []  # before the clock; shared

    def run() -> None:
        poster = _stdlib_poster(url, token, bodies) if client == "stdlib" else _requests_poster(url, token, images)
        with poster as send:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                t = time.perf_counter()
                error = send(i)
                elapsed = time.perf_counter() - t
                with lock:
                    (errors.append(error) if error else latencies.append(elapsed))

    t = time.perf_counter()
    threads = [threading.Thread(target=run) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return {"latencies": latencies, "errors": errors, "wall": time.perf_counter() - t}


BOUNDARY = "graft-bench-serve-boundary"


def _multipart_bodies(images: list[bytes]) -> list[bytes]:
    """Each image as a multipart body with one field, 'image' (Content-Type: see _stdlib_poster)."""
    return [
        b"".join(
            [
                f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n'
                "Content-Type: image/jpeg\r\n\r\n".encode(),
                image,
                f"\r\n--{BOUNDARY}--\r\n".encode(),
            ]
        )
        for i, image in enumerate(images)
    ]


@contextmanager
def _stdlib_poster(url: str, token: str, bodies: list[bytes]) -> Iterator[Callable[[int], str]]:
    """send(i) posts body i % len(bodies) on one keep-alive connection; '' or what went wrong. A
    connection the server has closed meanwhile is reopened and the request sent once more (as
    urllib3 does for `--client requests`)."""
    import http.client
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    headers = {"Authorization": f"Token {token}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)

    def send(i: int) -> str:
        nonlocal conn
        for attempt in (1, 2):
            try:
                conn.request("POST", parts.path, body=bodies[i % len(bodies)], headers=headers)
                r = conn.getresponse()
                data = r.read()
                return "" if r.status == 200 else f"{r.status}: {data[:200]!r}"
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
                stale = isinstance(exc, (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError))
                if attempt == 2 or not stale:
                    return type(exc).__name__
        raise AssertionError("unreachable")

    try:
        yield send
    finally:
        conn.close()


@contextmanager
def _requests_poster(url: str, token: str, images: list[bytes]) -> Iterator[Callable[[int], str]]:
    import requests as http

    with http.Session() as session:
        session.headers["Authorization"] = f"Token {token}"

        def send(i: int) -> str:
            image = images[i % len(images)]
            try:
                r = session.post(url, files={"image": (f"{i}.jpg", io.BytesIO(image), "image/jpeg")}, timeout=60)
            except http.RequestException as exc:
                return type(exc).__name__
            return "" if r.status_code == 200 else f"{r.status_code}: {r.text[:200]}"

        yield send


def _summary(rounds: list[dict]) -> dict:
    """Latency percentiles over every request of every round; throughput: the median round's."""
    latencies = [x for r in rounds for x in r["latencies"]]
    server = [x for r in rounds for x in r["server_s"]]
    errors = [e for r in rounds for e in r["errors"]]
    q = statistics.quantiles(latencies, n=100) if len(latencies) >= 2 else [float("nan")] * 99
    return {
        "requests": len(latencies) + len(errors),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "images_per_s": round(statistics.median(len(r["latencies"]) / r["wall"] for r in rounds), 1),
        "p50_ms": _ms(statistics.median(latencies)) if latencies else None,
        "p95_ms": _ms(q[94]),
        "p99_ms": _ms(q[98]),
        "server_p50_ms": _ms(statistics.median(server)) if server else None,
        "cpu_busy": round(statistics.median(r["cpu_busy"] for r in rounds), 2),
    }


def _server_seconds(access_log: Path, offset: int, expected: int) -> list[float]:
    """gunicorn's own time for each prediction logged after `offset` (its access log: method, path,
    status, microseconds), from parsing the request to sending the response. gunicorn logs a request
    after answering it, so this waits (at most 5 s) for the phase's `expected` lines."""
    deadline = time.monotonic() + 5
    while True:
        with access_log.open() as fh:
            fh.seek(offset)
            rows = [line.split() for line in fh]
        times = [int(r[3]) / 1e6 for r in rows if len(r) == 4 and r[1].endswith("/predict/") and r[2] == "200"]
        if len(times) >= expected or time.monotonic() > deadline:
            return times
        time.sleep(0.05)


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies over all cores since boot (/proc/stat): busy is user, nice, system, irq
    and softirq; idle and iowait are the rest. Steal (the host's) and guest (inside user) are left out."""
    user, nice, system, idle, iowait, irq, softirq = (
        int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]
    )
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait


def _busy_since(start: tuple[int, int]) -> float:
    busy, total = _cpu_times()
    return (busy - start[0]) / max(1, total - start[1])


def _worker_pids(master: int) -> list[int]:
    return [int(pid) for pid in Path(f"/proc/{master}/task/{master}/children").read_text().split()]


def _maps_torch(pid: int) -> bool:
    """Whether the process has torch's library mapped (imported torch)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _mib(pids: list[int], file: str, field: str) -> list[float]:
    """`field` (kB) of /proc/<pid>/`file` for each process, in MiB: VmRSS of status, Pss of smaps_rollup."""
    values = []
    for pid in pids:
        kb = next(
            line.split()[1]
            for line in Path(f"/proc/{pid}/{file}").read_text().splitlines()
            if line.startswith(f"{field}:")
        )
        values.append(round(int(kb) / 1024, 1))
    return values


if __name__ == "__main__":
    main()
