"""Typed configs: unknown keys and wrong types are errors; overrides are type-checked."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from kdcache.errors import ConfigError
from kdcache.executors.config import ExecutorConfig
from kdcache.jobs import config as cfg
from kdcache.schema import TargetSpec

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
        ("targets.temprature=2", r"unknown key 'targets.temprature'; TargetSpec accepts"),
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


TRAIN = {
    "output_dir": "out",
    "student": {"factory": "m:f"},
    "cache": {"uri": "toy"},
    "dataset": {"factory": "kdcache.testing:toy_dataset"},
}


def test_list_items_are_overridden_by_index():
    two = {
        **BASE,
        "teachers": [{"name": "a", "torchscript": "a.pt"}, {"name": "b", "torchscript": "b.pt"}],
    }
    data = cfg.apply_overrides(
        two,
        ["teachers.0.torchscript=x.pt", "teachers.1.kwargs.width=64", "ensemble.weights=[1, 3]"],
    )
    c = cfg.from_dict(cfg.BuildConfig, data)
    assert [t.torchscript for t in c.teachers] == ["x.pt", "b.pt"]
    assert c.teachers[1].kwargs == {"width": 64} and c.teachers[0].kwargs == {}
    assert c.ensemble.weights == [1.0, 3.0]
    assert two["teachers"][0]["torchscript"] == "a.pt"  # the input is left unchanged


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("teachers.1.name=b", r"'teachers.1' is out of range; 'teachers' has 1 item"),
        ("teachers.first.name=b", r"'teachers' is a list; index it with a number"),
        ("root.sub=1", r"'root' is str '/tmp/x', not a mapping or a list"),
        ("alias=[unclosed", r"override 'alias=\[unclosed': the value is not valid YAML"),
    ],
)
def test_override_paths_that_cannot_be_followed(override, message):
    with pytest.raises(ConfigError, match=message):
        cfg.apply_overrides(BASE, [override])


@pytest.mark.parametrize(
    ("cls", "override", "message"),
    [
        (
            cfg.BuildConfig,
            "teachers.0.kwarg={width: 3}",
            r"^unknown key 'teachers.0.kwarg'; TeacherConfig accepts: name, factory, kwargs,",
        ),
        (cfg.BuildConfig, "teachers.0.kwargs=3", r"^teachers.0.kwargs: expected a mapping, got 3$"),
        (
            cfg.TrainConfig,
            "stream.global_batch_size=1.5",
            r"^stream.global_batch_size: expected an integer, got 1.5$",
        ),
        (cfg.TrainConfig, "stream.global_batch_size=64.0", r"expected an integer, got 64.0$"),
        (cfg.TrainConfig, "stream.global_batch_size='64'", r"expected an integer, got '64'$"),
        (cfg.TrainConfig, "stream.verify=1", r"^stream.verify: expected true or false, got 1$"),
        (cfg.TrainConfig, "lr='1e-3'", r"^lr: expected a number, got '1e-3'$"),
        (cfg.TrainConfig, "deepspeed=3", r"^deepspeed: expected a mapping or a string, got 3$"),
        (cfg.TrainConfig, "eval_dataset={factory: 7}", r"^eval_dataset.factory: expected a string"),
        (cfg.BuildConfig, "alias=2024-01-01", r"^alias: expected a mapping, list, string, number"),
    ],
)
def test_wrong_keys_and_types_name_the_dotted_path(cls, override, message):
    base = BASE if cls is cfg.BuildConfig else TRAIN
    with pytest.raises(ConfigError, match=message):
        cfg.from_dict(cls, cfg.apply_overrides(base, [override]))


def test_ints_are_floats_and_several_problems_are_reported_together():
    c = cfg.from_dict(cfg.TrainConfig, cfg.apply_overrides(TRAIN, ["lr=1", "epochs=2"]))
    assert c.lr == 1.0 and isinstance(c.lr, float) and isinstance(c.epochs, float)
    bad = ["root=3", "executor.batch_size=0", "executor.kind=dask"]
    with pytest.raises(ConfigError) as info:
        cfg.from_dict(cfg.BuildConfig, cfg.apply_overrides(BASE, bad))
    lines = str(info.value).splitlines()
    assert lines[0] == "2 problems in BuildConfig:"
    assert lines[1:] == [
        "  root: expected a string, got 3",
        "  executor.kind must be 'ray' or 'local', got 'dask'",
    ]


def test_post_init_errors_stay_config_errors():
    # raised in __post_init__, inside pydantic's validation, at three depths
    cases = [
        (
            ["stream.global_batch_size=3", "stream.num_lanes=2"],
            r"^stream.global_batch_size \(3\) must be",
        ),
        (["loss.alpha=2"], r"^loss.alpha must be in \[0, 1\], got 2.0$"),
        (
            ["max_steps=3", "epochs=1"],  # without cls=TrainConfig, no override clears
            r"^TrainConfig: give epochs \(1.0\) or max_steps \(3\), not both: drop one",
        ),
    ]
    for overrides, message in cases:
        with pytest.raises(ConfigError, match=message) as info:
            cfg.from_dict(cfg.TrainConfig, cfg.apply_overrides(TRAIN, overrides))
        assert type(info.value) is ConfigError
    with pytest.raises(
        ConfigError, match=r"^teachers.0: teacher 'a': give one of factory \+ checkpoint, torch"
    ):
        cfg.from_dict(cfg.BuildConfig, {**BASE, "teachers": [{"name": "a"}]})


def test_direct_construction_raises_config_errors():
    assert ExecutorConfig(cpus_per_actor=2).cpus_per_actor == 2.0
    with pytest.raises(ConfigError, match=r"executor.kind must be 'ray' or 'local'"):
        ExecutorConfig(kind="dask")
    with pytest.raises(ConfigError, match=r"^batch_size: expected an integer, got 1.5$"):
        ExecutorConfig(batch_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"^unknown key 'workers'; ExecutorConfig accepts"):
        ExecutorConfig(workers=2)  # type: ignore[call-arg]
    c = cfg.from_dict(cfg.BuildConfig, BASE)
    local = dataclasses.replace(c, executor=ExecutorConfig(kind="local"), targets=TargetSpec(2.0))
    assert local.executor.kind == "local" and local.targets.temperature == 2.0
    assert dataclasses.asdict(local)["executor"]["kind"] == "local"


def test_targets_are_a_target_spec_with_the_config_default_temperature():
    assert cfg.from_dict(cfg.BuildConfig, BASE).targets == TargetSpec(4.0)
    c = cfg.from_dict(cfg.BuildConfig, {**BASE, "targets": {"kind": "topk", "params": {"k": 8}}})
    assert c.targets == TargetSpec(4.0, kind="topk", params={"k": 8})
    with pytest.raises(ConfigError, match=r"^targets: topk parameter 'k' must be an int >= 1"):
        cfg.from_dict(cfg.BuildConfig, {**BASE, "targets": {"kind": "topk", "params": {"k": 1.5}}})


def test_resolved_config_round_trips_through_json():
    sparse = {"kind": "topk", "params": {"k": 8, "labels": True, "grid_temperatures": [1, 2]}}
    c = cfg.from_dict(cfg.BuildConfig, {**BASE, "targets": {"temperature": 2, **sparse}})
    assert c.targets.params == (("grid_temperatures", (1.0, 2.0)), ("k", 8), ("labels", True))
    data = cfg.to_dict(c)
    assert json.loads(json.dumps(data)) == data  # plain JSON data
    assert data["targets"] == {
        "temperature": 2.0,
        "kind": "topk",
        "storage_dtype": "float32",
        "backend": "arrow",
        "params": {"grid_temperatures": [1.0, 2.0], "k": 8, "labels": True},
    }
    assert cfg.from_dict(cfg.BuildConfig, data) == c
    assert cfg.to_dict(cfg.from_dict(cfg.BuildConfig, BASE))["targets"]["params"] is None
    t = cfg.from_dict(cfg.TrainConfig, {**TRAIN, "deepspeed": {"train_batch_size": 8}})
    assert cfg.from_dict(cfg.TrainConfig, json.loads(json.dumps(cfg.to_dict(t)))) == t


def test_json_schema_of_the_job_configs():
    build = cfg.json_schema(cfg.BuildConfig)
    assert {"root", "dataset", "teachers", "targets", "executor"} <= set(build["properties"])
    assert build["additionalProperties"] is False and set(build["required"]) == {
        "root",
        "dataset",
        "teachers",
    }
    spec = build["$defs"]["TargetSpec"]
    assert spec["properties"]["temperature"]["default"] == 4.0 and "required" not in spec
    assert build["$defs"]["ExecutorConfig"]["properties"]["batch_size"]["type"] == "integer"
    train = cfg.json_schema(cfg.TrainConfig)
    lr = train["properties"]["lr"]
    assert lr["default"] is None and {"type": "number"} in lr["anyOf"]
    assert "stream" in train["properties"]
    json.dumps(train)  # serialisable as is


def test_missing_required_and_teacher_sources():
    with pytest.raises(ConfigError, match="missing required key 'dataset'"):
        cfg.from_dict(cfg.BuildConfig, {"root": "r", "teachers": []})
    bad = {**BASE, "teachers": [{"name": "a", "factory": "m:f"}]}
    with pytest.raises(ConfigError, match=r"give one of factory \+ checkpoint.*got factory$"):
        cfg.from_dict(cfg.BuildConfig, bad)
    for teacher, got in (
        ({"torchscript": "a.pt", "hf": "dir"}, "torchscript, hf"),
        ({"factory": "m:f", "hf": "dir"}, "factory, hf"),
        ({"factory": "m:f", "checkpoint": "a", "version": 1}, "factory, checkpoint, version"),
    ):
        with pytest.raises(ConfigError, match=f"got {got}$"):
            cfg.from_dict(cfg.BuildConfig, {**BASE, "teachers": [{"name": "a", **teacher}]})
    ok = cfg.from_dict(
        cfg.BuildConfig,
        {**BASE, "teachers": [{"name": "a", "factory": "m:f", "version": 2,
                               "resources": {"gpus_per_actor": 1, "group": "big"}}]},
    )  # fmt: skip
    assert ok.teachers[0].resources == cfg.ResourcesConfig(gpus_per_actor=1.0, group="big")


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


# -- issue 16: configs that fit their users' habits ----------------------------------------


def test_config_kinds_and_detection():
    kinds = cfg.config_kinds()
    assert kinds["build"] is cfg.BuildConfig and kinds["train"] is cfg.TrainConfig
    assert list(kinds)[:2] == ["build", "train"] and set(cfg.CONFIG_KINDS) <= set(kinds)
    assert cfg.detect_kind(BASE) == "build" and cfg.detect_kind(TRAIN) == "train"
    assert cfg.detect_kind({**TRAIN, "epochs": 2}) == "train"
    assert cfg.detect_kind({**BASE, "teachrs": []}) == "build"  # closest: validation says why
    with pytest.raises(ConfigError, match=r"cannot tell which kind of config x.yaml is .*--kind"):
        cfg.detect_kind({"nothing": 1}, "x.yaml")


def _write_module(directory, name, text):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.py").write_text(text)


@pytest.fixture
def fresh_modules():
    """Forget the test's own modules (and the config dirs load() learnt) afterwards."""
    import sys

    before, dirs = set(sys.modules), list(cfg._CONFIG_DIRS)
    yield
    for name in set(sys.modules) - before:
        if name.startswith("kdc16_"):
            del sys.modules[name]
    cfg._CONFIG_DIRS[:] = dirs


