"""The Celery app. Ingestion runs on the default `celery` queue, training on `gpu`."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "apps.settings")

app = Celery("graft")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
