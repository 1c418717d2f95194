#!/usr/bin/env bash
# Start a Dask cluster for daskem with the `dask` command line: one scheduler
# and N workers, on this host or, over ssh, on several. Run with --help.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: start-cluster.sh [-n N] [-t N] [-m SIZE] [-d DIR] [-l ADDRESS] [-p PORT]
                        [-H "HOST1 HOST2"] [--tls] [--dashboard ADDRESS] [-h]

Start a Dask scheduler and N workers (the `dask` command line) and record their
pids, logs and scheduler file in a state folder; stop them with stop-cluster.sh.

By default everything listens on 127.0.0.1 only: one host, no certificates.
For several hosts (-H, or a --listen address other than 127.0.0.1) or with --tls,
the cluster uses TLS with client certificates: a CA and certificates are created
in DIR/tls (once; reused on the next start), the scheduler and workers refuse
anyone without a certificate from that CA, and DIR/security.yaml (a Dask config
file) lets `daskem ... --scheduler-file DIR/scheduler.json` connect.

options:
  -n, --workers N         workers per host (default: 2)
  -t, --threads N         threads per worker (default: 1)
  -m, --memory SIZE       memory limit per worker, e.g. 4GiB (default: auto)
  -d, --state-dir DIR     state folder (default: $DASKEM_HOME/cluster, i.e. ~/.daskem/cluster)
  -l, --listen ADDRESS    address the scheduler listens on (default: 127.0.0.1);
                          another address, e.g. this host's IP or 0.0.0.0, turns on TLS
  -p, --port PORT         scheduler port (default: any free port)
  -H, --hosts "H1 H2"     start the workers on these hosts over ssh (turns on TLS; needs
                          password-less ssh, the same environment on every host, and DIR
                          on a file system they share)
      --tls               TLS with client certificates even on 127.0.0.1 (a host shared
                          with other users: anyone on it can reach 127.0.0.1)
      --dashboard ADDRESS where the scheduler's dashboard listens (default: 127.0.0.1:0;
                          from another machine: ssh -L 8787:127.0.0.1:PORT HOST)
  -h, --help              this help

environment: DASK (the dask command, default "dask", e.g. DASK="/opt/env/bin/python -m dask"),
PYTHON (default "python"), DASKEM_HOME (default ~/.daskem), DASKEM_WORKER_PROFILE=1 keeps
distributed's statistical profiler on the workers (off by default: it slows daskem by 8-15%).
EOF
}

die() {
  echo "start-cluster.sh: $*" >&2
  exit 2
}

N_WORKERS=2
THREADS=1
MEMORY=auto
STATE_DIR="${DASKEM_HOME:-$HOME/.daskem}/cluster"
PORT=0
HOSTS=""
LISTEN=127.0.0.1
TLS=0
DASHBOARD=127.0.0.1:0
PYTHON=${PYTHON:-python}
# the dask command line; e.g. DASK="/path/to/python -m dask" for a given environment
read -r -a DASK <<<"${DASK:-dask}"

while [[ $# -gt 0 ]]; do
  opt=$1
  case $opt in
    -h | --help) usage; exit 0 ;;
    --tls) TLS=1; shift; continue ;;
    -n | --workers | -t | --threads | -m | --memory | -d | --state-dir | -l | --listen | -p | --port | -H | --hosts | --dashboard)
      [[ $# -ge 2 ]] || die "$opt needs a value (see --help)"
      val=$2
      shift 2 ;;
    --*=*) set -- "${opt%%=*}" "${opt#*=}" "${@:2}"; continue ;;
    *) die "unknown option $opt (see --help)" ;;
  esac
  case $opt in
    -n | --workers) N_WORKERS=$val ;;
    -t | --threads) THREADS=$val ;;
    -m | --memory) MEMORY=$val ;;
    -d | --state-dir) STATE_DIR=$val ;;
    -l | --listen) LISTEN=$val ;;
    -p | --port) PORT=$val ;;
    -H | --hosts) HOSTS=$val ;;
    --dashboard) DASHBOARD=$val ;;
  esac
done

