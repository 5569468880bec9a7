#!/usr/bin/env bash
# Start or stop a Ray head on 127.0.0.1, to try the cluster path on one machine.
#
#   bash cluster/local_ray.sh start     # prints the addresses to use
#   bash cluster/local_ray.sh stop
#
# The head runs the dashboard, which serves the Ray Jobs API that `kdcache submit` talks
# to (http://127.0.0.1:8265). Jobs run `python` from the head's PATH, so the virtual
# environment's bin/ is put first. Environment: RAY (the ray binary, default
# .venv/bin/ray), RAY_PORT (GCS, 6379), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all),
# RAY_AGENT_PORT (the dashboard agent, 52365: the job server hands jobs to it; pick
# another on a machine where someone else's Ray holds it), RAY_AUTH_MODE (disabled),
# RAY_TMP_DIR (/tmp/kdcache-ray-$USER-$RAY_PORT: the head's
# private temp dir; `stop` ends only the processes that name it, not other Rays),
# RAY_START_ARGS (more `ray start` arguments, e.g. other ports).
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
AGENT_PORT=${RAY_AGENT_PORT:-52365}
TMP_DIR=${RAY_TMP_DIR:-/tmp/kdcache-ray-${USER:-$(id -un)}-$PORT}
head_pids() {  # processes of this head: their command lines name its temp dir
  # (exactly that directory, not a longer name: followed by "/", a NUL or the end; its
  # last character in brackets, so that grep's own command line does not match)
  local dir="${TMP_DIR%/}"
  grep -laP -- "\\Q${dir%?}\\E[${dir: -1}](?:/|\\x00|$)" /proc/[0-9]*/cmdline 2>/dev/null \
    | cut -d/ -f3 || true
}
case "${1:-}" in
  start)
    RAY_BIN_DIR=$(cd "$(dirname "$RAY")" && pwd)
    export PATH="$RAY_BIN_DIR:$PATH"
    export RAY_USAGE_STATS_ENABLED=0
    # A head for one machine, its dashboard on 127.0.0.1 only: Ray's token authentication
    # is off unless RAY_AUTH_MODE=token is set (then clients need RAY_AUTH_MODE=token too).
    export RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled}
    extra=()
    if [[ -n "${RAY_NUM_CPUS:-}" ]]; then extra+=(--num-cpus="$RAY_NUM_CPUS"); fi
    # shellcheck disable=SC2206  # split on purpose: a list of arguments
    if [[ -n "${RAY_START_ARGS:-}" ]]; then extra+=($RAY_START_ARGS); fi
    "$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" \
      --include-dashboard=true --dashboard-host=127.0.0.1 --dashboard-port="$DASHBOARD_PORT" \
      --dashboard-agent-listen-port="$AGENT_PORT" \
      --temp-dir="$TMP_DIR" --disable-usage-stats "${extra[@]}" >/dev/null
    # The job server answers a little after `ray start` returns; wait for it (60 s).
    for _ in $(seq 60); do
      # Any HTTP answer counts (401 too: Ray's token authentication may be on).
      if "$RAY_BIN_DIR/python" -c "import sys, urllib.error, urllib.request as u
try: u.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError: pass" "http://127.0.0.1:$DASHBOARD_PORT/api/version" \
        2>/dev/null; then
        echo "Ray head running on 127.0.0.1:$PORT"
        echo "  jobs:    kdcache submit build CONFIG --address http://127.0.0.1:$DASHBOARD_PORT"
        echo "  drivers: --address 127.0.0.1:$PORT  (or export RAY_ADDRESS=127.0.0.1:$PORT)"
        exit 0
      fi
      sleep 1
    done
    echo "Ray started but its job server on 127.0.0.1:$DASHBOARD_PORT did not answer" >&2
    exit 1
    ;;
  stop)
    # Not `ray stop`, which ends every Ray on the machine. Workers exit with their raylet.
    pids=$(head_pids)
    if [[ -z "$pids" ]]; then echo "no Ray head with temp dir $TMP_DIR"; exit 0; fi
    kill $pids 2>/dev/null || true
    for _ in $(seq 20); do
      pids=$(head_pids)
      [[ -z "$pids" ]] && break
      sleep 0.5
    done
    # Stragglers (and workers spawned while the head shut down): kill -9 until none is
    # left, bounded, so that when this returns no process of this head runs.
    for _ in $(seq 20); do
      [[ -z "$pids" ]] && break
      kill -9 $pids 2>/dev/null || true
      sleep 0.25
      pids=$(head_pids)
    done
    if [[ -n "$pids" ]]; then echo "could not stop Ray processes: $pids" >&2; exit 1; fi
    echo "Ray head ($TMP_DIR) stopped"
    ;;
  *)
    echo "usage: $0 start|stop" >&2
    exit 2
    ;;
esac
