"""The main job end to end on a small subset of real Fashion-MNIST, through the real Ray,
Arrow and DeepSpeed code (no mocks), run as a user runs it: the `kdcache demo` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from demo_runner import run_demo

from pipelines.fashion_mnist import DEFAULT_DATA_DIR

pytestmark = pytest.mark.integration

ARGS = [
    "--subset",
    "2400",
    "--teacher-epochs",
    "1",
    "--student-epochs",
    "2",
    "--student-labels",
    "200",
    "--num-shards",
    "8",
    "--no-progress",
]


def _demo(work, *extra):
    return run_demo("fashion-mnist", work, *ARGS, *extra)


def test_demo_end_to_end_then_cache_hit_then_miss_on_new_temperature(tmp_path):
    assert os.path.isdir(DEFAULT_DATA_DIR), (
        "Fashion-MNIST is missing: apt-get install dataset-fashion-mnist"
    )
    report, proc = _demo(tmp_path)
    roles = [m["role"] for m in report["models"]]
    assert roles == ["teacher"] * 3 + ["ensemble", "student_hard", "student_kd"]
    for m in report["models"]:
        assert 0.0 <= m["test_accuracy"] <= 1.0
        assert m["num_parameters"] > 0 and m["checkpoint_bytes"] > 0 and m["samples_per_s"] > 0
    by_role = {m["role"]: m for m in report["models"]}
    smallest_teacher = min(m["num_parameters"] for m in report["models"] if m["role"] == "teacher")
    assert by_role["student_kd"]["num_parameters"] * 10 <= smallest_teacher
    assert by_role["ensemble"]["test_accuracy"] > 0.5  # the teachers really learned
    cache = report["cache"]
    assert cache["hit"] is False and cache["num_shards"] == 8 and cache["bytes"] > 0
    assert "student_kd" in proc.stdout and "report written to" in proc.stdout

    # the cache on disk is sound
    verify = subprocess.run(
        [sys.executable, "-m", "kdcache.cli", "verify", cache["key"], "--root", cache["root"]],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "24 shard(s), 7200 row(s): ok" in verify.stdout

    # the build config the demo wrote reproduces the same cache: a hit, same key
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "kdcache.cli",
            "build",
            report["build_config"],
            "--no-progress",
            "executor.kind=local",
        ],
        capture_output=True,
        text=True,
    )
    assert build.returncode == 0, build.stdout + build.stderr
    built = json.loads(build.stdout.strip().splitlines()[-1])
    assert built["hit"] is True and built["key"] == cache["key"]

    again, proc2 = _demo(tmp_path)
    assert again["cache"]["hit"] is True and again["cache"]["key"] == cache["key"]
    assert "teacher stage skipped" in proc2.stderr

    hotter, _ = _demo(tmp_path, "--temperature", "2.0")
    assert hotter["cache"]["hit"] is False and hotter["cache"]["key"] != cache["key"]
