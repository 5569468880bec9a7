#!/usr/bin/env bash
# A Ray head for one machine, to try the cluster path (`kdcache submit`, Ray jobs) on a
# workstation: every port on 127.0.0.1 only, Ray's token authentication on.
#
#   bash cluster/local_ray.sh start           # prints the addresses and the client settings
#   eval "$(bash cluster/local_ray.sh env)"   # RAY_API_SERVER_ADDRESS, RAY_AUTH_MODE and
#                                             # RAY_AUTH_TOKEN_PATH for kdcache / ray clients
#   kdcache submit build CONFIG               # or: ray job submit --working-dir . -- CMD
#   bash cluster/local_ray.sh status          # its processes and the sockets they listen on
#   bash cluster/local_ray.sh stop            # ends exactly what `start` started
#
# Settings (environment; `env`, `status` and `stop` find the head by RAY_PORT):
#   RAY                 the ray binary (.venv/bin/ray); jobs run `python` from its directory
#   RAY_PORT            GCS port (6379)
#   RAY_DASHBOARD_PORT  dashboard and Jobs API (8265)
#   RAY_AGENT_PORT      dashboard agent, to which the job server hands jobs (52365; pick
#                       another where someone else's Ray holds it)
#   RAY_NUM_CPUS        CPUs for the head (all)
#   RAY_TMP_DIR         the head's private directory: its token, and Ray's temp dir (sessions,
#                       logs, sockets) as its ray/ subdirectory (Ray makes its own directories
#                       world-writable; the private parent keeps other users out). Default: a
#                       fresh one, `mktemp -d /tmp/kdray-XXXXXX`, removed by `stop`. A given
#                       one must be a directory of yours that nobody else can write (made,
#                       mode 700, when missing, and then removed by `stop` too).
#   RAY_AUTH_MODE       token (default): clients need the head's token (`env` prints how);
#                       disabled: no authentication, refused unless bound to loopback
#   RAY_AUTH_TOKEN_PATH, RAY_AUTH_TOKEN
#                       your own token for the head; default a fresh random one written to
#                       RAY_TMP_DIR/auth_token (mode 600)
#   RAY_BIND            127.0.0.1 (default): GCS, raylet, object manager, dashboard, agents,
#                       client server, metrics and workers listen on loopback only. An
#                       address of this machine, or 0.0.0.0 for Ray's own defaults (its
#                       servers on all interfaces), exposes the head on purpose, for other
#                       machines to join or submit: only with RAY_AUTH_MODE=token, and
#                       behind your firewall (Ray's ports are not meant for the internet)
#   RAY_STATE_DIR       where `start` records what it started
#                       (${XDG_RUNTIME_DIR:-$HOME/.cache}/kdcache-ray, private to you)
#   RAY_STOP_GRACE_S    seconds `stop` waits after SIGTERM before SIGKILL (8)
#   RAY_START_ARGS      more `ray start` arguments, e.g. other ports: --ray-client-server-port
#                       (10001), --dashboard-agent-grpc-port, --metrics-export-port,
#                       --runtime-env-agent-port; the dashboard's and the autoscaler's metrics
#                       servers take DASHBOARD_METRIC_PORT (44227) and AUTOSCALER_METRIC_PORT
#                       (44217) from the environment
#
# How `stop` is exact: `start` runs `ray start` under a small keeper process, recorded (pid
# and start time) in RAY_STATE_DIR/head-$RAY_PORT.state. The keeper leads a new session and
# is the child subreaper of everything below it, so every process of the head stays its
# descendant: Ray's renamed ones (ray::DashboardAgent, ray::RuntimeEnvAgent, ray::IDLE),
# the client server, and job drivers, which Ray starts in sessions of their own. `stop`
# signals exactly those (TERM, then KILL after a grace period), then the keeper; it never
# matches command lines, so a process that merely names the same directory is left alone,
# and it never runs `ray stop`, which ends every Ray of the machine.
set -euo pipefail
cd "$(dirname "$0")/.."
RAY=${RAY:-.venv/bin/ray}
PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${RAY_DASHBOARD_PORT:-8265}
AGENT_PORT=${RAY_AGENT_PORT:-52365}
BIND=${RAY_BIND:-127.0.0.1}
die() { echo "local_ray.sh: error: $*" >&2; exit 1; }
if [[ -z ${RAY_STATE_DIR:-} && -z ${XDG_RUNTIME_DIR:-} && -z ${HOME:-} ]]; then
  die "set RAY_STATE_DIR: neither XDG_RUNTIME_DIR nor HOME is set"
