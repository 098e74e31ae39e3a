"""The type check: mypy over apps/ and ml/ (strict on both), as mypy.ini configures it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow  # about 30 s from a cold cache (a fresh clone), a second with .mypy_cache
def test_mypy_finds_no_errors():
    result = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, f"mypy found errors:\n{result.stdout}{result.stderr}"
