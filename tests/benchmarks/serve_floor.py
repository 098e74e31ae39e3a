"""The floor under the prediction endpoint: a bare WSGI app that does only what any server of this
model must do for a request, for bench_serve to run under gunicorn beside the real app.

It reads the body, cuts the one image out of the multipart form (no parser: it trusts the
benchmark's own bodies), decodes, transforms and predicts through the same `ml.predict.Predictor`
(same runtime, batching and spin settings as the app) and answers JSON. No Django, no
authentication, no limits, no logging. What the endpoint takes beyond this floor is the app's own
cost; what the floor takes beyond the raw forward is the cost of decoding a JPEG and of HTTP.

    GRAFT_FLOOR_BUNDLE=<unpacked bundle> gunicorn tests.benchmarks.serve_floor ...
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from ml.predict import Predictor

_predictor: Predictor | None = None
_load = threading.Lock()


def predictor() -> Predictor:
    """The worker's own Predictor, made on its first request: after gunicorn's fork (`--preload`
    imports this module in the master), as the app's models load."""
    global _predictor
    if _predictor is not None:
        return _predictor
    with _load:
        if _predictor is None:
            _predictor = Predictor(
                Path(os.environ["GRAFT_FLOOR_BUNDLE"]),
                runtime=os.environ["GRAFT_SERVE_RUNTIME"],
                max_batch=int(os.environ["GRAFT_SERVE_MAX_BATCH"]),
                max_wait_s=float(os.environ["GRAFT_SERVE_BATCH_WAIT_MS"]) / 1000,
                spin=os.environ["GRAFT_SERVE_SPIN"] == "1",
                precision=os.environ["GRAFT_SERVE_PRECISION"],
            )
        return _predictor


def application(environ: dict, start_response: Callable) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] != "POST":  # the benchmark's check that the server is up, and which runtime serves
        loaded = _predictor
        runtime = (f"{loaded.runtime} {loaded.precision}" if loaded is not None else "not loaded").encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(runtime)))])
        return [runtime]
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    start = body.index(b"\r\n\r\n") + 4  # the part's headers end; the image runs to the closing boundary
    image = body[start : body.rindex(b"\r\n--")]
    model = predictor()
    rows = model.predict_tensors([model.prepare(image)], k=5)
    out = json.dumps({"predictions": [[{"label": p.label, "score": p.score} for p in row] for row in rows]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(out)))])
    return [out]