def test_import_object_finds_modules_in_the_cwd_and_beside_the_config(
    tmp_path, monkeypatch, fresh_modules
):
    import sys

    _write_module(tmp_path / "here", "kdc16_cwd", "def f():\n    return 'cwd'\n")
    _write_module(tmp_path / "conf", "kdc16_helper", "VALUE = 'sibling'\n")
    _write_module(
        tmp_path / "conf",
        "kdc16_beside",
        "import kdc16_helper\n\ndef f():\n    return kdc16_helper.VALUE\n",
    )
    monkeypatch.chdir(tmp_path / "here")
    path_before = list(sys.path)
    with pytest.raises(ConfigError, match=r"cannot import module 'kdc16_beside'.*looked on"):
        cfg.import_object("kdc16_beside:f")
    assert cfg.import_object("kdc16_cwd:f")() == "cwd"
    (tmp_path / "conf" / "c.json").write_text(
        json.dumps({**BASE, "dataset": {"factory": "kdc16_beside:f"}})
    )
    c = cfg.load(cfg.BuildConfig, str(tmp_path / "conf" / "c.json"))
    assert str(tmp_path / "conf") in cfg.search_dirs()
    assert cfg.search_dirs()[0] == str(tmp_path / "here")  # the cwd first
    assert cfg.import_object(c.dataset.factory)() == "sibling"  # its own sibling import too
    assert sys.path == path_before  # each directory was on sys.path only while importing
    assert cfg.import_object("kdcache.testing:toy_dataset").__name__ == "toy_dataset"


