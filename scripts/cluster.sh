#!/usr/bin/env bash
# A local 2-node Ray cluster on this machine (head + one more node), for trying
# `ray job submit` and `serve deploy` the way they run on a real cluster.
#   bash scripts/cluster.sh up     start it (dashboard/jobs on http://127.0.0.1:8265)
#   bash scripts/cluster.sh down   stop it (`ray stop`: every Ray process on this machine)
# Ray 2.60 clusters started with `ray start` use token authentication (token in
# ~/.ray/auth_token); every client needs RAY_AUTH_MODE=token in its environment.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=.venv/bin/ray
export RAY_AUTH_MODE=token RAY_DISABLE_USAGE_STATS=1
case "${1:-}" in
  up)
    $RAY start --head --node-ip-address=127.0.0.1 --port=6379 --num-cpus=2 \
      --dashboard-host=127.0.0.1 --dashboard-port=8265 --object-store-memory=1000000000 \
      --temp-dir=/tmp/cfgd-ray --disable-usage-stats
    $RAY start --address=127.0.0.1:6379 --node-ip-address=127.0.0.1 --num-cpus=1 \
      --resources='{"node2": 1}' --object-store-memory=500000000 --disable-usage-stats
    echo "cluster up. In every client shell: export RAY_AUTH_MODE=token"
    ;;
  down) $RAY stop ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
