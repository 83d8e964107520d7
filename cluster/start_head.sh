#!/usr/bin/env bash
# Start a local Ray head (dashboard + job server on 127.0.0.1:8265) for `ray job submit`.
# The project's environment goes first on PATH, so job entrypoints such as `cafe train` resolve.
# Token authentication stays on; submitters need:
#   export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="$(cat ~/.ray/auth_token)"
set -euo pipefail
VENV_BIN="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin"
export PATH="$VENV_BIN:$PATH"
HOST="${CAFE_BIND_HOST:-127.0.0.1}"
if [[ "$HOST" == 127.0.0.1 ]]; then
  # Ray turns a loopback --node-ip-address into the machine's own address and has its servers
  # (GCS, raylet, workers) listen on every interface, unless it thinks clusters unsupported.
  export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="${RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER:-0}"
fi
exec ray start --head \
  --node-ip-address="$HOST" --dashboard-host="$HOST" --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
  --num-cpus="${RAY_NUM_CPUS:-$(nproc)}" "$@"
