from __future__ import annotations

from typing import Any

from celery import shared_task

from apps.ops.sweep import sweep


@shared_task(name="ops.sweep")
def sweep_storage() -> dict[str, Any]:
    """Hourly on beat: stored objects no row owns, stale multipart uploads (see apps.ops.sweep)."""
    return sweep(scratch=False).to_dict()
