import json
from datetime import timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from apps.ops.sweep import sweep


class Command(BaseCommand):
    help = (
        "Remove stored objects no row owns (older than GRAFT_SWEEP_GRACE_HOURS), abort stale S3 multipart "
        "uploads, and remove this host's unpacked bundles of deleted models. Prints a JSON report."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--dry-run", action="store_true", help="report what would go, remove nothing")
        parser.add_argument("--grace-hours", type=float, default=None, help="override GRAFT_SWEEP_GRACE_HOURS")
        parser.add_argument("--scratch-only", action="store_true", help="only this host's unpacked bundles")

    def handle(self, *args: Any, **options: Any) -> None:
        grace = None if options["grace_hours"] is None else timedelta(hours=options["grace_hours"])
        report = sweep(grace=grace, dry_run=options["dry_run"], storage=not options["scratch_only"])
        self.stdout.write(json.dumps(report.to_dict()))
