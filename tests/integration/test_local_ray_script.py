"""``cluster/local_ray.sh`` as a user runs it: the head listens on 127.0.0.1 only, Ray's
token authentication is on (a job submitted without the token is refused, one with the
settings ``env`` prints runs), and ``stop`` ends exactly what ``start`` started, job
drivers and Ray's renamed processes included, while a process that merely names the same
directory keeps running; afterwards no process it started runs and no port it opened
listens. Free ports and a private state directory, so that other Rays on the machine
(another engineer's tests) are left alone."""

from __future__ import annotations

import contextlib
import os
import shlex
import socket
import stat
import subprocess
import sys
import time

import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray.job_submission")
pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "cluster", "local_ray.sh")
RAY = os.path.join(os.path.dirname(sys.executable), "ray")
LOOPBACK = {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
#: What the caller's environment must not decide for the script (conftest.py disables
#: Ray's authentication for the other tests; here the script's default is under test).
UNSET = (
    "RAY_AUTH_MODE",
    "RAY_AUTH_TOKEN",
    "RAY_AUTH_TOKEN_PATH",
    "RAY_ADDRESS",
    "RAY_API_SERVER_ADDRESS",
    "RAY_TMP_DIR",
    "RAY_BIND",
    "RAY_START_ARGS",
)


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _env(state_dir: str, **extra: str) -> dict[str, str]:
    """The script's environment: non-default ports for every server Ray opens."""
    gcs, dash, agent, grpc, metrics, client, runtime, dash_m, auto_m = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(
        RAY=RAY,
        RAY_PORT=str(gcs),
        RAY_DASHBOARD_PORT=str(dash),
        RAY_AGENT_PORT=str(agent),
        RAY_NUM_CPUS="1",
        RAY_STATE_DIR=state_dir,
        DASHBOARD_METRIC_PORT=str(dash_m),
        AUTOSCALER_METRIC_PORT=str(auto_m),
        RAY_START_ARGS=f"--dashboard-agent-grpc-port={grpc} --metrics-export-port={metrics} "
        f"--ray-client-server-port={client} --runtime-env-agent-port={runtime}",
    )
    env.update(extra)
    return env


def _script(command: str, env: dict[str, str], timeout: float = 300):
    return subprocess.run(
        ["bash", SCRIPT, command], env=env, capture_output=True, text=True, timeout=timeout
    )


def _state(env: dict[str, str]) -> dict[str, str]:
    path = os.path.join(env["RAY_STATE_DIR"], f"head-{env['RAY_PORT']}.state")
    with open(path) as f:
        return dict(line.strip().split("=", 1) for line in f if "=" in line)


def _started(keeper: int) -> dict[int, float]:
    """{pid: create time} of the keeper and every process below it (by parent links)."""
    root = psutil.Process(keeper)
    out = {keeper: root.create_time()}
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            out[child.pid] = child.create_time()
    return out


def _running(procs: dict[int, float]) -> dict[int, str]:
    """Those of ``procs`` that still run (same pid and create time, not a zombie)."""
    out = {}
    for pid, created in procs.items():
        with contextlib.suppress(psutil.NoSuchProcess):
            p = psutil.Process(pid)
            if p.create_time() == created and p.status() != psutil.STATUS_ZOMBIE:
                out[pid] = " ".join(p.cmdline())[:120]
    return out


def _sockets(pids) -> list[tuple[int, str, int, str]]:
    """(pid, ip, port, kind) of every listening TCP socket and bound UDP socket of pids."""
    out = []
    for c in psutil.net_connections(kind="inet"):
        if (
            c.pid in pids
            and c.laddr
            and (c.status == psutil.CONN_LISTEN or c.type == socket.SOCK_DGRAM)
        ):
            out.append(
                (c.pid, c.laddr.ip, c.laddr.port, "tcp" if c.type == socket.SOCK_STREAM else "udp")
            )
    return out


def _ss_listening(pids) -> list[str]:
    """``ss -ltunp`` lines of pids: the same check by another tool."""
    text = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True).stdout
    return [line for line in text.splitlines() if any(f"pid={p}," in line for p in pids)]


def _start(tmp_path, **extra):
    """Start a head; on a failure (a concurrent Ray took a port), retry on new ports."""
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700, exist_ok=True)
    failures = []
    for _ in range(3):
        env = _env(str(state_dir), **extra)
        started = _script("start", env)
        if started.returncode == 0:
            return env, started
        failures.append(started.stdout + started.stderr)
        _script("stop", env)  # whatever it left (it stops itself on a failure too)
        time.sleep(5)
    raise AssertionError("\n---\n".join(failures))


