"""Test settings: the real services when they are reachable (always in CI).

Integration tests need PostgreSQL and Redis, and the many-hosts tests an S3 server
(SeaweedFS on :8333); with CI=true they must be there (scripts/test.sh starts them),
elsewhere those tests skip with a reason. The suite's own storage stays local files:
the many-hosts tests point the processes they start at the S3 server.
"""

import os
import socket
import tempfile


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


if "DATABASE_URL" not in os.environ and _reachable(5432):
    os.environ["DATABASE_URL"] = "postgres://postgres@127.0.0.1:5432/graft"
if "CELERY_BROKER_URL" not in os.environ and _reachable(6379):
    os.environ["CELERY_BROKER_URL"] = "redis://127.0.0.1:6379/15"
os.environ.setdefault("SECRET_KEY", "graft-tests-only-never-a-deployment-key-0123456789")
os.environ.setdefault("GRAFT_DATA_DIR", tempfile.mkdtemp(prefix="graft-tests-"))
os.environ.setdefault("GRAFT_JOB_STALE_SECONDS", "30")
os.environ.setdefault("GRAFT_HEARTBEAT_SECONDS", "2")
os.environ.setdefault("GRAFT_INT8", "0")  # after each job; tests/apps/test_int8.py asks for it

from apps.settings import *  # noqa: E402,F403

STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405 - whitenoise expects it
S3_ENDPOINT = os.environ.get("GRAFT_TEST_S3_ENDPOINT", "http://127.0.0.1:8333")
S3_REACHABLE = _reachable(int(S3_ENDPOINT.rsplit(":", 1)[1].split("/")[0]))
INTEGRATION = DATABASES["default"]["ENGINE"].endswith("postgresql") and CELERY_BROKER_URL.startswith("redis://")  # noqa: F405
AXES_ENABLED = False  # the test client signs in without a request; tests/apps/test_throttles.py turns it on
GRAFT_THROTTLE_RATES = {"anon": "100000/min", "user": "100000/min", "sign_in": "100000/min"}  # noqa: F405
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast user creation in tests
