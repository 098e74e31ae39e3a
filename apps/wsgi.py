import gc
import os

from django.core.wsgi import get_wsgi_application
from django.urls import get_resolver

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apps.settings")
application = get_wsgi_application()

# Import every view now rather than on the first request, and with them what serving runs: ml's
# serving modules and ONNX Runtime (never torch: tests/test_serving_without_torch.py). Under
# `gunicorn --preload` (deploy/) the master does it once, before it forks, and the workers share
# those pages: 3 workers serving 4 models each took 3,089 MiB together (PSS, bench_serve) without,
# 2,621 MiB with (when the web tier still imported torch). Models load in each worker, after the
# fork, on first use.
get_resolver().url_patterns  # noqa: B018 (the property imports the URLconf)
import onnxruntime  # noqa: E402,F401

# What is imported lives as long as the process: frozen, it is out of the collector's sight, so a
# full collection in a worker no longer writes to the objects (and copies the pages) it shares with
# the master. bench_serve, alternating runs: 2,322 and 2,294 MiB without, 1,918 and 1,969 with.
# The import's own garbage is collected first, so that none of it is kept for good.
gc.collect()
gc.freeze()
