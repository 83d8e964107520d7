#!/usr/bin/env bash
# MLflow tracking server for a cluster: runs from every node log here. Binds 127.0.0.1 unless
# CAFE_BIND_HOST says otherwise; exposed, it needs a login: pass `--app-name basic-auth` (as
# cluster/local.sh does off loopback) or put it behind your own authenticating proxy.
set -euo pipefail
HOST="${CAFE_BIND_HOST:-127.0.0.1}"
STORE="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
# tracking only: the server's job runner (for MLflow's GenAI features) starts worker processes
# that slow start-up and outlive a SIGTERM
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
PORT="${MLFLOW_PORT:-5000}"
HOSTS=()
if [[ "$HOST" != 127.0.0.1 && "$HOST" != 0.0.0.0 ]]; then
  # MLflow answers only Host headers it knows (DNS-rebinding guard): by default localhost and
  # private addresses, which a specific public or loopback bind address may not be
  HOSTS=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$HOST,$HOST:$PORT,localhost,localhost:$PORT}")
fi
exec "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mlflow" server --host "$HOST" --port "$PORT" \
  --backend-store-uri "$STORE" --artifacts-destination "$ARTIFACTS" ${HOSTS[@]+"${HOSTS[@]}"} "$@"
