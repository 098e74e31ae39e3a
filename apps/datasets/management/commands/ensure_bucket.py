"""`python manage.py ensure_bucket`: create the S3 bucket Graft stores into, if it is missing.

Run once per deployment, beside `migrate` (compose's and Kubernetes' migration step do).
Does nothing on local storage; where the bucket is managed elsewhere (Terraform, a cloud
console), it only checks that this deployment can reach it.
"""

from __future__ import annotations

import time
from typing import Any

from django.core.files.storage import default_storage
from django.core.management.base import BaseCommand, CommandError, CommandParser


class Command(BaseCommand):
    help = "Create the S3 bucket of AWS_STORAGE_BUCKET_NAME if it does not exist."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the S3 server")

    def handle(self, *args: Any, wait: float, **options: Any) -> None:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket = getattr(default_storage, "bucket", None)
        if bucket is None:
            self.stdout.write("local storage: no bucket to create")
            return
        deadline = time.monotonic() + wait
        while True:
            try:
                if bucket.creation_date is None:  # None: it does not exist (or is not ours to see)
                    bucket.create()
                    self.stdout.write(f"created bucket {bucket.name}")
                else:
                    self.stdout.write(f"bucket {bucket.name} is there")
                return
            except (BotoCoreError, ClientError) as exc:
                if time.monotonic() > deadline:
                    raise CommandError(f"cannot reach or create bucket {bucket.name}: {exc}") from None
                time.sleep(2)
