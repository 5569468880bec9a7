"""Configs as users type them, on real build and train runs: an alias is not re-pointed
behind the user's back, factory modules beside a config import without PYTHONPATH, an
``epochs`` override replaces ``max_steps``, and an ``s3://`` output directory receives the
run's artefacts (against the moto S3 server, as in ``test_s3.py``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest
import torch

import kdcache
from kdcache.cli import main
from kdcache.stores.catalog import alias_target
from kdcache.stores.fs import Location
from kdcache.testing import linear_teacher, toy_dataset

pytestmark = pytest.mark.integration

NUM_RECORDS, NUM_SHARDS = 64, 4
DATASET = {
    "factory": "kdcache.testing:toy_dataset",
    "kwargs": {"num_records": NUM_RECORDS, "num_shards": NUM_SHARDS},
}


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


# -- kdcache build: aliases ---------------------------------------------------------------


def test_build_refuses_to_re_point_an_alias_unless_asked(tmp_path, capsys):
    ckpt = tmp_path / "teacher.pt"
    torch.save(linear_teacher().module.state_dict(), ckpt)
    root = tmp_path / "cache"
    config = {
        "root": str(root),
        "alias": "toy",
        "dataset": DATASET,
        "teachers": [
            {
                "name": "lin",
                "factory": "kdcache.testing:linear_module",
                "kwargs": {"num_features": 8, "num_classes": 5},
                "checkpoint": str(ckpt),
            }
        ],
        "executor": {"kind": "local"},
    }
    path = tmp_path / "build.json"
    path.write_text(json.dumps(config))
    build = ["build", str(path), "--no-progress"]

    assert main(build) == 0
    first = _last_json(capsys.readouterr().out)["key"]
    assert main(build) == 0  # the same key again: nothing to move
    assert alias_target(str(root), "toy") == first
    capsys.readouterr()

    assert main([*build, "targets.temperature=2"]) == 2  # another key: refused up front
    captured = capsys.readouterr()
    assert captured.out == ""
    assert os.listdir(root / "entries") == [first]  # nothing was built
    assert f"alias 'toy' points at key {first}, but this build would make key" in captured.err
    assert "nothing was built" in captured.err and "Pass --move-alias" in captured.err
    assert alias_target(str(root), "toy") == first  # left alone

    assert main([*build, "targets.temperature=2", "--move-alias"]) == 0
    again = _last_json(capsys.readouterr().out)
    (other,) = [k for k in os.listdir(root / "entries") if k != first]
    assert again["key"] == other and again["hit"] is False
    assert alias_target(str(root), "toy") == other
    assert main([*build, "targets.temperature=2"]) == 0  # now it names this key: a hit
    assert _last_json(capsys.readouterr().out)["hit"] is True


# -- kdcache build: factory modules beside the config ------------------------------------

BYO_DATA = '''
"""A user's own dataset and teacher, beside their config (no package, no PYTHONPATH)."""
import byo_sizes
from kdcache.testing import linear_module, toy_dataset


def make_dataset(num_records):
    return toy_dataset(num_records=num_records, num_shards=byo_sizes.NUM_SHARDS)


def make_teacher():
    return linear_module(num_features=8, num_classes=5)
