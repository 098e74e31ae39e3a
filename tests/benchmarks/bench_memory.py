"""Web-process memory under hostile images: what one gunicorn worker adds to its peak RSS.

Run from the repo root (prints JSON lines; not a pass/fail test):

    .venv/bin/python -m tests.benchmarks.bench_memory

It starts gunicorn as deploy/ does (gthread, 8 threads; one worker, on embedded defaults in
a temporary GRAFT_DATA_DIR), with a model trained here on a tiny dataset (a linear probe),
and measures the worker's peak RSS (VmHWM) before and after each scenario:
  predict_refused   32 x 64-MP PNGs (8000x8000, ~200 KB each) in one request, under the default
                    per-request pixel budget: refused (413) from the image headers alone
  predict_decoded   the same request with the budget raised so that every image is decoded
                    (the decode gate, the reduction after decoding and the bounded forward pass hold it)
  predict_parallel  8 requests at once of 4 such images each, budget raised (32 decodes, concurrent)
  dataset_page      a dataset of ten 64-MP PNGs (ingested here, as the worker would): its page
                    and its ten thumbnails, requested at once
Each line: {"scenario", "status", "seconds", "peak_rss_added_mib", "worker_peak_rss_mib"}.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


def _huge_png(color) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGBA", (8000, 8000), (*color, 255)).save(buf, "PNG")
    return buf.getvalue()


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM")


def _worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def main() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="graft-bench-memory-"))
    env = {
        **os.environ,
        "GRAFT_DATA_DIR": str(data_dir),
        "SECRET_KEY": "bench-memory-only",
        "DJANGO_SETTINGS_MODULE": "apps.settings",
        "GRAFT_THROTTLE_USER": "100000/min",
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),  # as deploy/Dockerfile sets it
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    model_id, dataset_id = _prepare(data_dir)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    results = []
    for scenario, extra_env in (
        ("predict_refused", {}),
        ("predict_decoded", {"GRAFT_MAX_PREDICT_PIXELS": str(33 * 64_000_000)}),
        ("predict_parallel", {"GRAFT_MAX_PREDICT_PIXELS": str(33 * 64_000_000)}),
        ("dataset_page", {}),
    ):
        results.append(_run(scenario, base, port, {**env, **extra_env}, model_id, dataset_id))
        print(json.dumps(results[-1]), flush=True)
    shutil.rmtree(data_dir, ignore_errors=True)


def _prepare(data_dir: Path) -> tuple[int, int]:
    """A user, a model trained on a tiny dataset, and an ingested dataset of ten 64-MP PNGs."""
    from django.contrib.auth.models import User
    from django.core.files.uploadedfile import SimpleUploadedFile

    from apps.datasets.models import Dataset
    from apps.datasets.services import dataset_create, dataset_ingest
    from apps.serving.services import bundle_store, model_create
    from apps.training.models import Job
    from ml.fit import FitConfig, fit
    from tests.conftest import class_folders, make_zip

    user = User.objects.create_user("bench", password=PASSWORD)
    small = make_zip(data_dir / "small.zip", class_folders({"a": 6, "b": 6}))
    result = fit(small, data_dir / "fit", FitConfig(strategy="linear", resolution="native"))
    job = Job.objects.create(owner=user, status=Job.Status.SUCCEEDED)
    model = model_create(job=job, bundle=bundle_store(result.artifacts["bundle"]), result=result)

    png = {"red": _huge_png((200, 30, 30)), "blue": _huge_png((30, 30, 200))}
    members = {f"{c}/{i}.png": _distinct(png[c], 10 * (c == "blue") + i) for c in png for i in range(5)}
    archive = make_zip(data_dir / "huge.zip", members).read_bytes()
    dataset = dataset_create(owner=user, file=SimpleUploadedFile("huge.zip", archive), name="huge")
    dataset_ingest(dataset=Dataset.objects.get(pk=dataset.pk))
    assert Dataset.objects.get(pk=dataset.pk).status == "ready", Dataset.objects.get(pk=dataset.pk).error
    return model.pk, dataset.pk


def _distinct(png: bytes, i: int) -> bytes:
    """The same picture with a different text chunk: distinct files (no duplicate warnings)."""
    import struct
    import zlib

    chunk = b"tEXt" + f"n\0{i}".encode()
    text = struct.pack(">I", len(chunk) - 4) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return png[:33] + text + png[33:]


def _run(scenario: str, base: str, port: int, env: dict, model_id: int, dataset_id: int) -> dict:
    import requests

    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "apps.wsgi", "-b", f"127.0.0.1:{port}", "-w", "1",
         "-k", "gthread", "--threads", "8", "--timeout", "300"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        for _ in range(120):
            try:  # the first request imports the app
                if requests.get(f"{base}/health/live/", timeout=60).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        session = requests.Session()
        token = session.post(f"{base}/api/v1/auth/token/", json={"username": "bench", "password": PASSWORD}).json()
        session.headers["Authorization"] = f"Token {token['token']}"
        small = _small_png()
        warm = session.post(f"{base}/api/v1/models/{model_id}/predict/", files={"image": ("w.png", small)})
        assert warm.ok, warm.text
        pid = _worker_pid(server.pid)
        before = _hwm_mib(pid)
        t = time.perf_counter()
        if scenario.startswith("predict"):
            huge = _huge_png((200, 30, 30))
            copies = 8 if scenario == "predict_parallel" else 1
            files = [("image", (f"{i}.png", huge)) for i in range(32 // copies)]

            def call(_):
                return session.post(f"{base}/api/v1/models/{model_id}/predict/", files=files, timeout=600).status_code

            with ThreadPoolExecutor(copies) as pool:
                statuses = sorted(set(pool.map(call, range(copies))))
        else:
            browser = requests.Session()
            browser.get(f"{base}/accounts/login/")
            browser.post(
                f"{base}/accounts/login/",
                data={"username": "bench", "password": PASSWORD, "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
                headers={"Referer": f"{base}/accounts/login/"},
            )
            page = browser.get(f"{base}/datasets/{dataset_id}/")
            thumbs = re.findall(r'src="(/datasets/\d+/thumb/\?m=[^"]+)"', page.text)
            with ThreadPoolExecutor(10) as pool:
                codes = list(pool.map(lambda u: browser.get(base + u.replace("&amp;", "&")).status_code, thumbs))
            statuses = sorted({page.status_code, *codes})
            statuses.append(f"{len(thumbs)} thumbnails")
        seconds = time.perf_counter() - t
        after = _hwm_mib(pid)
        return {
            "scenario": scenario,
            "status": statuses,
            "seconds": round(seconds, 2),
            "peak_rss_added_mib": round(after - before, 1),
            "worker_peak_rss_mib": round(after, 1),
        }
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def _small_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


if __name__ == "__main__":
    main()