fi
STATE_DIR=${RAY_STATE_DIR:-${XDG_RUNTIME_DIR:-${HOME:-}/.cache}/kdcache-ray}
STATE=$STATE_DIR/head-$PORT.state

RAY_BIN_DIR=$(cd "$(dirname "$RAY")" 2>/dev/null && pwd) || RAY_BIN_DIR=
PY=$RAY_BIN_DIR/python
[[ -x $PY ]] || PY=$(command -v python3) || die "no python next to $RAY nor on PATH"

# The process bookkeeping, in Python for clarity (/proc only, no third-party package).
HELPER=$(cat <<'PY'
import ctypes, os, signal, sys, time

def stat(pid):
    """(state, ppid, session, start time in ticks, uid) of a process, or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None
    f = text.rsplit(")", 1)[1].split()
    return f[0], int(f[1]), int(f[3]), int(f[19]), uid

def head(keeper, start):
    """{pid: stat} of the live processes of the head: the keeper's descendants and the
    members of its session (and theirs), owned by the keeper's user; the keeper excluded."""
    table = {int(p): s for p in os.listdir("/proc") if p.isdigit() and (s := stat(p))}
    k = table.get(keeper)
    if k is not None and k[3] != start:
        return {}  # the keeper's pid now names another process: the head is long gone
    uid = k[4] if k is not None else os.getuid()
    children = {}
    for pid, s in table.items():
        children.setdefault(s[1], []).append(pid)
    todo = [keeper] + [p for p, s in table.items() if s[2] == keeper]
    found = {}
    while todo:
        pid = todo.pop()
        if pid in found or pid not in table:
            continue
        found[pid] = table[pid]
        todo += children.get(pid, [])
    return {p: s for p, s in found.items() if p != keeper and s[0] not in "ZX" and s[4] == uid}

def alive(pid, start):
    s = stat(pid)
    return s is not None and s[3] == start and s[0] not in "ZX"

def keeper(rc_path, argv):
    """Lead a new session, adopt every orphan below, run `ray start`, record its exit
    code, then reap adopted processes until stopped."""
    try:
        os.setsid()
    except PermissionError:
        sys.exit("the keeper leads a process group already (job control on?): cannot setsid")
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    child = os.fork()
    if child == 0:
        try:
            os.execvp(argv[0], argv)
        except OSError as exc:
            print(f"cannot run {argv[0]}: {exc}", file=sys.stderr, flush=True)
        os._exit(127)
    _, status = os.waitpid(child, 0)
    with open(rc_path + ".tmp", "w") as f:
        f.write(str(os.waitstatus_to_exitcode(status)))
    os.replace(rc_path + ".tmp", rc_path)
    def reap():
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
    def last(signum, frame):  # `stop` ends the keeper last: reap what died, then go
        reap()
        os._exit(0)
    signal.signal(signal.SIGTERM, last)
    while True:
        reap()
        time.sleep(0.5)

def stop(keeper, start, grace_s):
    """TERM the head's processes, KILL what is left after grace_s, then end the keeper.
    Exit 0 when none is left."""
    seen, termed = {}, set()
    def left():
        for pid, s in head(keeper, start).items():
            seen[pid] = s[3]
        return {p for p, t in seen.items() if alive(p, t)}
    def send(pids, sig):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        deadline = time.monotonic() + wait_s
        while (pids := left()) and time.monotonic() < deadline:
            send(pids - termed if sig == signal.SIGTERM else pids, sig)
            termed |= pids
            time.sleep(0.25)
    if pids := left():
        print("could not stop:", " ".join(map(str, sorted(pids))), file=sys.stderr)
        return 1
    for sig in (signal.SIGTERM, signal.SIGKILL):  # last, so that it adopts to the end
        if alive(keeper, start):
            send([keeper], sig)
            deadline = time.monotonic() + 5.0
            while alive(keeper, start) and time.monotonic() < deadline:
                time.sleep(0.1)
    print(len(seen))
    return 1 if alive(keeper, start) else 0

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "keeper":
    keeper(args[0], args[1:])
elif cmd == "starttime":
    s = stat(int(args[0]))
    print(s[3] if s else "")
elif cmd == "alive":
    sys.exit(0 if alive(int(args[0]), int(args[1])) else 1)
elif cmd == "pids":
    for pid in sorted(head(int(args[0]), int(args[1]))):
        print(pid)
elif cmd == "stop":
    sys.exit(stop(int(args[0]), int(args[1]), float(args[2])))
PY
)
helper() { "$PY" -c "$HELPER" "$@"; }