[[ "$N_WORKERS" =~ ^[1-9][0-9]*$ ]] || die "--workers must be a positive integer, got '$N_WORKERS'"
[[ "$THREADS" =~ ^[1-9][0-9]*$ ]] || die "--threads must be a positive integer, got '$THREADS'"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "--port must be a port number, got '$PORT'"
[[ "$LISTEN" != *"://"* ]] || die "--listen takes an address without protocol, e.g. 10.0.0.5"
if [[ -n "$HOSTS" && ( "$LISTEN" == 127.* || "$LISTEN" == localhost ) ]]; then
  die "workers on other hosts cannot reach $LISTEN: pass --listen with this host's address (or 0.0.0.0)"
fi
if [[ -n "$HOSTS" || ! ( "$LISTEN" == 127.* || "$LISTEN" == localhost || "$LISTEN" == ::1 ) ]]; then
  TLS=1
fi

mkdir -p "$STATE_DIR"
STATE_DIR=$(cd "$STATE_DIR" && pwd)
SCHED_FILE="$STATE_DIR/scheduler.json"
SEC_FILE="$STATE_DIR/security.yaml"
if [[ -f "$STATE_DIR/scheduler.pid" ]] && kill -0 "$(cat "$STATE_DIR/scheduler.pid")" 2>/dev/null; then
  echo "a scheduler is already running (pid $(cat "$STATE_DIR/scheduler.pid")); stop it first:" \
    "$(dirname "$0")/stop-cluster.sh -d $STATE_DIR" >&2
  exit 1
fi
rm -f "$SCHED_FILE" "$SEC_FILE"

