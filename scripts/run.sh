#!/usr/bin/env bash
# Runs the whole app on embedded defaults (SQLite + filesystem broker under ./var):
# migrations, two Celery workers (training on `gpu`, one job at a time in a fresh child each;
# ingestion on `celery`, with beat) and the web server on :8000.
# Any setting can be overridden from the environment (DATABASE_URL, CELERY_BROKER_URL, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
export GRAFT_DATA_DIR="${GRAFT_DATA_DIR:-$PWD/var}"
mkdir -p "$GRAFT_DATA_DIR"
if [[ -z "${SECRET_KEY:-}" ]]; then
  key_file="$GRAFT_DATA_DIR/secret_key"
  [[ -s "$key_file" ]] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(50))' > "$key_file")
  SECRET_KEY="$(cat "$key_file")"
  export SECRET_KEY
fi
$PY manage.py migrate --noinput -v0
$PY manage.py collectstatic --noinput -v0
if [[ -n "${DJANGO_SUPERUSER_USERNAME:-}" && -n "${DJANGO_SUPERUSER_PASSWORD:-}" ]]; then
  $PY manage.py createsuperuser --noinput --email "${DJANGO_SUPERUSER_EMAIL:-admin@localhost}" 2>/dev/null \
    && echo "created user $DJANGO_SUPERUSER_USERNAME" || true
fi
.venv/bin/celery -A apps worker -Q gpu --concurrency 1 --max-tasks-per-child 1 -n gpu@%h --loglevel INFO &
trainer=$!
.venv/bin/celery -A apps worker -B -Q celery --concurrency 1 -n ingest@%h --loglevel INFO \
  --schedule "$GRAFT_DATA_DIR/celerybeat-schedule" &
ingester=$!
trap 'kill "$trainer" "$ingester" 2>/dev/null; wait "$trainer" "$ingester" 2>/dev/null' EXIT INT TERM
echo "Graft: http://${GRAFT_ADDR:-127.0.0.1:8000}/  (worker pids $trainer, $ingester)"
$PY manage.py runserver "${GRAFT_ADDR:-127.0.0.1:8000}" --noreload
