#!/usr/bin/env bash
# Runs the whole test suite. Integration tests use PostgreSQL (127.0.0.1:5432) and Redis
# (127.0.0.1:6379); this script starts them when they are installed here but down.
# With CI=true they are required: the run fails instead of skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

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
for _ in $(seq 30); do up 5432 && up 6379 && break; sleep 1; done
if [[ "${CI:-}" == "true" ]] && ! { up 5432 && up 6379; }; then
  echo "CI needs PostgreSQL on 127.0.0.1:5432 and Redis on 127.0.0.1:6379; they are not reachable." >&2
  exit 1
fi
exec .venv/bin/python -m pytest "$@"
