"""``kdcache plan``: sizes from the dataset's plan, cache bytes measured by the real codec,
teacher times from a calibration batch; nothing is written under the cache root."""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from safetensors.torch import save_file

import kdcache
from kdcache.cli import main
from kdcache.jobs import config as cfg
from kdcache.jobs.plan import format_plan, plan_build
from kdcache.testing import linear_module, toy_dataset


@pytest.fixture
def build_yaml(tmp_path):
    torch.manual_seed(0)
    weights = tmp_path / "a.safetensors"
    module = linear_module(8, 40)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    path = tmp_path / "build.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "root": str(tmp_path / "cache"),
                "dataset": {
                    "factory": "kdcache.testing:toy_dataset",
                    "kwargs": {"num_records": 400, "num_shards": 4, "num_classes": 40},
                },
                "teachers": [
                    {
                        "name": "a",
                        "factory": "kdcache.testing:linear_module",
                        "kwargs": {"num_features": 8, "num_classes": 40},
                        "checkpoint": str(weights),
                    }
                ],
                "targets": {"temperature": 2.0, "kind": "topk", "params": {"k": 8}},
            }
        )
    )
    return path


def test_plan_bytes_match_a_real_build(build_yaml, tmp_path):
    config = cfg.load(cfg.BuildConfig, str(build_yaml))
    plan = plan_build(config, calibration_rows=100)
    assert (plan.num_shards, plan.num_rows, plan.max_shard_rows) == (4, 400, 100)
    assert not os.path.exists(tmp_path / "cache")  # nothing written under the root
    configured = [t for t in plan.targets if t.configured]
    assert len(configured) == 1 and configured[0].kind == "topk"
    kinds = {(t.kind, t.storage_dtype, (t.params or {}).get("k")) for t in plan.targets}
    assert ("dense", "float32", None) in kinds and ("dense", "float16", None) in kinds
    assert ("topk", "float32", 32) in kinds and ("topk", "float32", 128) not in kinds  # k < V
    (teacher,) = plan.teachers
    assert teacher.vocab_size == 40 and teacher.num_parameters == 8 * 40 + 40
    assert teacher.parameter_bytes == 4 * teacher.num_parameters
    assert teacher.seconds_per_row > 0 and teacher.peak_actor_bytes > teacher.parameter_bytes

    # the estimate against a real build of the same config, on its real data
    ds = toy_dataset(num_records=400, num_shards=4, num_classes=40)
    for t in plan.targets:
        if (t.kind == "dense" and t.storage_dtype == "float16") or t is configured[0]:
            params = dict(t.params) if t.params else None
            entry = kdcache.build_cache(
                ds,
                config.teachers[0].build(),
                temperature=2.0,
                root=str(tmp_path / f"real-{t.kind}-{t.storage_dtype}"),
                kind=t.kind,
                params=params,
                storage_dtype=t.storage_dtype,
                executor="local",
                progress=False,
            )
            assert entry.num_bytes == pytest.approx(t.total_bytes, rel=0.1), t


def test_plan_command_prints_a_table_and_warns_above_the_limit(build_yaml, capsys):
    assert main(["plan", str(build_yaml), "--max-cache-bytes", "1000"]) == 0
    out = capsys.readouterr().out
    assert "4 shards, 400 rows" in out
    assert "<- this config" in out and "topk" in out
    assert "warning: teacher 'a': a dense float32 cache" in out
    dense = ["targets.kind=dense", "targets.params=null"]
    assert main(["plan", str(build_yaml), "--json", *dense]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [t["kind"] for t in data["targets"] if t["configured"]] == ["dense"]
    assert "warning" not in format_plan(plan_build(cfg.load(cfg.BuildConfig, str(build_yaml))))


def test_plan_bad_input_is_a_clear_error(build_yaml, capsys):
    assert main(["plan", str(build_yaml), "--calibration-rows", "0"]) == 2
    assert "--calibration-rows must be >= 1" in capsys.readouterr().err
    assert main(["plan", str(build_yaml), "teachers.0.checkpoint=/nonexistent.safetensors"]) == 2
    assert "/nonexistent.safetensors" in capsys.readouterr().err


def test_plan_warns_about_teachers_of_different_class_counts(build_yaml, tmp_path, capsys):
    weights = tmp_path / "b.safetensors"
    module = linear_module(8, 30)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
    b = (
        "teachers.1={name: b, factory: 'kdcache.testing:linear_module', "
        f"kwargs: {{num_features: 8, num_classes: 30}}, checkpoint: '{weights}'}}"
    )
    data = yaml.safe_load(build_yaml.read_text())
    data["teachers"].append({})
    build_yaml.write_text(yaml.safe_dump(data))
    assert main(["plan", str(build_yaml), b]) == 0
    out = capsys.readouterr().out
    assert "different numbers of classes ('a': V=40, 'b': V=30)" in out
