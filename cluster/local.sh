#!/usr/bin/env bash
# A local Ray head (dashboard + job server) and MLflow tracking server, for `ray job submit`
# from this machine:
#   bash cluster/local.sh up [extra `ray start` flags]   # idempotent
#   bash cluster/local.sh status                          # exit 0: both up, 3: not (all) running
#   bash cluster/local.sh down                            # stops what `up` started, nothing else
# State lives in ${CAFE_HOME:-~/.cafe}/local: mlflow.db (SQLite store), mlartifacts/, logs/, pid
# files. Ports: RAY_DASHBOARD_PORT (8265), MLFLOW_PORT (5000), RAY_GCS_PORT (6379). Services bind
# CAFE_BIND_HOST (127.0.0.1). Ray keeps token authentication on; the token is never printed.
# Bound to another address, MLflow requires a login (its basic-auth app; the admin password is
# generated into $STATE/mlflow-auth.ini). Everything written here is readable by its owner only.
set -euo pipefail
umask 077

CLUSTER="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$CLUSTER")"
VENV="$REPO/.venv"
STATE="${CAFE_HOME:-$HOME/.cafe}/local"
case "$STATE" in /*) ;; *) STATE="$PWD/$STATE" ;; esac  # the SQLite URI needs an absolute path
LOGS="$STATE/logs"
HOST="${CAFE_BIND_HOST:-127.0.0.1}"
URL_HOST="$HOST"
if [[ "$HOST" == 0.0.0.0 ]]; then URL_HOST=127.0.0.1; fi
TIMEOUT="${CAFE_UP_TIMEOUT:-180}"
TOKEN_FILE="${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}"
NAMES=(ray mlflow)
STARTED=()  # by this call of `up`

usage() {
  echo "usage: bash cluster/local.sh up [ray start flags] | down | status" >&2
  exit 2
}

# The URL a service was started with (kept so that status/down need no environment), else the
# one `up` would use now.
url() {
  if [[ -f "$STATE/$1.url" ]]; then
    cat "$STATE/$1.url"
  elif [[ "$1" == ray ]]; then
    echo "http://$URL_HOST:${RAY_DASHBOARD_PORT:-8265}"
  else
    echo "http://$URL_HOST:${MLFLOW_PORT:-5000}"
  fi
}

title() { if [[ "$1" == ray ]]; then echo "Ray head"; else echo "MLflow"; fi; }

pid_of() { cat "$STATE/$1.pid" 2>/dev/null; }

# Its process group still exists (the leader may not have exec'd into .venv yet).
alive() { kill -0 -- "-$(pid_of "$1")" 2>/dev/null; }

# Each service leads its own process group. It counts as running while a member of that group
# runs from this project's .venv, so a stale pid file never names someone else's process.
running() {
  local pid
  pid="$(pid_of "$1")" || return 1
  ps -A -o pgid=,args= | awk -v g="$pid" -v v="$VENV/" '$1 == g && index($0, v) { f = 1 } END { exit !f }'
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$1" || true; }

# The dashboard answers 401 without the token, which still means it listens.
answers() {
  if [[ "$1" == ray ]]; then
    [[ "$(http_code "$(url ray)")" =~ ^[1-4] ]]
  else
    [[ "$(http_code "$(url mlflow)/health")" == 200 ]]
  fi
}

is_up() { running "$1" && answers "$1"; }

# `ray start --block` prints this once every Ray process runs; the dashboard answers earlier.
ready() {
  if [[ "$1" == ray ]]; then
    answers ray && grep -q "Ray runtime started" "$LOGS/ray.log"
  else
    answers mlflow
  fi
}

start_ray() {
  # Ray turns token authentication on when a token exists; make sure one does, where
  # RAY_AUTH_TOKEN_PATH says (`ray get-auth-token --generate` writes only ~/.ray/auth_token).
  if [[ -z "${RAY_AUTH_TOKEN:-}" && ! -s "$TOKEN_FILE" ]]; then
    mkdir -p "$(dirname "$TOKEN_FILE")"
    "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32), end="")' >"$TOKEN_FILE"
  fi
  if [[ -f "$TOKEN_FILE" ]]; then chmod 600 "$TOKEN_FILE"; fi
  export RAY_AUTH_TOKEN_PATH="$TOKEN_FILE"
  if [[ -s "$STATE/mlflow-auth.ini" ]]; then
    # jobs submitted to this head log to the MLflow server beside it, which asks for a login
    MLFLOW_TRACKING_USERNAME=admin
    MLFLOW_TRACKING_PASSWORD="$(sed -n 's/^admin_password = //p' "$STATE/mlflow-auth.ini")"
    export MLFLOW_TRACKING_USERNAME MLFLOW_TRACKING_PASSWORD
  fi
  # --block keeps `ray start` as the group leader: on SIGTERM it drains and stops its processes.
  (set -m; RAY_AUTH_MODE=token nohup bash "$CLUSTER/start_head.sh" --port="${RAY_GCS_PORT:-6379}" --block "$@" \
    >"$LOGS/ray.log" 2>&1 </dev/null & echo $! >"$STATE/ray.pid")
}

# Off loopback, MLflow's basic-auth app: users in their own SQLite file, an admin whose password
# is generated once and kept owner-only; runs are unreadable without a login.
auth_config() {
  local ini="$STATE/mlflow-auth.ini"
  if [[ ! -s "$ini" ]]; then
    cat >"$ini" <<INI
[mlflow]
default_permission = NO_PERMISSIONS
database_uri = sqlite:///$STATE/mlflow-auth.db
admin_username = admin
admin_password = $("$VENV/bin/python" -c 'import secrets; print(secrets.token_urlsafe(24))')
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
  fi
  echo "$ini"
}

start_mlflow() {
  mkdir -p "$STATE/mlartifacts"
  local auth=()
  if [[ "$HOST" != 127.0.0.1 ]]; then
    auth=(--app-name basic-auth)
    export MLFLOW_AUTH_CONFIG_PATH="$(auth_config)"
    # the key that signs its CSRF tokens: kept, so that pages stay valid across restarts
    [[ -s "$STATE/mlflow-flask-key" ]] || "$VENV/bin/python" -c 'import secrets; print(secrets.token_hex(32))' \
      >"$STATE/mlflow-flask-key"
    MLFLOW_FLASK_SERVER_SECRET_KEY="$(cat "$STATE/mlflow-flask-key")"
    export MLFLOW_FLASK_SERVER_SECRET_KEY
  fi
  # The GenAI job runners are of no use to training runs and double the start-up time.
  (set -m; MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}" \
    MLFLOW_BACKEND_STORE_URI="sqlite:///$STATE/mlflow.db" MLFLOW_ARTIFACTS_DESTINATION="$STATE/mlartifacts" \
    nohup bash "$CLUSTER/mlflow_server.sh" ${auth[@]+"${auth[@]}"} >"$LOGS/mlflow.log" 2>&1 </dev/null &
    echo $! >"$STATE/mlflow.pid")
}

# SIGTERM to the leader first (Ray drains its node), then SIGKILL whatever is left of the group.
stop() {
  local pid i
  pid="$(pid_of "$1")"
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < ${CAFE_STOP_GRACE:-60}; i++)); do
    kill -0 -- "-$pid" 2>/dev/null || break
    sleep 1
  done
  kill -KILL -- "-$pid" 2>/dev/null || true
  for ((i = 0; i < 30; i++)); do
    [[ "$(http_code "$(url "$1")")" == 000 ]] && break
    sleep 1
  done
  rm -f "$STATE/$1.pid" "$STATE/$1.url"
}

# After a failed start: stop what this call started, nothing else.
abort() {
  local name
  echo "error: $1" >&2
  for name in ${STARTED[@]+"${STARTED[@]}"}; do stop "$name"; done
  exit 1
}

up() {
  if [[ ! -x "$VENV/bin/ray" || ! -x "$VENV/bin/mlflow" ]]; then
    echo "error: $VENV is not installed; run \`make install\` first" >&2
    exit 1
  fi
  mkdir -p "$LOGS"
  # owner-only, also where an earlier version left the state readable by others
  chmod 700 "$STATE" "$LOGS"
  find "$STATE" -maxdepth 1 -type f -exec chmod 600 {} +
  if [[ "$HOST" != 127.0.0.1 ]]; then auth_config >/dev/null; fi  # before Ray: its jobs get the login
  local name address
  for name in "${NAMES[@]}"; do
    if running "$name"; then
      echo "$(title "$name") already running (pid $(pid_of "$name")): $(url "$name")"
      continue
    fi
    rm -f "$STATE/$name.pid" "$STATE/$name.url"
    address="$(url "$name")"
    if [[ "$(http_code "$address")" != 000 ]]; then
      abort "$address already answers, but not for a service this script started; stop that one or choose another port (RAY_DASHBOARD_PORT, MLFLOW_PORT)"
    fi
    echo "$address" >"$STATE/$name.url"
    if [[ "$name" == ray ]]; then start_ray "$@"; else start_mlflow; fi
    echo "starting $(title "$name") (pid $(pid_of "$name")), log: $LOGS/$name.log"
    STARTED+=("$name")
  done
  if ((${#STARTED[@]} == 0)); then
    echo "nothing to start"
    echo
    status
    return
  fi
  local deadline=$((SECONDS + TIMEOUT))
  for name in "${STARTED[@]}"; do
    until ready "$name"; do
      if ! alive "$name"; then
        abort "$(title "$name") exited while starting; see $LOGS/$name.log"
      elif ((SECONDS >= deadline)); then
        abort "$(title "$name") did not answer on $(url "$name") within ${TIMEOUT}s; see $LOGS/$name.log"
      fi
      sleep 1
    done
  done
  echo
  status
}

down() {
  local name stopped=0
  for name in mlflow ray; do
    if running "$name"; then
      echo "stopping $(title "$name") (pid $(pid_of "$name"))"
      stop "$name"
      stopped=1
    fi
    rm -f "$STATE/$name.pid" "$STATE/$name.url"
  done
  if ((stopped)); then echo "stopped"; else echo "nothing running (state: $STATE)"; fi
}

status() {
  local name rc=0
  for name in "${NAMES[@]}"; do
    if is_up "$name"; then
      printf '%-9s up (pid %s)   %s\n' "$(title "$name"):" "$(pid_of "$name")" "$(url "$name")"
    elif running "$name"; then
      printf '%-9s not answering (pid %s)   %s; log: %s\n' "$(title "$name"):" "$(pid_of "$name")" "$(url "$name")" "$LOGS/$name.log"
      rc=3
    else
      printf '%-9s down\n' "$(title "$name"):"
      rc=3
    fi
  done
  echo "state:    $STATE"
  cat <<EOF

Submit from the project root, with the head's token:
  export RAY_AUTH_MODE=token RAY_AUTH_TOKEN="\$(cat ${TOKEN_FILE/#$HOME/\~})"
  .venv/bin/ray job submit --address $(url ray) --working-dir . -- \\
      cafe demo --config configs/demo.yaml --set tracking.tracking_uri=$(url mlflow)
EOF
  if [[ -s "$STATE/mlflow-auth.ini" ]]; then
    cat <<EOF
MLflow asks for a login (basic auth; jobs on this head have it); from this shell, as its admin:
  export MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="\$(sed -n 's/^admin_password = //p' $STATE/mlflow-auth.ini)"
EOF
  fi
  return "$rc"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) (($# == 1)) || usage; down ;;
  status) (($# == 1)) || usage; status ;;
  *) usage ;;
esac
