#!/usr/bin/env bash
# MLflow tracking server for a cluster: runs from every node log here. Binds 127.0.0.1 unless
# CAFE_BIND_HOST says otherwise (put it behind your own auth proxy before exposing it).
set -euo pipefail
HOST="${CAFE_BIND_HOST:-127.0.0.1}"
STORE="${MLFLOW_BACKEND_STORE_URI:-sqlite:///mlflow.db}"
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-./mlartifacts}"
# tracking only: the server's job runner (for MLflow's GenAI features) starts worker processes
# that slow start-up and outlive a SIGTERM
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
exec "$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/mlflow" server --host "$HOST" --port "${MLFLOW_PORT:-5000}" \
  --backend-store-uri "$STORE" --artifacts-destination "$ARTIFACTS" "$@"
