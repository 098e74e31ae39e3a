"""`python manage.py backup OUT`: the database and every stored object, in one file (apps.ops.backup)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.ops.backup import BackupError, backup_create


class Command(BaseCommand):
    help = "Write a backup of the database and of every stored object to the file OUT (a tar)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("out", type=Path, help="the backup file to write (it must not exist)")

    def handle(self, *args: Any, out: Path, verbosity: int, **options: Any) -> None:
        try:
            summary = backup_create(out=out.resolve(), progress=verbosity > 0)
        except BackupError as exc:
            raise CommandError(str(exc)) from None
        self.stdout.write(json.dumps(summary))