def test_import_object_reports_a_missing_dependency_of_a_found_module(
    tmp_path, monkeypatch, fresh_modules
):
    _write_module(tmp_path, "kdc16_broken", "import kdc16_not_installed\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"kdc16_broken.*found in .*kdc16_not_installed"):
        cfg.import_object("kdc16_broken:f")


def test_stream_batch_size_is_global_and_the_old_key_says_so():
    c = cfg.from_dict(cfg.TrainConfig, {**TRAIN, "stream": {"global_batch_size": 64}})
    assert c.stream.global_batch_size == 64
    old = r"^stream.batch_size \(64\) is now stream.global_batch_size: .*per rank\)$"
    with pytest.raises(ConfigError, match=old):
        cfg.from_dict(cfg.TrainConfig, {**TRAIN, "stream": {"batch_size": 64}})
    with pytest.raises(ConfigError, match=r"is now stream.global_batch_size"):
        cfg.from_dict(cfg.TrainConfig, cfg.apply_overrides(TRAIN, ["stream.batch_size=8"]))
    with pytest.raises(ConfigError, match=r"is now stream.global_batch_size"):
        cfg.StreamConfig(batch_size=8)  # type: ignore[call-arg]
    assert "batch_size" not in cfg.json_schema(cfg.StreamConfig)["properties"]


def test_an_override_of_epochs_or_max_steps_replaces_the_other(tmp_path):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({**TRAIN, "max_steps": 15}))
    c = cfg.load(cfg.TrainConfig, str(path), ["epochs=2"])
    assert (c.epochs, c.max_steps) == (2.0, None)
    path.write_text(json.dumps({**TRAIN, "epochs": 3}))
    c = cfg.load(cfg.TrainConfig, str(path), ["max_steps=7"])
    assert (c.epochs, c.max_steps) == (None, 7)
    c = cfg.load(cfg.TrainConfig, str(path), ["max_steps=null"])  # clearing clears nothing else
    assert (c.epochs, c.max_steps) == (3.0, None)
    with pytest.raises(ConfigError, match=r"give epochs \(1.0\) or max_steps \(2\), not both"):
        cfg.load(cfg.TrainConfig, str(path), ["epochs=1", "max_steps=2"])  # both: an error
    path.write_text(json.dumps({**TRAIN, "epochs": 3, "max_steps": 4}))
    with pytest.raises(ConfigError, match=r"drop one of them"):
        cfg.load(cfg.TrainConfig, str(path))
    # nested: the group is found by type, at any depth
    data = cfg.apply_overrides({"a": 1}, ["epochs=2"], cls=cfg.TrainConfig)
    assert data == {"a": 1, "epochs": 2}