'''


def _byo_project(directory):
    directory.mkdir()
    (directory / "byo_data.py").write_text(textwrap.dedent(BYO_DATA))
    (directory / "byo_sizes.py").write_text("NUM_SHARDS = 2\n")
    ckpt = directory / "teacher.pt"
    torch.save(linear_teacher().module.state_dict(), ckpt)
    config = {
        "root": str(directory / "cache"),
        "dataset": {"factory": "byo_data:make_dataset", "kwargs": {"num_records": 24}},
        "teachers": [{"name": "mine", "factory": "byo_data:make_teacher", "checkpoint": str(ckpt)}],
        "executor": {"kind": "local"},
    }
    (directory / "cfg.yaml").write_text(json.dumps(config))  # JSON is YAML


def _kdcache_build(config, cwd):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -P: Python itself puts no directory on sys.path, as with the `kdcache` console
    # script (plain `python -m` would add the current directory on its own).
    return subprocess.run(
        [sys.executable, "-P", "-m", "kdcache.cli", "build", config, "--no-progress"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_factory_modules_in_the_cwd_and_beside_the_config_import_without_pythonpath(tmp_path):
    project = tmp_path / "project"
    _byo_project(project)
    in_dir = _kdcache_build("cfg.yaml", cwd=project)  # the current directory
    assert in_dir.returncode == 0, in_dir.stderr[-3000:]
    report = _last_json(in_dir.stdout)
    assert report["computed"] == 2 and report["num_shards"] == 2  # byo_sizes was imported

    beside = _kdcache_build(os.path.join("project", "cfg.yaml"), cwd=tmp_path)  # beside it
    assert beside.returncode == 0, beside.stderr[-3000:]
    assert _last_json(beside.stdout)["key"] == report["key"]
    assert _last_json(beside.stdout)["hit"] is True

    (tmp_path / "elsewhere").mkdir()
    (project / "cfg.yaml").rename(tmp_path / "elsewhere" / "cfg.yaml")
    lost = _kdcache_build(os.path.join("elsewhere", "cfg.yaml"), cwd=tmp_path)
    assert lost.returncode == 2
    assert "cannot import module 'byo_data'" in lost.stderr and "PYTHONPATH" in lost.stderr


# -- kdcache train --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("config-jobs") / "cache")
    teachers = [linear_teacher(seed=s) for s in range(2)]
    return kdcache.build_cache(
        toy_dataset(num_records=NUM_RECORDS, num_shards=NUM_SHARDS),
        teachers,
        temperature=2.0,
        root=root,
        executor="local",
        progress=False,
    )


def _train_config(tmp_path, cache, output_dir, **extra):
    config = {
        "output_dir": output_dir,
        "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
        "cache": {"uri": cache.key, "root": str(cache.root.uri)},
        "dataset": DATASET,
        "stream": {"global_batch_size": 16},  # an epoch is 64 / 16 = 4 steps
        "max_steps": 3,
        "tensorboard": False,
        **extra,
    }
    path = tmp_path / f"train-{uuid.uuid4().hex[:6]}.json"
    path.write_text(json.dumps(config))
    return str(path)


def _with_ensemble(path: str, ensemble: dict) -> str:
    with open(path) as f:
        config = json.load(f)
    config["cache"]["ensemble"] = ensemble
    with open(path, "w") as f:
        json.dump(config, f)
    return path


def test_cache_ensemble_recombines_the_same_entries_by_another_rule(tmp_path, cache, capsys):
    """``cache.ensemble`` in a train config re-combines the view's entries by another
    rule at read time: the same entries (no teacher recomputed), another view key."""
    names = [e.teacher_name for e in cache.entries]
    path = _with_ensemble(
        _train_config(tmp_path, cache, str(tmp_path / "out")),
        {"rule": "confidence_entropy", "entropy_temperature": 0.5},
    )
    assert main(["train", path, "--no-progress"]) == 0
    facts = _last_json(capsys.readouterr().out)["cache"]
    assert facts["rule"] == "confidence_entropy" and facts["teachers"] == names
    assert facts["entries"] == [e.key for e in cache.entries] and facts["key"] != cache.key
    assert facts["ensemble_rule"]["entropy_temperature"] == 0.5
    saved = kdcache.open_cache(facts["key"], root=str(cache.root.uri))  # the key opens
    assert saved.ensemble_rule.rule == "confidence_entropy"
    routed = _with_ensemble(
        _train_config(tmp_path, cache, str(tmp_path / "out2")),
        {"rule": "route", "route_column": "labels", "routes": {"0": "nobody"}},
    )
    assert main(["train", routed, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"cache.ensemble.routes.0: no teacher named 'nobody'; the teachers are {names}" in err
    weighted = _with_ensemble(
        _train_config(tmp_path, cache, str(tmp_path / "out3")),
        {"rule": "confidence_max", "weights": [1, 2, 3]},
    )
    assert main(["train", weighted, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "cache.ensemble: " in err and "3 ensemble weights for 2 teachers" in err


def test_the_train_job_reads_the_views_combined_entry_unless_told_not_to(tmp_path, cache, capsys):
    """``cache.combined`` (on by default) stores the view's combination at the loss
    temperature once and streams it; ``cache.combined: false`` combines per shard."""
    path = _train_config(tmp_path, cache, str(tmp_path / "out"), loss={"temperature": 1.0})
    assert main(["train", path, "--no-progress"]) == 0
    facts = _last_json(capsys.readouterr().out)["cache"]
    entry = cache.combined_entry(1.0)
    assert facts["combined_entry"] == entry.key and entry.is_complete and entry.is_combined
    assert facts["key"] == cache.key  # the run still records the view it distils from
    with open(path) as f:
        config = json.load(f)
    config["cache"]["combined"] = False
    config["output_dir"] = str(tmp_path / "out2")
    with open(path, "w") as f:
        json.dump(config, f)
    assert main(["train", path, "--no-progress"]) == 0
    assert _last_json(capsys.readouterr().out)["cache"]["combined_entry"] is None


def test_an_epochs_override_replaces_max_steps(tmp_path, cache, capsys):
    path = _train_config(tmp_path, cache, str(tmp_path / "out"))
    assert main(["train", path, "epochs=2", "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["steps"] == 8 and summary["global_batch_size"] == 16  # 2 x 4, not 3
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["steps"] == 8


# -- an s3:// output directory ----------------------------------------------------------

BUCKET = "kdcache-test"  # the bucket the s3_endpoint fixture (conftest.py) creates


def test_an_s3_output_dir_receives_the_artefacts(tmp_path, cache, s3_endpoint, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    prefix = uuid.uuid4().hex[:12]
    output_dir = (
        f"s3://{BUCKET}/{prefix}/run?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    )
    path = _train_config(tmp_path, cache, output_dir, compare_hard_labels=True)
    assert main(["train", path, "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    remote = Location(output_dir)
    names = set(remote.listdir())
    assert {"metrics.csv", "student.safetensors", "summary.json", "hard"} <= names
    assert "checkpoints" not in names and "checkpoints" not in remote.listdir("hard")
    assert "metrics.csv" in remote.listdir("hard")
    if summary.get("plot"):
        assert "curves.png" in names
    assert summary["output_dir"] == f"s3://{BUCKET}/{prefix}/run"
    assert summary["student"]["path"] == f"s3://{BUCKET}/{prefix}/run/student.safetensors"
    assert json.loads(remote.read_bytes("summary.json")) == summary
    staged = summary["staging_dir"]
    assert os.path.isdir(os.path.join(staged, "checkpoints"))  # kept locally, for --resume
    assert not os.path.exists(tmp_path / "s3:")  # no local folder named after the scheme
    weights = tmp_path / "student.safetensors"
    weights.write_bytes(remote.read_bytes("student.safetensors"))
    assert set(kdcache.teachers.load_state_dict(str(weights))) == {"weight", "bias"}

    memory = _train_config(tmp_path, cache, "memory://run")
    assert main(["train", memory, "--no-progress"]) == 2
    assert "output_dir: 'memory://run' is not a directory" in capsys.readouterr().err
