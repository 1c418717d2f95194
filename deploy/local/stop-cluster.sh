#!/usr/bin/env bash
# Stop the cluster started by start-cluster.sh, by the pids it recorded in its state folder.
set -uo pipefail

usage() {
  cat <<'EOF'
usage: stop-cluster.sh [-d DIR] [-h]

Stop the scheduler and workers that start-cluster.sh recorded in DIR (by pid;
workers on other hosts over ssh) and remove DIR/scheduler.json and DIR/security.yaml.
The certificates in DIR/tls are kept for the next start.

options:
  -d, --state-dir DIR   state folder (default: $DASKEM_HOME/cluster, i.e. ~/.daskem/cluster)
  -h, --help            this help
EOF
}

STATE_DIR="${DASKEM_HOME:-$HOME/.daskem}/cluster"
while [[ $# -gt 0 ]]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    -d | --state-dir)
      [[ $# -ge 2 ]] || { echo "stop-cluster.sh: $1 needs a value (see --help)" >&2; exit 2; }
      STATE_DIR=$2
      shift 2 ;;
    --state-dir=*) STATE_DIR=${1#*=}; shift ;;
    *) echo "stop-cluster.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [[ ! -f "$STATE_DIR/scheduler.pid" && ! -f "$STATE_DIR/workers.pid" ]]; then
  echo "stop-cluster.sh: no cluster recorded in $STATE_DIR" >&2
  exit 1
fi

# a pid is ours only while it still runs `dask` (pids are reused after a reboot)
is_dask() { ps -o command= -p "$1" 2>/dev/null | grep -q dask; }

if [[ -f "$STATE_DIR/workers.pid" ]]; then
  while read -r entry; do
    [[ -z "$entry" ]] && continue
    if [[ "$entry" == *:* ]]; then
      ssh "${entry%%:*}" "kill ${entry##*:}" 2>/dev/null || true
    elif is_dask "$entry"; then
      kill "$entry" 2>/dev/null || true
    fi
  done <"$STATE_DIR/workers.pid"
  rm -f "$STATE_DIR/workers.pid"
fi
if [[ -f "$STATE_DIR/scheduler.pid" ]]; then
  pid=$(cat "$STATE_DIR/scheduler.pid")
  if is_dask "$pid"; then
    kill "$pid" 2>/dev/null || true
  fi
  rm -f "$STATE_DIR/scheduler.pid"
fi
rm -f "$STATE_DIR/scheduler.json" "$STATE_DIR/security.yaml"
echo "stopped the cluster of $STATE_DIR"