@pytest.mark.parametrize(
    ("deepspeed", "message"),
    [
        (
            {"optimizer": {"type": "AdamW", "params": {"lr": 0.05}}},
            r"^TrainConfig: lr=0.01 and deepspeed.optimizer.params.lr=0.05 are both set: drop lr",
        ),
        ({"zero_optimization": {"stage": 1}}, r"lr=0.01 is given beside a deepspeed config"),
    ],
)
def test_lr_beside_a_deepspeed_config_is_an_error(deepspeed, message, tmp_path):
    assert cfg.from_dict(cfg.TrainConfig, TRAIN).lr is None  # the default config's 1e-3
    assert cfg.DEFAULT_LR == 1e-3
    assert cfg.from_dict(cfg.TrainConfig, {**TRAIN, "lr": 0.01}).lr == 0.01
    assert cfg.from_dict(cfg.TrainConfig, {**TRAIN, "deepspeed": deepspeed}).lr is None
    with pytest.raises(ConfigError, match=message):
        cfg.from_dict(cfg.TrainConfig, {**TRAIN, "deepspeed": deepspeed, "lr": 0.01})
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps(deepspeed))  # a DeepSpeed JSON file is read for the message
    with pytest.raises(ConfigError, match=message.replace("^TrainConfig: ", "")):
        cfg.from_dict(cfg.TrainConfig, {**TRAIN, "deepspeed": str(ds), "lr": 0.01})


@pytest.mark.parametrize(
    "uri", ["runs/x", "/abs/x", "file:///tmp/x", "s3://b/run", "s3://b/p?endpoint_override=h:1"]
)
def test_output_dir_accepts_what_a_cache_root_accepts(uri):
    assert cfg.from_dict(cfg.TrainConfig, {**TRAIN, "output_dir": uri}).output_dir == uri


