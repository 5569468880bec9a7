"""``kdcache submit`` against a real Ray head that ``cluster/local_ray.sh`` starts here
(dashboard and job server on 127.0.0.1): the teacher stage as a job, a resubmission that
is a cache hit, the student stage from that cache, and a failing job whose error reaches
the submitter; a native ``ray job submit --working-dir DIR -- kdcache build CONFIG``; the
README's ``kdcache submit train train.yaml --workers 2`` as typed; and ``ray job stop`` on
a submitted job, whose visible entrypoint names its config file."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest
import torch
import yaml

import kdcache
from kdcache.stores.admin import verify
from kdcache.testing import linear_teacher

pytest.importorskip("ray.job_submission")
pytestmark = pytest.mark.integration

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOCAL_RAY = os.path.join(REPO, "cluster", "local_ray.sh")
NUM_RECORDS, NUM_SHARDS, TEMPERATURE = 96, 3, 2.0
DATASET = {
    "factory": "kdcache.testing:toy_dataset",
    "kwargs": {"num_records": NUM_RECORDS, "num_shards": NUM_SHARDS},
}
LINEAR = {"in_features": 8, "out_features": 5}


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


def _named(marker: str) -> set[int]:
    """Live processes whose command line names ``marker``."""
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            with open(f"/proc/{entry}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    pids.add(int(entry))
    return pids


@pytest.fixture(scope="module")
def head():
    """A Ray head on 127.0.0.1, started and stopped by ``cluster/local_ray.sh`` (which is
    what users run), on free ports and a private temp dir so that concurrent heads on the
    machine are left alone. Stopped after the tests, even on failure."""
    gcs, dashboard, agent, agent_grpc, metrics, client, runtime_env = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="kdray-", dir="/tmp")  # short: Ray's socket paths
    env = dict(
        os.environ,
        RAY=os.path.join(os.path.dirname(sys.executable), "ray"),
        RAY_PORT=str(gcs),
        RAY_DASHBOARD_PORT=str(dashboard),
        RAY_AGENT_PORT=str(agent),
        RAY_NUM_CPUS="2",
        RAY_TMP_DIR=temp_dir,
        RAY_AUTH_MODE="disabled",
        RAY_START_ARGS=f"--dashboard-agent-grpc-port={agent_grpc} "
        f"--metrics-export-port={metrics} --ray-client-server-port={client} "
        f"--runtime-env-agent-port={runtime_env}",
    )
    try:
        started = subprocess.run(
            ["bash", LOCAL_RAY, "start"], env=env, capture_output=True, text=True, timeout=240
        )
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"http://127.0.0.1:{dashboard}" in started.stdout  # tells users the address
        yield f"http://127.0.0.1:{dashboard}"
    finally:
        stopped = subprocess.run(
            ["bash", LOCAL_RAY, "stop"], env=env, capture_output=True, text=True, timeout=120
        )
        left = _named(temp_dir)
        for pid in left:  # only if the script failed: end exactly this head's processes
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert stopped.returncode == 0, stopped.stdout + stopped.stderr
        assert not left, f"local_ray.sh stop left Ray processes running: {sorted(left)}"


def _kdcache(*args: str, timeout: float = 240, cwd: str = REPO) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "kdcache.cli", *args], timeout=timeout, cwd=cwd)


def _run(argv: list[str], *, timeout: float = 240, cwd: str = REPO) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        argv,
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _job_id(stderr: str) -> str:
    for word in stderr.split():
        if word.startswith("kdcache-"):
            return word.rstrip(":")
    raise AssertionError(f"no job id in:\n{stderr}")


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("submit")
    paths = {}
    for s in range(2):
        paths[f"t{s}"] = str(tmp / f"teacher-{s}.pt")
        torch.save(linear_teacher(seed=s).module.state_dict(), paths[f"t{s}"])
    root = str(tmp / "cache")
    build = {
        "root": root,
        "alias": "toy-ensemble",
        "dataset": DATASET,
        "teachers": [
            {
                "name": f"linear-{s}",
                "factory": "torch.nn:Linear",
                "kwargs": LINEAR,
                "checkpoint": paths[f"t{s}"],
            }
            for s in range(2)
        ],
        "targets": {"temperature": TEMPERATURE},
        "executor": {"kind": "ray", "num_actors": 1, "batch_size": 32},
    }
    paths["build"] = str(tmp / "build.yaml")
    with open(paths["build"], "w") as f:
        yaml.safe_dump(build, f)
    bad = json.loads(json.dumps(build))
    bad["teachers"][0]["checkpoint"] = str(tmp / "missing-teacher.pt")
    paths["bad"] = str(tmp / "bad.yaml")
    with open(paths["bad"], "w") as f:
        yaml.safe_dump(bad, f)
    train = {
        "output_dir": str(tmp / "student"),
        "student": {"factory": "torch.nn:Linear", "kwargs": LINEAR},
        "cache": {"uri": "toy-ensemble", "root": root},
        "dataset": DATASET,
        "loss": {"alpha": 0.9},
        "stream": {"global_batch_size": 16},
        "max_steps": 4,
        "tensorboard": False,
        "deepspeed": {
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "torch_adam": True}},
            "steps_per_print": 10**9,
        },
    }
    paths["train"] = str(tmp / "train.yaml")
    with open(paths["train"], "w") as f:
        yaml.safe_dump(train, f)
    paths["root"] = root
    paths["output_dir"] = train["output_dir"]
    return paths


@pytest.fixture(scope="module")
def built(head, configs):
    """The teacher stage, submitted once as a Ray job."""
    result = _kdcache("submit", "build", configs["build"], "--address", head)
    return result


def test_teacher_stage_job_builds_the_cache(built, configs):
    assert built.returncode == 0, built.stderr[-3000:]
    assert "SUCCEEDED" in built.stderr
    assert "Running entrypoint for job kdcache-build-" in built.stdout  # logs streamed
    (summary,) = _json_lines(built.stdout)
    assert summary["hit"] is False and summary["computed"] == 2 * NUM_SHARDS
    cache = kdcache.open_cache("toy-ensemble", root=configs["root"])
    assert cache.key == summary["key"]
    result = verify(cache)
    assert result.ok, result.problems
    assert result.checked_rows == 2 * NUM_RECORDS


def test_submitting_the_teacher_stage_again_is_a_cache_hit(built, head, configs):
    assert built.returncode == 0
    again = _kdcache("submit", "build", configs["build"], "--address", head)
    assert again.returncode == 0, again.stderr[-3000:]
    (summary,) = _json_lines(again.stdout)
    (first,) = _json_lines(built.stdout)
    assert summary["hit"] is True and summary["computed"] == 0
    assert summary["key"] == first["key"]
    assert "teacher stage skipped" in again.stdout


def test_student_stage_job_trains_from_the_cache(built, head, configs):
    assert built.returncode == 0
    result = _kdcache("submit", "train", configs["train"], "--address", head)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summaries = [s for s in _json_lines(result.stdout) if "steps" in s]
    assert summaries, result.stdout[-3000:]
    assert summaries[-1]["steps"] == 4
    (first,) = _json_lines(built.stdout)
    assert first["key"] in json.dumps(summaries[-1])  # trained from that cache
    assert os.path.exists(os.path.join(configs["output_dir"], "student.safetensors"))


def test_status_and_logs_follow_a_finished_job(built, head):
    job = _job_id(built.stderr)
    status = _kdcache("status", job, "--address", head, timeout=60)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["status"] == "SUCCEEDED"
    logs = _kdcache("logs", job, "--address", head, timeout=60)
    assert logs.returncode == 0 and "teacher stage done" in logs.stdout
    followed = _kdcache("logs", job, "--follow", "--address", head, timeout=60)
    assert followed.returncode == 0 and "SUCCEEDED" in followed.stderr


def test_a_failing_job_exits_nonzero_and_shows_its_error(head, configs):
    result = _kdcache("submit", "build", configs["bad"], "--address", head)
    assert result.returncode == 1, result.stderr[-3000:]
    assert "FAILED" in result.stderr and "missing-teacher.pt" in result.stderr
    job = _job_id(result.stderr)
    status = _kdcache("status", job, "--address", head, timeout=60)
    assert status.returncode == 1
    info = json.loads(status.stdout)
    assert info["status"] == "FAILED" and info["driver_exit_code"] == 2


def test_a_config_error_fails_before_anything_is_uploaded(head, configs):
    result = _kdcache(
        "submit", "build", configs["build"], "targets.temprature=3", "--address", head
    )
    assert result.returncode == 2
    assert "temprature" in result.stderr and "submitted job" not in result.stderr


def _read(path: str) -> dict:
    with open(path) as f:
        return yaml.safe_load(f)


def _entrypoint(head: str, job: str) -> str:
    """The job's entrypoint as the job server holds it (what ``ray job list`` shows)."""
    from ray.job_submission import JobSubmissionClient

    return str(JobSubmissionClient(head).get_job_info(job).entrypoint)


