#!/usr/bin/env bash
# Stop the cluster started by start-cluster.sh (by the pids it recorded).
#   deploy/local/stop-cluster.sh [-d STATE_DIR]
set -uo pipefail
STATE_DIR=./dask-cluster
while getopts "d:" opt; do
  case $opt in
    d) STATE_DIR=$OPTARG ;;
    *) exit 2 ;;
  esac
done
if [[ -f "$STATE_DIR/workers.pid" ]]; then
  while read -r entry; do
    [[ -z "$entry" ]] && continue
    if [[ "$entry" == *:* ]]; then
      ssh "${entry%%:*}" "kill ${entry##*:}" 2>/dev/null || true
    else
      kill "$entry" 2>/dev/null || true
    fi
  done <"$STATE_DIR/workers.pid"
  rm -f "$STATE_DIR/workers.pid"
fi
if [[ -f "$STATE_DIR/scheduler.pid" ]]; then
  kill "$(cat "$STATE_DIR/scheduler.pid")" 2>/dev/null || true
  rm -f "$STATE_DIR/scheduler.pid"
fi
rm -f "$STATE_DIR/scheduler.json"
echo "stopped"