# --------------------------------------------------------------------------
# TLS: a CA of this cluster signs one certificate for the scheduler and workers
# and one for clients, then its key is deleted; created once in STATE_DIR/tls
# (mode 0700, private keys 0600) and reused on the next start
# --------------------------------------------------------------------------
tls_args=()
if [[ $TLS == 1 ]]; then
  command -v openssl >/dev/null || die "TLS needs the openssl command"
  TLS_DIR="$STATE_DIR/tls"
  if [[ ! -s "$TLS_DIR/ca.pem" || ! -s "$TLS_DIR/cluster.pem" || ! -s "$TLS_DIR/client.pem" ]]; then
    (
      umask 077
      mkdir -p "$TLS_DIR"
      cd "$TLS_DIR"
      key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
      key ca-key.pem
      openssl req -x509 -new -key ca-key.pem -out ca.pem -days 3650 -subj "/CN=daskem cluster CA $(hostname)" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
      for who in cluster client; do
        key "$who-key.pem"
        openssl req -new -key "$who-key.pem" -out "$who.csr" -subj "/CN=daskem-$who"
        printf '%s\n' "basicConstraints=critical,CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" \
          "extendedKeyUsage=serverAuth,clientAuth" "subjectKeyIdentifier=hash" "authorityKeyIdentifier=keyid" \
          "subjectAltName=DNS:localhost,IP:127.0.0.1" >"$who.ext"
        openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out "$who.pem" \
          -days 825 -extfile "$who.ext" 2>/dev/null
        rm -f "$who.csr" "$who.ext"
      done
      # nothing else is ever signed: without the CA's key nobody can make another certificate
      rm -f ca-key.pem ca.srl
      chmod 0600 ./*-key.pem
      chmod 0644 ca.pem cluster.pem client.pem
    ) || die "could not create the certificates in $TLS_DIR"
  fi
  tls_args=(--tls-ca-file "$TLS_DIR/ca.pem" --tls-cert "$TLS_DIR/cluster.pem" --tls-key "$TLS_DIR/cluster-key.pem")
  # the scheduler and the workers refuse unencrypted connections
  export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True
  yaml_str() { local q="'"; printf "'%s'" "${1//$q/$q$q}"; } # a YAML single-quoted string
  (
    umask 077
    cat >"$SEC_FILE" <<EOF
# Dask configuration of a client of the cluster in $STATE_DIR (written by start-cluster.sh).
# daskem finds it beside scheduler.json; for other Dask programs: DASK_CONFIG=$STATE_DIR
distributed:
  comm:
    require-encryption: true
    tls:
      ca-file: $(yaml_str "$TLS_DIR/ca.pem")
      client:
        cert: $(yaml_str "$TLS_DIR/client.pem")
        key: $(yaml_str "$TLS_DIR/client-key.pem")
EOF
  )
fi
PROTOCOL=tcp
[[ $TLS == 1 ]] && PROTOCOL=tls

nohup "${DASK[@]}" scheduler --scheduler-file "$SCHED_FILE" --host "$LISTEN" --port "$PORT" \
  --protocol "$PROTOCOL" --dashboard-address "$DASHBOARD" ${tls_args[@]+"${tls_args[@]}"} \
  >"$STATE_DIR/scheduler.log" 2>&1 &
echo $! >"$STATE_DIR/scheduler.pid"

for _ in $(seq 1 120); do
  [[ -s "$SCHED_FILE" ]] && break
  kill -0 "$(cat "$STATE_DIR/scheduler.pid")" 2>/dev/null || break
  sleep 0.5
done
if [[ ! -s "$SCHED_FILE" ]]; then
  echo "the scheduler did not start; see $STATE_DIR/scheduler.log" >&2
  exit 1
fi
ADDRESS=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['address'])" "$SCHED_FILE")

# distributed's statistical profiler slows daskem's chunk kernel by 8-15%
# (benchmarks/README.md); DASKEM_WORKER_PROFILE=1 keeps it
remote_env=""
[[ $TLS == 1 ]] && remote_env="DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True"
if [ "${DASKEM_WORKER_PROFILE:-0}" = "0" ]; then
  export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False
  remote_env="$remote_env DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"
fi
# workers' dashboards on their host's loopback only
worker_cmd=("${DASK[@]}" worker --scheduler-file "$SCHED_FILE" --nthreads "$THREADS" --memory-limit "$MEMORY"
  --local-directory "$STATE_DIR/worker-space" --dashboard-address 127.0.0.1:0 ${tls_args[@]+"${tls_args[@]}"})
: >"$STATE_DIR/workers.pid"
if [[ -z "$HOSTS" ]]; then
  for i in $(seq 1 "$N_WORKERS"); do
    nohup "${worker_cmd[@]}" --host "$LISTEN" --name "worker-$i" >"$STATE_DIR/worker-$i.log" 2>&1 &
    echo $! >>"$STATE_DIR/workers.pid"
  done
else
  quoted=$(printf '%q ' "${worker_cmd[@]}")
  for h in $HOSTS; do
    for i in $(seq 1 "$N_WORKERS"); do
      # the remote pid is recorded as host:pid; stop-cluster.sh stops it over ssh
      pid=$(ssh "$h" "cd $(printf %q "$STATE_DIR") && $remote_env nohup $quoted --name $h-$i \
        >$(printf %q "$STATE_DIR/worker-$h-$i.log") 2>&1 & echo \$!")
      echo "$h:$pid" >>"$STATE_DIR/workers.pid"
    done
  done
fi

# wait until every worker has joined (so a job started next sees all of them)
n_hosts=1
[[ -n "$HOSTS" ]] && n_hosts=$(wc -w <<<"$HOSTS")
"$PYTHON" - "$SCHED_FILE" "$((N_WORKERS * n_hosts))" "$TLS" "$SEC_FILE" <<'PY' ||
import sys

from distributed import Client, Security

sched_file, n, tls, sec_file = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", sys.argv[4]
security = None
if tls:
    import yaml

    t = yaml.safe_load(open(sec_file))["distributed"]["comm"]["tls"]
    security = Security(
        tls_ca_file=t["ca-file"], tls_client_cert=t["client"]["cert"], tls_client_key=t["client"]["key"],
        require_encryption=True,
    )
with Client(scheduler_file=sched_file, security=security, timeout="60s") as c:
    c.wait_for_workers(n, timeout=180)
PY
  {
    echo "workers did not join; see $STATE_DIR/worker-*.log (stop with $(dirname "$0")/stop-cluster.sh -d $STATE_DIR)" >&2
    exit 1
  }

echo "scheduler $ADDRESS"
echo "scheduler file $SCHED_FILE"
if [[ $TLS == 1 ]]; then
  echo "TLS: clients need $SEC_FILE (daskem finds it beside the scheduler file; other Dask programs:"
  echo "  DASK_CONFIG=$STATE_DIR); copy the state folder's tls/ only to people who may run code on this cluster"
fi
echo "stop with: $(dirname "$0")/stop-cluster.sh -d $STATE_DIR"
