"""kdcache.jobs.submit without a cluster: what a job would carry, and its entrypoint."""

from __future__ import annotations

import json
import os

import pytest
import yaml

import kdcache
from kdcache.cli.job import job_main
from kdcache.errors import ConfigError
from kdcache.jobs.submit import CONFIG_ENV, DEFAULT_EXCLUDES, job_spec, resolve_address

BUILD = {
    "root": "ROOT",
    "dataset": {"factory": "kdcache.testing:toy_dataset", "kwargs": {"num_shards": 2}},
    "teachers": [{"name": "t", "torchscript": "t.pt"}],
    "executor": {"kind": "ray", "address": "10.0.0.1:6379"},
}
TRAIN = {
    "output_dir": "out",
    "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
    "cache": {"uri": "toy", "root": "ROOT"},
    "dataset": {"factory": "kdcache.testing:toy_dataset"},
}


def _write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_build_job_ships_the_resolved_config_and_packages_the_working_dir(tmp_path):
    path = _write(tmp_path, "build.yaml", BUILD)
    spec = job_spec(
        "build",
        path,
        ["targets.temperature=2.5"],
        working_dir=str(tmp_path),
        excludes=["data/"],
        pip=["zarr>=3"],
        env_vars={"AWS_REGION": "us-west-2"},
    )
    env = spec.runtime_env
    assert env["working_dir"] == str(tmp_path)
    assert {".venv", "/runs", "/caches", "data/"} <= set(env["excludes"])
    assert set(DEFAULT_EXCLUDES) <= set(env["excludes"])
    assert env["pip"] == ["zarr>=3"] and env["env_vars"]["AWS_REGION"] == "us-west-2"
    shipped = json.loads(env["env_vars"][CONFIG_ENV])
    assert shipped["targets"]["temperature"] == 2.5  # the override travels
    assert shipped["executor"]["address"] is None  # the job joins its own cluster
    assert spec.entrypoint == "python -m kdcache.cli.job build"
    assert spec.submission_id.startswith("kdcache-build-")


def test_default_excludes_leave_out_venv_runs_and_caches_at_the_top_only(tmp_path):
    pytest.importorskip("ray")
    from pathlib import Path

    # Ray's own matcher (a private helper; follow it if Ray moves it), so the patterns are
    # checked as Ray applies them, not as we think gitignore works.
    from ray._private.runtime_env.packaging import _get_excludes

    excluded = _get_excludes(tmp_path, list(DEFAULT_EXCLUDES))
    for path in (".venv/bin/python", "runs/x/build.yaml", "caches/k", "a/__pycache__/m.pyc"):
        assert excluded(tmp_path / path), path
    for path in ("kdcache/cache.py", "pipelines/cache/__init__.py", "mypkg/build/x.py"):
        assert not excluded(tmp_path / Path(path)), path


def test_base_runtime_env_is_merged_not_replaced(tmp_path):
    path = _write(tmp_path, "build.yaml", BUILD)
    base = {"env_vars": {"A": "1"}, "excludes": ["big/"], "pip": ["x"]}
    env = job_spec("build", path, runtime_env=base, pip=["y"], working_dir=str(tmp_path))
    assert env.runtime_env["env_vars"]["A"] == "1" and CONFIG_ENV in env.runtime_env["env_vars"]
    assert "big/" in env.runtime_env["excludes"] and env.runtime_env["pip"] == ["x", "y"]


def test_a_bad_config_fails_before_anything_is_sent(tmp_path):
    path = _write(tmp_path, "build.yaml", BUILD)
    with pytest.raises(ConfigError, match="temprature"):
        job_spec("build", path, ["targets.temprature=2"])
    with pytest.raises(ConfigError, match="student stage"):
        job_spec("build", path, workers=2)
    with pytest.raises(ConfigError, match="stage"):
        job_spec("distill", path)


def test_train_workers_turn_on_ray_train(tmp_path):
    path = _write(tmp_path, "train.yaml", TRAIN)
    spec = job_spec("train", path, workers=4, use_gpu=True, cpus_per_worker=2)
    ray = json.loads(spec.runtime_env["env_vars"][CONFIG_ENV])["ray"]
    assert ray["enabled"] is True and ray["num_workers"] == 4
    assert ray["use_gpu"] is True and ray["cpus_per_worker"] == 2.0
    plain = job_spec("train", path)
    assert "ray" not in json.loads(plain.runtime_env["env_vars"][CONFIG_ENV])


def test_resolve_address(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="--address"):
        resolve_address(None)
    with pytest.raises(ConfigError, match="8265"):
        resolve_address("10.0.0.1:6379")
    assert resolve_address("10.0.0.1:8265") == "http://10.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address: not the job server
    with pytest.raises(ConfigError):
        resolve_address(None)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://h:8265")
    assert resolve_address(None) == "http://h:8265"


def test_entrypoint_runs_the_shipped_config(tmp_path, monkeypatch, capsys):
    root = str(tmp_path / "cache")
    config = {
        "root": root,
        "dataset": {"factory": "kdcache.testing:toy_dataset", "kwargs": {"num_shards": 2}},
        "teachers": [
            {
                "name": "t",
                "factory": "torch.nn:Linear",
                "kwargs": {"in_features": 8, "out_features": 5},
                "checkpoint": str(tmp_path / "t.pt"),
            }
        ],
        "executor": {"kind": "local"},
    }
    import torch

    from kdcache.testing import linear_teacher

    torch.save(linear_teacher().module.state_dict(), str(tmp_path / "t.pt"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(CONFIG_ENV, raising=False)
    assert job_main(["build"]) == 2
    assert CONFIG_ENV in capsys.readouterr().err
    monkeypatch.setenv(CONFIG_ENV, json.dumps(config))
    assert job_main(["build"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert kdcache.open_cache(summary["key"], root=root).num_shards == 2
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".kdcache-")]  # no litter
    # --config (a mounted ConfigMap) instead of the variable: a hit now
    path = _write(tmp_path, "b.yaml", config)
    assert job_main(["build", "--config", path]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hit"] is True
