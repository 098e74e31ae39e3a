"""Fault points: where the fault-injection tests (tests/apps/test_faults.py) stop a worker.

`point(name)` does nothing unless the process was started with GRAFT_FAULT_PAUSE=<name> (a test
setting, never a deployment's): then it leaves a marker file in GRAFT_FAULT_DIR and waits until the
test releases it (or SIGKILLs the worker there, or cuts its database connection). Named points make
a kill land at the same place of the work every run, instead of wherever a timer happens to fall.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def point(name: str) -> None:
    if os.environ.get("GRAFT_FAULT_PAUSE") != name:
        return
    folder = Path(os.environ.get("GRAFT_FAULT_DIR", "."))
    (folder / f"{name}.reached").write_text(str(os.getpid()))
    while not (folder / f"{name}.release").exists():
        time.sleep(0.05)