def _working_dir(tmp_path, name: str, files: dict[str, dict]) -> str:
    """A small project directory: a .gitignore that ignores runs/, and config files."""
    work = tmp_path / name
    work.mkdir()
    (work / ".gitignore").write_text("/runs/\n")
    for relative, data in files.items():
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / relative).write_text(yaml.safe_dump(data))
    return str(work)


def test_native_ray_job_submit_runs_kdcache_build_on_a_config_in_the_working_dir(
    head, configs, tmp_path
):
    build = _read(configs["build"])
    build["root"] = str(tmp_path / "native-cache")  # a build of its own, not a hit
    build.pop("alias")
    work = _working_dir(tmp_path, "native", {"build.yaml": build, "runs/build.yaml": build})
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    submit = [ray, "job", "submit", "--address", head, "--working-dir", work, "--"]
    result = _run([*submit, "kdcache", "build", "build.yaml"], cwd=work)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    (summary,) = _json_lines(result.stdout)
    assert summary["hit"] is False and summary["computed"] == 2 * NUM_SHARDS
    assert verify(kdcache.open_cache(summary["key"], root=build["root"])).ok
    # the pitfall this guards against: Ray's upload honours .gitignore, so a config under
    # runs/ never reaches the job ...
    lost = _run([*submit, "kdcache", "build", "runs/build.yaml"], cwd=work)
    assert lost.returncode == 1 and "runs/build.yaml does not exist" in lost.stdout
    # ... and `kdcache submit` ships it as a copy, which the visible entrypoint names
    shipped = _kdcache("submit", "build", "runs/build.yaml", "--address", head, cwd=work)
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    assert _json_lines(shipped.stdout)[-1]["hit"] is True
    job = _job_id(shipped.stderr)
    assert _entrypoint(head, job) == f"kdcache build .kdcache-jobs/{job}/build.yaml"
    assert sorted(os.listdir(work)) == [".gitignore", "build.yaml", "runs"]  # no litter