private_dir() {  # a real directory of yours that nobody else can write
  local dir=$1 owner mode
  [[ ! -L $dir ]] || die "$dir is a symbolic link; expected a directory of your own"
  [[ -d $dir ]] || die "$dir is not a directory"
  read -r owner mode < <(stat -c '%u %a' "$dir")
  [[ $owner == "$(id -u)" ]] || die "$dir belongs to uid $owner, not to you ($(id -u)): \
another user could read or plant files there; use a directory of your own"
  (( (8#$mode & 8#022) == 0 )) || die "$dir is writable by group or others (mode $mode); \
chmod go-w it or use another directory"
}

read_state() {  # S_* from the state file (parsed, never sourced)
  S_KEEPER= S_KEEPER_START= S_TMP_DIR= S_TMP_CREATED=0 S_TOKEN_FILE= S_TOKEN_CREATED=0
  S_AUTH_MODE= S_HOST= S_DASHBOARD_PORT=
  [[ -f $STATE ]] || return 1
  private_dir "$STATE_DIR"  # what it records is acted on: it must be yours alone
  [[ -O $STATE && ! -L $STATE ]] || die "$STATE is not a file of yours; remove it"
  local key value
  while IFS='=' read -r key value; do
    case $key in
      keeper) S_KEEPER=$value ;; keeper_start) S_KEEPER_START=$value ;;
      tmp_dir) S_TMP_DIR=$value ;; tmp_created) S_TMP_CREATED=$value ;;
      token_file) S_TOKEN_FILE=$value ;; token_created) S_TOKEN_CREATED=$value ;;
      auth_mode) S_AUTH_MODE=$value ;; host) S_HOST=$value ;;
      dashboard_port) S_DASHBOARD_PORT=$value ;;
    esac
  done < "$STATE"
  [[ $S_KEEPER =~ ^[0-9]+$ && $S_KEEPER_START =~ ^[0-9]+$ ]] || die "$STATE is damaged; \
remove it once you are sure its head is gone"
}

running() {  # the recorded head still has its keeper or a process
  helper alive "$S_KEEPER" "$S_KEEPER_START" || [[ -n $(helper pids "$S_KEEPER" "$S_KEEPER_START") ]]
}

print_env() {
  printf 'export RAY_API_SERVER_ADDRESS=%q\n' "http://$S_HOST:$S_DASHBOARD_PORT"
  printf 'export RAY_AUTH_MODE=%q\n' "$S_AUTH_MODE"
  if [[ -n $S_TOKEN_FILE ]]; then
    printf 'export RAY_AUTH_TOKEN_PATH=%q\n' "$S_TOKEN_FILE"
  elif [[ $S_AUTH_MODE == token ]]; then
    echo "# and RAY_AUTH_TOKEN, the token the head was started with"
  fi
}

stop_head() {  # end the recorded head; remove what start made
  local count
  count=$(helper stop "$S_KEEPER" "$S_KEEPER_START" "${RAY_STOP_GRACE_S:-8}") \
    || die "could not stop every process of the Ray head on port $PORT; see above"
  if [[ $S_TOKEN_CREATED == 1 && -f $S_TOKEN_FILE ]]; then rm -f -- "$S_TOKEN_FILE"; fi
  if [[ $S_TMP_CREATED == 1 && -d $S_TMP_DIR && ! -L $S_TMP_DIR && -O $S_TMP_DIR ]]; then
    rm -rf -- "$S_TMP_DIR"
  fi
  rm -f -- "$STATE"
  echo "Ray head on port $PORT stopped ($count processes)"
}