@pytest.mark.parametrize("uri", ["memory://x", "ftp://host/x", "s3:/b/run", "s3://", ""])
def test_output_dir_with_an_unknown_scheme_is_refused(uri):
    with pytest.raises(ConfigError, match=r"^output_dir: .*(s3://, gs://|empty string)"):
        cfg.from_dict(cfg.TrainConfig, {**TRAIN, "output_dir": uri})


def test_remote_output_dir_stages_locally_and_the_same_for_every_rank(tmp_path):
    from kdcache.jobs.train import local_output_dir

    assert local_output_dir(str(tmp_path / "o")) == str(tmp_path / "o")
    assert local_output_dir(f"file://{tmp_path}/o") == str(tmp_path / "o")
    staged = local_output_dir("s3://b/run?endpoint_override=h:1")
    assert os.path.isabs(staged) and "s3:" not in staged
    assert staged == local_output_dir("s3://b/run?endpoint_override=h:1")
    assert staged != local_output_dir("s3://b/other")


def test_write_alias_refuses_to_move_unless_asked(tmp_path, caplog):
    from kdcache.stores.catalog import alias_target, write_alias

    root = str(tmp_path / "cache")
    a, b = "a" * 32, "b" * 32
    assert alias_target(root, "best") is None
    write_alias(root, "best", a, "entry", move=False)  # a new alias: nothing to move
    write_alias(root, "best", a, "entry", move=False)  # the same key: nothing to move
    with pytest.raises(ConfigError, match=rf"alias 'best' points at key {a}, not at {b}"):
        write_alias(root, "best", b, "entry", move=False)
    assert alias_target(root, "best") == a
    with caplog.at_level("WARNING", logger="kdcache.stores.catalog"):
        write_alias(root, "best", b, "entry")  # move=True, the default: re-pointed, logged
    assert alias_target(root, "best") == b and f"was {a}" in caplog.text


# -- issue 17: per-sample ensemble rules in configs ------------------------------------------

TWO = {
    **BASE,
    "teachers": [{"name": "a", "torchscript": "a.pt"}, {"name": "b", "torchscript": "b.pt"}],
}


def test_ensemble_config_takes_every_rule_with_its_parameters():
    from kdcache.targets import ALL_ENSEMBLE_RULES, EnsembleRule

    c = cfg.from_dict(
        cfg.BuildConfig, {**TWO, "ensemble": {"rule": "best_on_label", "fallback": "error"}}
    )
    assert c.ensemble.to_rule(["a", "b"]) == EnsembleRule("best_on_label", fallback="error")
    routed = {"rule": "route", "route_column": "domain", "routes": {"news": "b", "code": 0}}
    c = cfg.from_dict(cfg.BuildConfig, {**TWO, "ensemble": routed})
    assert dict(c.ensemble.to_rule(["a", "b"]).routes) == {"news": 1, "code": 0}
    for rule in ALL_ENSEMBLE_RULES:
        extra = {"route_column": "labels", "routes": {0: 1}} if rule == "route" else {}
        cfg.from_dict(cfg.BuildConfig, {**TWO, "ensemble": {"rule": rule, **extra}})


@pytest.mark.parametrize(
    ("ensemble", "message"),
    [
        ({"rule": "vote"}, r"^ensemble: rule must be one of \('mean_probs'"),
        ({"rule": "mean_probs", "fallback": "error"}, "^ensemble: [^:]*fallback"),
        ({"rule": "route", "route_column": "d"}, "^ensemble: rule 'route' needs routes"),
        ({"rule": "route", "routes": {"x": 0}}, "^ensemble: rule 'route' needs route_column"),
        ({"rule": "route", "routes": {"x": "c"}, "route_column": "d"}, "no teacher named 'c'"),
        ({"rule": "route", "routes": {"x": 5}, "route_column": "d"}, "^ensemble: .*5"),
        (
            {"rule": "route", "routes": {"0": "a", "news": "b"}, "route_column": "d"},
            r"^ensemble: routes: keys are all classes \(integers\) or all strings",
        ),
        ({"rule": "confidence_max", "weights": [1, 2, 3]}, "3 values for 2 teachers"),
    ],
)
def test_ensemble_config_errors_name_the_field(ensemble, message):
    with pytest.raises(ConfigError, match=message):
        cfg.from_dict(cfg.BuildConfig, {**TWO, "ensemble": ensemble})
