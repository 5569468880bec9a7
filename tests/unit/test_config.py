"""Typed configs: unknown keys and wrong types are errors; overrides are type-checked."""

from __future__ import annotations

import json

import pytest

from kdcache.errors import ConfigError
from kdcache.jobs import config as cfg

BASE = {
    "root": "/tmp/x",
    "dataset": {"factory": "kdcache.testing:toy_dataset", "kwargs": {"num_records": 32}},
    "teachers": [{"name": "a", "torchscript": "a.pt"}],
}


def test_defaults_and_nested_types():
    c = cfg.from_dict(cfg.BuildConfig, BASE)
    assert c.targets.temperature == 4.0 and c.executor.kind == "ray"
    assert isinstance(c.teachers[0], cfg.TeacherConfig)
    c2 = cfg.from_dict(cfg.BuildConfig, cfg.apply_overrides(BASE, ["targets.temperature=2"]))
    assert c2.targets.temperature == 2.0 and isinstance(c2.targets.temperature, float)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("targets.temprature=2", r"unknown key\(s\) 'targets.temprature'"),
        ("targets.temperature=hot", r"targets.temperature: expected a number, got 'hot'"),
        ("targets.temperature=-1", "temperature must be a finite number > 0"),
        ("executor.kind=dask", "executor.kind must be 'ray' or 'local'"),
        ("executor.num_actors=true", "expected an integer"),
        ("ensemble.weights=[1, 2]", "2 values for 1 teachers"),
        ("nonsense", "must look like key=value"),
    ],
)
def test_bad_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg.from_dict(cfg.BuildConfig, cfg.apply_overrides(BASE, [override]))


def test_missing_required_and_teacher_sources():
    with pytest.raises(ConfigError, match="missing required key 'dataset'"):
        cfg.from_dict(cfg.BuildConfig, {"root": "r", "teachers": []})
    bad = {**BASE, "teachers": [{"name": "a", "factory": "m:f"}]}
    with pytest.raises(ConfigError, match="give either torchscript, or factory and checkpoint"):
        cfg.from_dict(cfg.BuildConfig, bad)


def test_files_yaml_toml_json(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(BASE))
    (tmp_path / "c.yaml").write_text(
        "root: /tmp/x\ndataset: {factory: 'kdcache.testing:toy_dataset'}\n"
        "teachers: [{name: a, torchscript: a.pt}]\n"
    )
    (tmp_path / "c.toml").write_text(
        'root = "/tmp/x"\n[dataset]\nfactory = "kdcache.testing:toy_dataset"\n'
        '[[teachers]]\nname = "a"\ntorchscript = "a.pt"\n'
    )
    for name in ("c.json", "c.yaml", "c.toml"):
        c = cfg.load(cfg.BuildConfig, str(tmp_path / name), ["executor.kind=local"])
        assert c.root == "/tmp/x" and c.executor.kind == "local"
    (tmp_path / "bad.yaml").write_text("root: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        cfg.read_file(str(tmp_path / "bad.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.read_file(str(tmp_path / "none.yaml"))


def test_import_object_errors():
    assert cfg.import_object("kdcache.testing:toy_dataset").__name__ == "toy_dataset"
    with pytest.raises(ConfigError, match="cannot import module"):
        cfg.import_object("kdcache.nope:f")
    with pytest.raises(ConfigError, match="has no attribute"):
        cfg.import_object("kdcache.testing:nope")


def test_build_command_from_config_is_a_hit_on_rerun(tmp_path, capsys):
    import torch

    from kdcache.cli import main
    from kdcache.testing import linear_teacher

    ts = tmp_path / "t.pt"
    # Tolerated: torch 2.13 deprecates *making* TorchScript, but teachers still ship as
    # TorchScript archives, and loading them is what kdcache supports.
    with pytest.warns(DeprecationWarning, match="jit.script"):
        torch.jit.script(linear_teacher().module).save(str(ts))
    config = {
        **BASE,
        "root": str(tmp_path / "cache"),
        "alias": "toy",
        "teachers": [{"name": "a", "torchscript": str(ts)}],
    }
    (tmp_path / "b.json").write_text(json.dumps(config))
    args = ["build", str(tmp_path / "b.json"), "executor.kind=local", "--no-progress"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["hit"] is False and first["computed"] == 4
    assert main(args) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["hit"] is True and second["key"] == first["key"]
    assert main(["verify", "toy", "--root", str(tmp_path / "cache")]) == 0
