#!/usr/bin/env bash
# Start a Dask scheduler and N workers with the `dask` command line, on this
# host or on several hosts over ssh; write pid files and a scheduler file.
#
#   deploy/local/start-cluster.sh [-n N_WORKERS] [-t THREADS] [-m MEMORY] [-d STATE_DIR] [-p PORT] [-H "host1 host2"]
#   deploy/local/stop-cluster.sh [-d STATE_DIR]
#
# STATE_DIR (default ./dask-cluster) receives scheduler.json (pass it to
# `daskem ... --scheduler-file` or `[cluster] scheduler_file`), the logs and
# the pid files. With -H, workers are started over ssh on each listed host
# (STATE_DIR must be on a shared file system, and daskem installed there);
# without it they run here. Use --interface/-i to pick the network interface
# (e.g. lo for loopback).
set -euo pipefail

N_WORKERS=2
THREADS=1
MEMORY=auto
STATE_DIR=./dask-cluster
PORT=0
HOSTS=""
HOST=""
PYTHON=${PYTHON:-python}
# the dask command line; e.g. DASK="/path/to/python -m dask" for a given environment
read -r -a DASK <<<"${DASK:-dask}"

while getopts "n:t:m:d:p:H:h:" opt; do
  case $opt in
    n) N_WORKERS=$OPTARG ;;
    t) THREADS=$OPTARG ;;
    m) MEMORY=$OPTARG ;;
    d) STATE_DIR=$OPTARG ;;
    p) PORT=$OPTARG ;;
    H) HOSTS=$OPTARG ;;
    h) HOST=$OPTARG ;;
    *) sed -n '2,15p' "$0"; exit 2 ;;
  esac
done

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
SCHED_FILE="$STATE_DIR/scheduler.json"
if [[ -f "$STATE_DIR/scheduler.pid" ]] && kill -0 "$(cat "$STATE_DIR/scheduler.pid")" 2>/dev/null; then
  echo "a scheduler is already running (pid $(cat "$STATE_DIR/scheduler.pid")); stop it first" >&2
  exit 1
fi
rm -f "$SCHED_FILE"

host_args=()
[[ -n "$HOST" ]] && host_args=(--host "$HOST")

nohup "${DASK[@]}" scheduler --scheduler-file "$SCHED_FILE" --port "$PORT" \
  --dashboard-address :0 "${host_args[@]}" >"$STATE_DIR/scheduler.log" 2>&1 &
echo $! >"$STATE_DIR/scheduler.pid"

for _ in $(seq 1 120); do
  [[ -s "$SCHED_FILE" ]] && break
  sleep 0.5
done
if [[ ! -s "$SCHED_FILE" ]]; then
  echo "the scheduler did not start; see $STATE_DIR/scheduler.log" >&2
  exit 1
fi
ADDRESS=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$SCHED_FILE")

# distributed's statistical profiler slows daskem's chunk kernel by 8-15%
# (benchmarks/README.md); DASKEM_WORKER_PROFILE=1 keeps it
prof_env=""
if [ "${DASKEM_WORKER_PROFILE:-0}" = "0" ]; then
    export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
    prof_env="DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"
fi
worker_cmd=("${DASK[@]}" worker --scheduler-file "$SCHED_FILE" --nthreads "$THREADS"
            --memory-limit "$MEMORY" --local-directory "$STATE_DIR/worker-space" "${host_args[@]}")
: >"$STATE_DIR/workers.pid"
if [[ -z "$HOSTS" ]]; then
  for i in $(seq 1 "$N_WORKERS"); do
    nohup "${worker_cmd[@]}" --name "worker-$i" >"$STATE_DIR/worker-$i.log" 2>&1 &
    echo $! >>"$STATE_DIR/workers.pid"
  done
else
  for h in $HOSTS; do
    for i in $(seq 1 "$N_WORKERS"); do
      # the remote pid is recorded as host:pid; stop-cluster.sh kills it over ssh
      pid=$(ssh "$h" "cd $(printf %q "$PWD") && $prof_env nohup ${worker_cmd[*]} --name $h-$i >$STATE_DIR/worker-$h-$i.log 2>&1 & echo \$!")
      echo "$h:$pid" >>"$STATE_DIR/workers.pid"
    done
  done
fi

# wait until every worker has joined (so a job started next sees all of them)
n_hosts=1
[[ -n "$HOSTS" ]] && n_hosts=$(wc -w <<<"$HOSTS")
"$PYTHON" - "$SCHED_FILE" "$((N_WORKERS * n_hosts))" <<'PY' || { echo "workers did not join; see $STATE_DIR/worker-*.log" >&2; exit 1; }
import sys
from distributed import Client
with Client(scheduler_file=sys.argv[1], timeout="60s") as c:
    c.wait_for_workers(int(sys.argv[2]), timeout=180)
PY

echo "scheduler $ADDRESS"
echo "scheduler file $SCHED_FILE"
echo "stop with: $(dirname "$0")/stop-cluster.sh -d $STATE_DIR"
