#!/usr/bin/env bash
# Runs the whole test suite. Integration tests use PostgreSQL (127.0.0.1:5432), Redis
# (127.0.0.1:6379) and an S3 server (SeaweedFS, 127.0.0.1:8333; its `weed` binary comes with
# requirements-dev.txt); this script starts them when they are installed here but down.
# With CI=true they are required: the run fails instead of skipping them. The same goes for
# Chromium (/usr/bin/chromium, Debian's package), which the browser tests drive; it is installed if missing.
# The S3 server this script starts is stopped when it ends, however it ends; one that was already
# running is left alone. (PostgreSQL and Redis are the machine's own services: they stay up.)
set -euo pipefail
cd "$(dirname "$0")/.."

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

weed_pid=""
stop_what_we_started() {
  [[ -n "$weed_pid" ]] || return 0
  echo "stopping the SeaweedFS this run started (pid $weed_pid)"
  kill "$weed_pid" 2>/dev/null || return 0
  # weed's graceful stop can hang on its own gRPC streams: a few seconds, then SIGKILL.
  for _ in $(seq 25); do kill -0 "$weed_pid" 2>/dev/null || return 0; sleep 0.2; done
  kill -KILL "$weed_pid" 2>/dev/null || true
}
trap stop_what_we_started EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if ! up 5432 && command -v pg_ctlcluster >/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
fi
if ! up 6379 && command -v redis-server >/dev/null; then
  echo "starting Redis"
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
if ! up 8333 && [[ -x .venv/bin/weed ]]; then
  echo "starting SeaweedFS (S3 on 127.0.0.1:8333)"
  weed_dir="${TMPDIR:-/tmp}/graft-seaweedfs"
  mkdir -p "$weed_dir"
  # Volume slots from the free disk (-volume.max=0): each bucket takes several volumes at once, and
  # with the default of 8 the filer's own 7 left a bucket one, which checkpoints filled (writes then
  # failed with "no writable volumes").
  nohup .venv/bin/weed server -s3 -dir="$weed_dir" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.volumeSizeLimitMB=64 -volume.max=0 >"$weed_dir/weed.log" 2>&1 &
  weed_pid=$!
fi
for _ in $(seq 60); do up 5432 && up 6379 && up 8333 && break; sleep 1; done
if [[ "${CI:-}" == "true" ]] && ! { up 5432 && up 6379 && up 8333; }; then
  echo "CI needs PostgreSQL on 127.0.0.1:5432, Redis on 127.0.0.1:6379 and S3 on 127.0.0.1:8333;" \
    "they are not all reachable." >&2
  exit 1
fi

# Browser tests drive Debian's Chromium (Playwright cannot download its own browser here).
if [[ ! -x /usr/bin/chromium ]]; then
  echo "installing Chromium for the browser tests"
  sudo=""; [[ "$(id -u)" == 0 ]] || sudo="sudo"
  apt_get() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get -q "$@" >/dev/null; }
  apt_get install -y --no-install-recommends chromium || { apt_get update && apt_get install -y --no-install-recommends chromium; } || true
  if [[ ! -x /usr/bin/chromium ]]; then
    if [[ "${CI:-}" == "true" ]]; then
      echo "CI needs Chromium at /usr/bin/chromium for the browser tests; installing it failed." >&2
      exit 1
    fi
    echo "warning: could not install Chromium; the browser tests will be skipped." >&2
  fi
fi
# Not `exec`: this shell stays, so that its EXIT trap stops what it started once pytest ends.
.venv/bin/python -m pytest "$@"
