"""Web-process memory under hostile images: what one gunicorn worker adds to its peak RSS.

Run from the repo root (prints JSON lines; not a pass/fail test):

    .venv/bin/python -m tests.benchmarks.bench_memory            # both parts
    .venv/bin/python -m tests.benchmarks.bench_memory hostile    # or: gallery

Part "hostile" starts gunicorn as deploy/ does (gthread, 8 threads; one worker, on embedded defaults in
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

Part "gallery" runs the same server on S3 storage (SeaweedFS at GRAFT_BENCH_S3_ENDPOINT, default
http://127.0.0.1:8333, as scripts/test.sh starts it; a bucket of its own, removed at the end):
  gallery_page_s3_cold  a dataset of 80 random-noise PNGs (about 210 MiB stored uncompressed:
                    nothing makes the archive small) and a job of it whose metrics list 60
                    misclassified images, its gallery made as the training worker makes it
                    (apps.training.gallery): the job page, the job's JSON and the 60 thumbnails
                    job.js asks for, six at a time as a browser does, on a fresh worker (which
                    then also imports boto3 and makes its one S3 client, apps.common.storage)
  dataset_page_s3   that dataset's page and its 24 thumbnails
  gallery_page_s3   the job page and its 60 thumbnails again, on the worker now warm
Their lines add "rss_added_mib" (VmRSS after - before), the peak added by the page alone and by
its thumbnails, and "archive_mib"; the gallery's, the seconds the worker took to store the 60
thumbnails. Target: under 50 MB added by the job page.
Measured on SeaweedFS (archive 210.7 MiB, medians of 3 runs): 19.6 MiB fresh, 0.2 MiB warm; 107.6
fresh before the web process's S3 reads shared one client (django-storages makes a boto3 resource,
about 15 MiB, for each thread).
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
GALLERY = 60  # misclassified images on the job page (job.js shows at most 60)


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


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def _worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def main() -> None:
    parts = sys.argv[1:] or list(PARTS)
    if unknown := [p for p in parts if p not in PARTS]:
        raise SystemExit(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    if len(parts) == 1:
        PARTS[parts[0]]()
        return
    for part in parts:  # storage is chosen when Django starts: each part in a process of its own
        subprocess.run([sys.executable, "-m", "tests.benchmarks.bench_memory", part], cwd=ROOT, check=True)


def _base_env(data_dir: Path) -> dict[str, str]:
    return {
        **os.environ,
        "GRAFT_DATA_DIR": str(data_dir),
        "SECRET_KEY": os.urandom(32).hex(),  # production settings refuse short or placeholder keys
        "DJANGO_SETTINGS_MODULE": "apps.settings",
        "GRAFT_THROTTLE_USER": "100000/min",
        "MALLOC_ARENA_MAX": os.environ.get("MALLOC_ARENA_MAX", "2"),  # as deploy/Dockerfile sets it
    }


def hostile() -> None:
    data_dir = Path(tempfile.mkdtemp(prefix="graft-bench-memory-"))
    env = _base_env(data_dir)
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


def gallery() -> None:
    """The job page's misclassified gallery on S3: what it adds to the web process."""
    endpoint = os.environ.get("GRAFT_BENCH_S3_ENDPOINT", "http://127.0.0.1:8333")
    host, port = endpoint.rsplit("/", 1)[-1].rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=2).close()
    except OSError:
        print(json.dumps({"scenario": "gallery_page_s3", "skipped": f"no S3 server at {endpoint}"}), flush=True)
        return
    data_dir = Path(tempfile.mkdtemp(prefix="graft-bench-memory-s3-"))
    bucket = f"graft-bench-memory-{os.urandom(4).hex()}"
    env = {
        **_base_env(data_dir),
        "AWS_STORAGE_BUCKET_NAME": bucket,
        "AWS_S3_ENDPOINT_URL": endpoint,
        # SeaweedFS without identities (scripts/test.sh's) takes any key.
        "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "graft-bench"),
        "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", os.urandom(16).hex()),
        "AWS_S3_REGION_NAME": "us-east-1",
    }
    os.environ.update(env)
    import django

    django.setup()
    from django.core.files.storage import default_storage
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    call_command("ensure_bucket", verbosity=0)
    try:
        ids = _prepare_gallery(data_dir)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port_ = s.getsockname()[1]
        server = _gunicorn(f"127.0.0.1:{port_}", env)
        base = f"http://127.0.0.1:{port_}"
        try:
            _wait_live(base)
            browser = _browser(base)
            pid = _worker_pid(server.pid)
            # The gallery first on a fresh worker (it then also makes its S3 client), and again
            # once the dataset page has been served.
            for scenario in ("gallery_page_s3_cold", "dataset_page_s3", "gallery_page_s3"):
                before, before_rss = _hwm_mib(pid), _rss_mib(pid)
                t = time.perf_counter()
                statuses, page_peak = _load_page(scenario, browser, base, ids, pid)
                seconds = time.perf_counter() - t
                after, after_rss = _hwm_mib(pid), _rss_mib(pid)
                line = {
                    "scenario": scenario,
                    "status": statuses,
                    "seconds": round(seconds, 2),
                    "peak_rss_added_mib": round(after - before, 1),
                    "rss_added_mib": round(after_rss - before_rss, 1),
                    "page_added_mib": round(page_peak - before, 1),  # the HTML (and the job's JSON)
                    "thumbnails_added_mib": round(after - page_peak, 1),
                    "worker_peak_rss_mib": round(after, 1),
                    "archive_mib": round(ids["archive_bytes"] / 2**20, 1),
                }
                if scenario.startswith("gallery_page"):
                    line["gallery_store_s"] = ids["gallery_store_s"]
                print(json.dumps(line), flush=True)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(30)
    finally:
        default_storage.bucket.objects.all().delete()
        default_storage.bucket.delete()
        shutil.rmtree(data_dir, ignore_errors=True)