def test_the_readme_train_line_works_as_typed(built, head, configs, tmp_path):
    assert built.returncode == 0
    train = _read(configs["train"])
    train["output_dir"] = str(tmp_path / "readme-student")
    work = _working_dir(tmp_path, "readme", {"train.yaml": train})
    # README.md, "Clusters": kdcache submit train train.yaml --workers 2 --address URL
    result = _kdcache(
        "submit", "train", "train.yaml", "--workers", "2", "--address", head, cwd=work
    )
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    summary = [s for s in _json_lines(result.stdout) if "steps" in s][-1]
    assert summary["world_size"] == 2 and summary["steps"] == 4
    assert summary["ray"]["checkpoint"] is not None  # reported to Ray, under output_dir/ray
    assert summary["ray"]["checkpoint"].startswith(os.path.join(train["output_dir"], "ray"))
    job = _job_id(result.stderr)
    assert _entrypoint(head, job) == (
        "kdcache train train.yaml ray.enabled=true ray.num_workers=2 ray.use_gpu=false "
        "ray.cpus_per_worker=1.0"
    )


def test_ray_job_stop_stops_a_submitted_job(built, head, configs, tmp_path):
    assert built.returncode == 0
    long_run = ["max_steps=1000000", f"output_dir={tmp_path / 'stopped'}"]
    submitted = _kdcache(
        "submit", "train", configs["train"], *long_run, "--no-wait", "--address", head
    )
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job = submitted.stdout.strip().splitlines()[-1]
    assert (
        job
        in _run(
            [os.path.join(os.path.dirname(sys.executable), "ray"), "job", "list", "--address", head]
        ).stdout
    )
    assert "max_steps=1000000" in _entrypoint(head, job)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    stopped = _run([ray, "job", "stop", job, "--address", head], timeout=120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    status = _kdcache("status", job, "--address", head, timeout=60)
    assert status.returncode == 1 and json.loads(status.stdout)["status"] == "STOPPED"
