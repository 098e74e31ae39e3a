from typing import Any

from django.core.management.base import BaseCommand

from apps.training.services import job_recover_stale


class Command(BaseCommand):
    help = "Re-queue running jobs whose worker stopped sending heartbeats (it died or lost the DB)."

    def handle(self, *args: Any, **options: Any) -> None:
        ids = job_recover_stale()
        self.stdout.write(f"re-queued {len(ids)} stale job(s): {ids}" if ids else "no stale jobs")
