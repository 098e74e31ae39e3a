"""The published OpenAPI schema is correct: drf-spectacular validates it with no warning."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import ROOT


def test_the_openapi_schema_validates_without_warnings(tmp_path):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings"}
    out = subprocess.run(
        [sys.executable, "manage.py", "spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "s.yml")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (tmp_path / "s.yml").read_text().startswith("openapi: 3")
