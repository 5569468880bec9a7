"""``kdcache sweep``: a 4-trial grid (alpha x temperature) of tiny students from one toy
cache, run as Ray Tune trials on a local Ray that the sweep starts and stops."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import socket

import pytest
import yaml

import kdcache
from kdcache.cli import main as cli
from kdcache.jobs.config import StreamConfig
from kdcache.testing import linear_teacher, toy_dataset

ray = pytest.importorskip("ray")
pytest.importorskip("ray.tune")
pytestmark = pytest.mark.integration

#: The stream's global micro-batch key (renamed from batch_size to global_batch_size).
BATCH_KEY = next(
    f.name
    for f in dataclasses.fields(StreamConfig)
    if f.name in ("global_batch_size", "batch_size")
)
DATASET = {"factory": "kdcache.testing:toy_dataset", "kwargs": {"num_records": 96, "num_shards": 3}}


@pytest.fixture
def no_ray_left():
    assert not ray.is_initialized()
    yield
    if ray.is_initialized():  # the sweep failed before it could stop the Ray it started
        ray.shutdown()
        pytest.fail("the sweep left Ray running")


@pytest.fixture
def driver_process_group_port(monkeypatch):
    """A driver that trained first (the demo) holds a process group on MASTER_PORT, and
    Ray workers inherit its environment: each trial must make its own rendezvous."""
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
        monkeypatch.setenv("MASTER_PORT", str(held.getsockname()[1]))
        yield


def test_a_four_trial_sweep_writes_trials_table_and_plot(
    tmp_path, no_ray_left, driver_process_group_port, capsys
):
    ds = toy_dataset(num_records=96, num_shards=3)
    teachers = kdcache.TeacherEnsemble([linear_teacher(seed=s) for s in range(2)])
    cache = kdcache.build_cache(
        ds,
        teachers,
        temperature=2.0,
        root=str(tmp_path / "cache"),
        executor="local",
        progress=False,
    )
    train = {
        "output_dir": str(tmp_path / "unused"),
        "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
        "cache": {"uri": cache.key, "root": str(cache.root.uri)},
        "dataset": DATASET,
        "eval_dataset": {**DATASET, "kwargs": {"num_records": 40, "num_shards": 1, "seed": 9}},
        "stream": {BATCH_KEY: 16},
        "max_steps": 4,
        "lr": 0.05,
        "tensorboard": False,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    out = tmp_path / "sweep"
    sweep_cfg = {
        "train": str(tmp_path / "train.yaml"),
        "output_dir": str(out),
        "parameters": {"loss.alpha": [0.5, 0.9]},
        "cpus_per_trial": 1,
        "max_concurrent_trials": 2,
    }
    (tmp_path / "sweep.yaml").write_text(yaml.safe_dump(sweep_cfg))

    # the temperature axis comes from the command line: dense entries re-temper exactly
    assert (
        cli(["sweep", str(tmp_path / "sweep.yaml"), "parameters.loss.temperature=[1.0,2.0]"]) == 0
    )
    printed = capsys.readouterr().out

    assert not ray.is_initialized()  # the sweep stopped the Ray it started
    trials = sorted(os.listdir(out / "trials"))
    assert trials == [f"trial-{i:03d}" for i in range(4)]
    for i, name in enumerate(trials):
        with open(out / "trials" / name / "summary.json") as f:
            summary = json.load(f)
        assert summary["steps"] == 4 and summary["cache"]["key"] == cache.key
        with open(out / "trials" / name / "trial.json") as f:
            assert json.load(f)["index"] == i
        assert (out / "trials" / name / "student.safetensors").exists()

    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert [(float(r["loss.alpha"]), float(r["loss.temperature"])) for r in rows] == [
        (0.5, 1.0), (0.5, 2.0), (0.9, 1.0), (0.9, 2.0)
    ]  # fmt: skip
    for r in rows:
        assert r["status"] == "ok"
        assert 0.0 <= float(r["eval/accuracy"]) <= 1.0
        for key in ("eval/accuracy", "eval/cross_entropy", "train/loss", "wall_s"):
            assert math.isfinite(float(r[key])), (key, r)
        assert os.path.isdir(r["output_dir"])
    # the temperature reached the loss: same alpha, another tau, another training loss
    assert rows[0]["train/loss"] != rows[1]["train/loss"]

    with open(out / "results.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert "eval/accuracy" in printed and printed.count("trial-00") >= 4
    assert "results.csv" in printed and "best:" in printed
