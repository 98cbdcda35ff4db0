#!/usr/bin/env bash
# A local 2-node Ray cluster on this machine (head + one more node), for trying
# `ray job submit` and `serve deploy` the way they run on a real cluster.
#   bash scripts/cluster.sh up     start it (dashboard/jobs on http://127.0.0.1:8265)
#   bash scripts/cluster.sh down   stop it: only this cluster's processes, not other Rays
# Ray 2.60 clusters started with `ray start` use token authentication (token in
# ~/.ray/auth_token); every client needs RAY_AUTH_MODE=token in its environment.
# Ports and the session directory can be moved (the tests run a second cluster this way):
#   CFGD_RAY_PORT (6379), CFGD_DASHBOARD_PORT (8265), CFGD_RAY_DIR (/tmp/cfgd-ray)
set -euo pipefail
cd "$(dirname "$0")/.."
PORT="${CFGD_RAY_PORT:-6379}"
DASHBOARD_PORT="${CFGD_DASHBOARD_PORT:-8265}"
RAY_DIR="${CFGD_RAY_DIR:-/tmp/cfgd-ray}"
for port in "$PORT" "$DASHBOARD_PORT"; do
  case "$port" in ''|*[!0-9]*) echo "CFGD_RAY_PORT and CFGD_DASHBOARD_PORT must be port numbers, got '$port'" >&2; exit 2 ;; esac
done
# Absolute: `down` finds this cluster's processes by it on their command lines.
case "$RAY_DIR" in /?*) ;; *) echo "CFGD_RAY_DIR must be an absolute path, got '$RAY_DIR'" >&2; exit 2 ;; esac
# Job entrypoints (`-- python jobs/train.py ...`) run in a shell the nodes start with
# their own PATH: the checkout's virtualenv first, so `python` is the one with cfgd.
export PATH="$PWD/.venv/bin:$PATH"
export RAY_AUTH_MODE=token RAY_DISABLE_USAGE_STATS=1

# Pids of this cluster's processes and all their descendants: every Ray process of a
# node names the session directory or the head's GCS address (--address=, --gcs-address=)
# on its command line. The values reach awk through its environment, so that awk's own
# command line names neither.
own_pids() {
  ps -eo pid=,ppid=,args= | CFGD_DIR="$RAY_DIR/" CFGD_PORT="$PORT" awk '
    BEGIN { addr = "--[a-z_-]*address=[0-9.]+:" ENVIRON["CFGD_PORT"] "([^0-9]|$)" }
    { pid[NR] = $1; parent[$1] = $2
      if (index($0, ENVIRON["CFGD_DIR"]) > 0 || $0 ~ addr) own[$1] = 1 }
    END { do { grown = 0
               for (i in pid) if (!(pid[i] in own) && (parent[pid[i]] in own)) { own[pid[i]] = 1; grown = 1 }
             } while (grown)
          for (p in own) if (p > 1) print p }'
}

# The pids among "$@" still running (zombies count as gone: this machine's init may be
# slow to reap the processes it inherits).
running() {
  ps -o pid=,stat= -p "$(echo "$@" | tr ' ' ,)" | awk '$2 !~ /^Z/ { print $1 }' || true
}

down() {
  local pids alive
  pids=$(own_pids)
  if [ -z "$pids" ]; then echo "no cluster with session directory $RAY_DIR is running"; return; fi
  kill -TERM $pids 2>/dev/null || true
  # GCS server and autoscaler monitor can outwait a SIGTERM for long: 5 s, then SIGKILL.
  for _ in $(seq 10); do
    alive=$(running $pids)
    [ -z "$alive" ] && break
    sleep 0.5
  done
  [ -n "$alive" ] && kill -KILL $alive 2>/dev/null || true
  echo "cluster down: $(echo $pids | wc -w) processes stopped"
}

up() {
  # --dashboard-agent-listen-port=0: each node's agent on a free port (two nodes, or another
  # Ray, on one machine would race for the default 52365; the loser serves no jobs).
  ray start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=2 \
    --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" --dashboard-agent-listen-port=0 \
    --object-store-memory=1000000000 --temp-dir="$RAY_DIR" --disable-usage-stats
  # Its own session directory: a node sharing the head's would run a second log monitor
  # over the same worker logs, and the driver would print every worker line twice.
  ray start --address="127.0.0.1:$PORT" --node-ip-address=127.0.0.1 --num-cpus=1 \
    --resources='{"node2": 1}' --dashboard-agent-listen-port=0 \
    --object-store-memory=500000000 --temp-dir="$RAY_DIR/node2" --disable-usage-stats
  echo "cluster up: http://127.0.0.1:$DASHBOARD_PORT. In every client shell: export RAY_AUTH_MODE=token"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