def _job(env: dict[str, str], *argv: str, token: bool, timeout: float = 180):
    client = {k: v for k, v in env.items() if k not in UNSET}
    if token:  # what `eval "$(bash cluster/local_ray.sh env)"` sets
        for line in _script("env", env).stdout.splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            client[key] = shlex.split(value)[0]
    else:
        client["RAY_AUTH_MODE"] = "disabled"
        client["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
    return subprocess.run(
        [RAY, "job", "submit", *argv],
        env=client,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )


def test_head_on_loopback_with_token_auth_and_an_exact_stop(tmp_path):
    env, started = _start(tmp_path)
    state = _state(env)
    keeper, tmp_dir = int(state["keeper"]), state["tmp_dir"]
    decoy = None
    procs: dict[int, float] = {}
    try:
        assert "token authentication is on" in started.stdout, started.stdout
        # its own fresh temp dir, made by mktemp, private; the token readable by us alone
        info = os.stat(tmp_dir)
        assert os.path.basename(tmp_dir).startswith("kdray-") and info.st_uid == os.getuid()
        assert stat.S_IMODE(info.st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state["token_file"]).st_mode) == 0o600
        again = _script("start", env)  # a second head on the same port is refused
        assert again.returncode == 1 and "already runs" in again.stderr

        # a job without the token is refused; with the settings of `env` it runs, and its
        # driver (ray.init inside the job) reaches the cluster with the token too
        denied = _job(env, "--", "python", "-c", "print('kdcache-nope')", token=False)
        assert denied.returncode != 0 and "kdcache-nope" not in denied.stdout
        assert "Authentication" in denied.stdout + denied.stderr
        # kdcache's own client says what to set
        url = f"http://127.0.0.1:{env['RAY_DASHBOARD_PORT']}"
        plain = {k: v for k, v in env.items() if k not in UNSET}
        status = subprocess.run(
            [sys.executable, "-m", "kdcache.cli", "status", "kdcache-none", "--address", url],
            env=plain,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert status.returncode == 2 and "asks for its authentication token" in status.stderr
        assert "cluster/local_ray.sh env" in status.stderr
        code = "import ray; ray.init(); print('kdcache-ok', ray.cluster_resources()['CPU'])"
        ok = _job(env, "--", "python", "-c", code, token=True)
        assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
        assert "kdcache-ok 1.0" in ok.stdout
        # a job still running at `stop`, whose driver starts a process in a session of its
        # own (as Ray starts drivers): stop must end it too
        marker = f"kdcache-long-{os.getpid()}"
        long_code = (
            "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
            f"'import time; time.sleep(600)', '{marker}'], start_new_session=True); "
            "time.sleep(600)"
        )
        submitted = _job(env, "--no-wait", "--", "python", "-c", long_code, token=True)
        assert submitted.returncode == 0, submitted.stderr[-3000:]
        deadline = time.monotonic() + 120
        while not any(marker in c for c in _running(_started(keeper)).values()):
            assert time.monotonic() < deadline, "the long job's process did not start"
            time.sleep(1)

        procs = _started(keeper)
        names = " ".join(_running(procs).values())
        for name in (
            "gcs_server",
            "raylet",
            "ray::DashboardAgent",
            "ray::RuntimeEnvAgent",
            "ray.util.client.server",
            "dashboard.py",
            marker,
        ):
            assert name in names, (name, names)
        # every socket of every process it started is on loopback, by psutil and by ss
        sockets = _sockets(set(procs))
        assert sockets and all(ip in LOOPBACK for _, ip, _, _ in sockets), sockets
        listening = {port for _, _, port, kind in sockets if kind == "tcp"}
        expected = {int(env[k]) for k in ("RAY_PORT", "RAY_DASHBOARD_PORT", "RAY_AGENT_PORT")}
        assert expected <= listening, (expected, listening)
        lines = _ss_listening(set(procs))
        assert len(lines) >= len(listening)
        for line in lines:
            local = line.split()[4]
            assert local.rsplit(":", 1)[0].strip("[]") in LOOPBACK, line

        # a process that merely names the head's directory is not the head's
        decoy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", tmp_dir])
        stopped = _script("stop", env, timeout=120)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert "stopped" in stopped.stdout
        left = _running(procs)
        assert not left, f"local_ray.sh stop left processes it started running: {left}"
        still = {
            c.laddr.port
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port in listening
        }
        assert not still, f"ports it opened still listen: {sorted(still)}"
        assert decoy.poll() is None  # alive
        assert not os.path.exists(tmp_dir)  # the temp dir it made is gone, token with it
        assert _script("stop", env).stdout.startswith("no Ray head recorded")
    finally:
        if decoy is not None:
            decoy.kill()
            decoy.wait()
        _script("stop", env, timeout=120)
        for pid in _running(procs):  # only when the script failed: exactly what it started
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_unsafe_settings_are_refused_before_anything_starts(tmp_path):
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    env = _env(str(state_dir))
    exposed = _script("start", {**env, "RAY_BIND": "0.0.0.0", "RAY_AUTH_MODE": "disabled"})
    assert exposed.returncode == 1 and "keep RAY_AUTH_MODE=token" in exposed.stderr
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # a directory another user could plant files in
    refused = _script("start", {**env, "RAY_TMP_DIR": str(shared)})
    assert refused.returncode == 1 and "writable by group or others" in refused.stderr
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere")
    refused = _script("start", {**env, "RAY_TMP_DIR": str(link)})
    assert refused.returncode == 1 and "symbolic link" in refused.stderr
    assert not list(state_dir.iterdir())  # nothing started, nothing recorded
    nothing = _script("stop", env)
    assert nothing.returncode == 0 and "no Ray head recorded" in nothing.stdout