case "${1:-}" in
  start)
    mkdir -p -m 700 "$STATE_DIR"
    private_dir "$STATE_DIR"
    if read_state; then
      if running; then
        die "a Ray head started by this script already runs on port $PORT (keeper \
$S_KEEPER, $S_TMP_DIR); stop it first: bash cluster/local_ray.sh stop"
      fi
      rm -f -- "$STATE"  # a head that is gone (a reboot, a kill)
    fi
    AUTH_MODE=${RAY_AUTH_MODE:-token}
    case $AUTH_MODE in token | disabled) ;;
      *) die "RAY_AUTH_MODE must be token or disabled, got '$AUTH_MODE'" ;;
    esac
    case $BIND in
      127.0.0.1 | localhost) BIND=127.0.0.1 HOST=127.0.0.1 ;;
      0.0.0.0) HOST=127.0.0.1 ;;
      *) HOST=$BIND ;;
    esac
    if [[ $BIND != 127.0.0.1 && $AUTH_MODE != token ]]; then
      die "RAY_BIND=$BIND exposes the head beyond this machine, and with RAY_AUTH_MODE=\
disabled anyone who reaches its ports runs code as you; keep RAY_AUTH_MODE=token (the default)"
    fi
    TMP_CREATED=0
    if [[ -n ${RAY_TMP_DIR:-} ]]; then
      TMP_DIR=${RAY_TMP_DIR%/}
      if [[ ! -e $TMP_DIR && ! -L $TMP_DIR ]]; then mkdir -m 700 -- "$TMP_DIR"; TMP_CREATED=1; fi
      private_dir "$TMP_DIR"
    else
      TMP_DIR=$(mktemp -d /tmp/kdray-XXXXXX)  # short: Ray's socket paths have a length limit
      TMP_CREATED=1
    fi
    TOKEN_FILE= TOKEN_CREATED=0
    if [[ $AUTH_MODE == token ]]; then
      if [[ -n ${RAY_AUTH_TOKEN:-} ]]; then
        :  # the caller's token, in the environment of every process of the head
      elif [[ -n ${RAY_AUTH_TOKEN_PATH:-} ]]; then
        [[ -r $RAY_AUTH_TOKEN_PATH ]] || die "RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is not readable"
        TOKEN_FILE=$RAY_AUTH_TOKEN_PATH
      else
        TOKEN_FILE=$TMP_DIR/auth_token
        (umask 077 && "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$TOKEN_FILE")
        TOKEN_CREATED=1
        export RAY_AUTH_TOKEN_PATH=$TOKEN_FILE
      fi
    fi
    export PATH="$RAY_BIN_DIR:$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=$AUTH_MODE
    args=(--head --port="$PORT" --include-dashboard=true --dashboard-port="$DASHBOARD_PORT"
      --dashboard-agent-listen-port="$AGENT_PORT" --temp-dir="$TMP_DIR/ray" --disable-usage-stats)
    if [[ $BIND == 127.0.0.1 ]]; then
      # `ray start` replaces a loopback --node-ip-address by the machine's address (and its
      # servers then listen there and on all interfaces), except in Ray's single-machine
      # mode, the one it uses on macOS and Windows: that mode keeps every server on loopback.
      export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
      args+=(--node-ip-address=127.0.0.1 --dashboard-host=127.0.0.1)
    elif [[ $BIND == 0.0.0.0 ]]; then
      args+=(--dashboard-host=0.0.0.0)
    else
      args+=(--node-ip-address="$BIND" --dashboard-host="$BIND")
    fi
    if [[ -n "${RAY_NUM_CPUS:-}" ]]; then args+=(--num-cpus="$RAY_NUM_CPUS"); fi
    # shellcheck disable=SC2206  # split on purpose: a list of arguments
    if [[ -n "${RAY_START_ARGS:-}" ]]; then args+=($RAY_START_ARGS); fi
    LOG=$TMP_DIR/ray-start.log RC=$TMP_DIR/ray-start.rc
    rm -f -- "$RC"
    # (python itself in the background, not a function: $! must be the keeper)
    "$PY" -c "$HELPER" keeper "$RC" "$RAY" start "${args[@]}" </dev/null >>"$LOG" 2>&1 &
    KEEPER=$!
    KEEPER_START=$(helper starttime "$KEEPER")
    [[ -n $KEEPER_START ]] || die "the keeper of ray start exited at once; see $LOG"
    umask 077
    cat > "$STATE.tmp" <<EOF
