"""The Celery app. Ingestion runs on the default `celery` queue, training on `gpu`."""

import logging
import os
import time
from typing import Any

from celery import Celery
from celery.signals import worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apps.settings")

app = Celery("graft")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


def preload_the_engine(**_: Any) -> None:
    """Import the engine (torch, torchvision, timm, scikit-learn) once, in the worker's main process
    before it forks its pool: the children share those pages, and no work item pays for the import.

    Paid inside the first item instead, it came between the item's claim and its first heartbeat: on a
    slow 2-core host importing `ml.fit` took 7.4 s, and with the many-hosts test's 8-s staleness beat
    took the job for lost and sent it to another worker. (Not on the web tier: it never runs this.)"""
    started = time.perf_counter()
    import ml.finders  # noqa: F401 - the finders (cleanlab), beside the fit
    import ml.fit  # noqa: F401

    logging.getLogger(__name__).info("engine imported in %.1f s", time.perf_counter() - started)


worker_init.connect(preload_the_engine)
