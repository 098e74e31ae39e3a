"""`python manage.py restore IN [--force]`: replace the database and storage with a backup (apps.ops.restore)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.ops.backup import BackupError
from apps.ops.restore import backup_restore


class Command(BaseCommand):
    help = (
        "Restore a backup made by `backup`: the database (same migration state) and every stored object, "
        "each checked against its SHA-256. Refuses a deployment that holds anything, unless --force."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("backup", type=Path, help="the backup file")
        parser.add_argument(
            "--force", action="store_true", help="wipe this deployment's database rows and stored objects first"
        )

    def handle(self, *args: Any, backup: Path, force: bool, verbosity: int, **options: Any) -> None:
        try:
            summary = backup_restore(path=backup, force=force, progress=verbosity > 0)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(json.dumps(summary))
