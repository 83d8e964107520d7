#!/usr/bin/env bash
# Start a local Ray head (dashboard + job server on 127.0.0.1:8265) for `ray job submit`.
# Token authentication stays on: submitters export RAY_AUTH_TOKEN="$(ray get-auth-token)".
set -euo pipefail
HOST="${CAFE_BIND_HOST:-127.0.0.1}"
exec "${RAY:-.venv/bin/ray}" start --head \
  --node-ip-address="$HOST" --dashboard-host="$HOST" --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" "$@"
