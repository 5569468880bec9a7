#!/usr/bin/env bash
# Start or stop a Ray head on 127.0.0.1, to try the cluster path on one machine.
#
#   bash cluster/local_ray.sh start     # prints the address to pass as --address / RAY_ADDRESS
#   bash cluster/local_ray.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_PORT:-6379}
case "${1:-}" in
  start)
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --include-dashboard=false \
      --disable-usage-stats >/dev/null
    echo "Ray head running; use: --address 127.0.0.1:$PORT  (or export RAY_ADDRESS=127.0.0.1:$PORT)"
    ;;
  stop)
    "$RAY" stop --force >/dev/null
    echo "Ray stopped"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