def _prepare_gallery(data_dir: Path) -> dict:
    """A user; an ingested dataset of 80 noise PNGs (train 10 + val 30 per class, stored, >= 200 MB);
    a succeeded job and its model whose metrics list 60 misclassified images, gallery stored."""
    import zipfile

    import numpy as np
    from django.contrib.auth.models import User
    from django.core.files.uploadedfile import UploadedFile

    from apps.datasets.models import Dataset
    from apps.datasets.services import dataset_create
    from apps.datasets.tasks import ingest_dataset
    from apps.serving.models import TrainedModel
    from apps.training.gallery import gallery_store
    from apps.training.models import Job

    user = User.objects.create_user("bench", password=PASSWORD)
    rng = np.random.default_rng(0)
    path, val = data_dir / "noise.zip", []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:  # noise does not compress anyway
        for split, n in (("train", 10), ("val", 30)):
            for label in ("a", "b"):
                for i in range(n):
                    member = f"{split}/{label}/{i:03d}.png"
                    zf.writestr(member, _noise_png(rng))
                    if split == "val":
                        val.append((member, label))
    size = path.stat().st_size
    assert size >= 200 * 10**6, size
    with path.open("rb") as fh:
        upload = UploadedFile(fh, name="noise.zip", content_type="application/zip", size=size)
        dataset = dataset_create(owner=user, file=upload, name="noise")
    ingest_dataset.apply(args=[dataset.pk])  # as the ingestion worker would
    dataset = Dataset.objects.get(pk=dataset.pk)
    assert dataset.status == "ready", dataset.error
    wrong = [{"file": m, "label": c, "predicted": "b" if c == "a" else "a", "score": 0.9} for m, c in val[:GALLERY]]
    metrics = {"val_accuracy": 0.0, "num_val": len(val), "misclassified": wrong}
    job = Job.objects.create(owner=user, dataset=dataset, status=Job.Status.SUCCEEDED, metrics=metrics)
    model = TrainedModel.objects.create(owner=user, job=job, name="noise", classes=["a", "b"], metrics=metrics)
    t = time.perf_counter()
    stored = gallery_store(prefix=model.storage_prefix, dataset=dataset, metrics=metrics)  # as `_succeed` does
    assert stored == GALLERY, stored
    return {
        "dataset": dataset.pk,
        "job": job.pk,
        "archive_bytes": size,
        "gallery_store_s": round(time.perf_counter() - t, 2),
    }


def _noise_png(rng) -> bytes:
    """A 1000x920 RGB PNG of random noise: 2.76 MB that no compression makes smaller."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (920, 1000, 3), dtype="uint8")).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _gunicorn(bind: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "apps.wsgi", "-b", bind, "-w", "1",
         "-k", "gthread", "--threads", "8", "--timeout", "300"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _wait_live(base: str) -> None:
    import requests

    for _ in range(120):
        try:  # the first request imports the app
            if requests.get(f"{base}/health/live/", timeout=60).ok:
                return
        except requests.RequestException:
            time.sleep(0.5)
    raise RuntimeError(f"{base} did not start")


def _browser(base: str):
    import requests

    browser = requests.Session()
    browser.get(f"{base}/accounts/login/")
    browser.post(
        f"{base}/accounts/login/",
        data={"username": "bench", "password": PASSWORD, "csrfmiddlewaretoken": browser.cookies["csrftoken"]},
        headers={"Referer": f"{base}/accounts/login/"},
    )
    return browser


def _load_page(scenario: str, browser, base: str, ids: dict, pid: int) -> tuple[list, float]:
    """A page and its images as a browser loads them (six connections): the statuses and counts,
    and the worker's peak RSS once the page (before its images) was served."""
    if scenario == "dataset_page_s3":
        page = browser.get(f"{base}/datasets/{ids['dataset']}/")
        urls = [u.replace("&amp;", "&") for u in re.findall(r'src="(/datasets/\d+/thumb/\?m=[^"]+)"', page.text)]
    else:
        page = browser.get(f"{base}/jobs/{ids['job']}/")
        job = browser.get(f"{base}/api/v1/jobs/{ids['job']}/").json()
        urls = _gallery_urls(job)
    page_peak = _hwm_mib(pid)
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda u: browser.get(base + u), urls))
    jpegs = sum(r.status_code == 200 and r.headers.get("Content-Type") == "image/jpeg" for r in answers)
    statuses = [*sorted({page.status_code, *(r.status_code for r in answers)}), f"{jpegs}/{len(urls)} JPEG thumbnails"]
    return statuses, page_peak


def _gallery_urls(job: dict) -> list[str]:
    """The thumbnail URLs job.js puts on the page for a succeeded job."""
    from urllib.parse import quote

    return [
        f"/models/{job['model']}/thumb/?m={quote(w['file'], safe='')}"
        for w in job["metrics"]["misclassified"][:GALLERY]
    ]


PARTS = {"hostile": hostile, "gallery": gallery}


if __name__ == "__main__":
    main()
