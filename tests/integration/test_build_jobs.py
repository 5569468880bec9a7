"""Teacher-stage jobs as processes: a killed driver resumes; two jobs on one key."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from kdcache.testing import linear_teacher

pytestmark = pytest.mark.integration


def _config(tmp_path, root):
    ckpt = tmp_path / "teacher.pt"
    if not ckpt.exists():
        torch.save(linear_teacher().module.state_dict(), ckpt)
    config = {
        "root": str(root),
        "dataset": {
            "factory": "kdcache.testing:toy_dataset",
            "kwargs": {"num_records": 80, "num_shards": 8},
        },
        "teachers": [
            {
                "name": "lin",
                "factory": "kdcache.testing:linear_module",
                "kwargs": {"num_features": 8, "num_classes": 5},
                "checkpoint": str(ckpt),
            }
        ],
        "executor": {"kind": "local", "batch_size": 4},
    }
    path = tmp_path / f"{root.name}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _build(config, delay_s=0.0, **popen):
    env = {**os.environ, "KDCACHE_TEST_DELAY_S": str(delay_s)}
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache.cli", "build", config, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **popen,
    )


def _result(proc, timeout=120):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return json.loads(out.strip().splitlines()[-1]), err


def _manifest(root):
    (key,) = os.listdir(root / "entries")
    with open(root / "entries" / key / "manifest.json") as f:
        return json.load(f)


def test_killed_driver_then_rerun_computes_only_missing_shards(tmp_path):
    reference, _ = _result(_build(_config(tmp_path, tmp_path / "ref")))
    assert reference["computed"] == 8

    root = tmp_path / "killed"
    proc = _build(_config(tmp_path, root), delay_s=0.15)
    deadline = time.monotonic() + 60
    shards = root / "entries"
    committed = []
    while time.monotonic() < deadline:
        if shards.exists():
            (key,) = os.listdir(shards) or (None,)
            if key and (shards / key / "shards").exists():
                committed = [f for f in os.listdir(shards / key / "shards") if f.endswith(".json")]
                if len(committed) >= 3:
                    break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    entry = shards / key
    assert 3 <= len(committed) < 8, committed
    assert not (entry / "manifest.json").exists()
    assert (entry / "lease.json").exists()  # left behind by the dead driver

    rerun, err = _result(_build(_config(tmp_path, root)))
    done_before = len([f for f in os.listdir(entry / "shards") if f.endswith(".json")])
    assert rerun["key"] == reference["key"]
    assert rerun["computed"] + rerun["reused"] == 8 and rerun["reused"] >= len(committed)
    assert "dead job's lease" in err  # taken over at once, not after the expiry
    assert done_before == 8
    ref, got = _manifest(tmp_path / "ref"), _manifest(root)
    assert got["shards"] == ref["shards"]  # byte-identical to an uninterrupted run
    assert not (entry / "lease.json").exists()


def test_two_jobs_on_one_key_one_builds_the_other_waits_and_reuses(tmp_path):
    config = _config(tmp_path, tmp_path / "shared")
    first = _build(config, delay_s=0.1)
    time.sleep(1.0)
    second = _build(config, delay_s=0.1)
    a, _ = _result(first)
    b, err_b = _result(second)
    assert a["key"] == b["key"]
    assert (a["hit"], a["computed"]) == (False, 8)
    assert (b["hit"], b["computed"]) == (True, 0)
    assert "being built by" in err_b