keeper=$KEEPER
keeper_start=$KEEPER_START
tmp_dir=$TMP_DIR
tmp_created=$TMP_CREATED
token_file=$TOKEN_FILE
token_created=$TOKEN_CREATED
auth_mode=$AUTH_MODE
host=$HOST
dashboard_port=$DASHBOARD_PORT
EOF
    mv -f -- "$STATE.tmp" "$STATE"
    read_state
    for _ in $(seq 480); do  # `ray start` itself: up to 4 minutes on a loaded machine
      [[ -e $RC ]] && break
      helper alive "$KEEPER" "$KEEPER_START" || break
      sleep 0.5
    done
    rc=$(cat "$RC" 2>/dev/null || echo "unknown")
    if [[ $rc != 0 ]]; then
      echo "local_ray.sh: error: ray start failed (exit $rc); its output ($LOG):" >&2
      tail -n 25 "$LOG" >&2 || true
      stop_head >&2 || true
      exit 1
    fi
    # The job server answers a little after `ray start` returns; wait for it (60 s).
    for _ in $(seq 60); do
      # Any HTTP answer counts (401 too: Ray's token authentication is on).
      if "$PY" -c "import sys, urllib.error, urllib.request as u
try: u.urlopen(sys.argv[1], timeout=2)
except urllib.error.HTTPError: pass" "http://$HOST:$DASHBOARD_PORT/api/version" 2>/dev/null
      then
        echo "Ray head running on $HOST:$PORT (listening on $BIND; temp dir $TMP_DIR)"
        echo "  jobs:    kdcache submit build CONFIG --address http://$HOST:$DASHBOARD_PORT"
        echo "  drivers: --address $HOST:$PORT  (or export RAY_ADDRESS=$HOST:$PORT)"
        if [[ $AUTH_MODE == token ]]; then
          echo "  token authentication is on; clients (kdcache submit, ray job ...) need:"
          print_env | sed 's/^/    /'
          echo "  or: eval \"\$(bash cluster/local_ray.sh env)\"  (same RAY_PORT)"
        fi
        exit 0
      fi
      sleep 1
    done
    echo "local_ray.sh: error: Ray started but its job server on $HOST:$DASHBOARD_PORT did \
not answer; stopping it (logs: $TMP_DIR/ray/session_latest/logs)" >&2
    stop_head >&2 || true
    exit 1
    ;;
  env)
    read_state || die "no Ray head recorded for port $PORT ($STATE); start one first"
    print_env
    ;;
  status)
    read_state || { echo "no Ray head recorded for port $PORT ($STATE)"; exit 1; }
    running || { echo "the Ray head on port $PORT is gone (keeper $S_KEEPER)"; exit 1; }
    pids=$(helper pids "$S_KEEPER" "$S_KEEPER_START" | paste -sd' ')
    echo "Ray head on port $PORT: keeper $S_KEEPER, temp dir $S_TMP_DIR, auth $S_AUTH_MODE"
    echo "processes: $pids"
    echo "listening:"
    ss -Hltunp 2>/dev/null | grep -E "pid=($(echo "$pids" | tr ' ' '|')),"  || true
    ;;
  stop)
    if ! read_state; then echo "no Ray head recorded for port $PORT ($STATE)"; exit 0; fi
    stop_head
    ;;
  *)
    echo "usage: $0 start|env|status|stop" >&2
    exit 2
    ;;
esac
