"""kdcache.jobs.submit without a cluster: what a job would carry, and its entrypoint."""

from __future__ import annotations

import doctest
import json
import os
import shlex

import pytest
import yaml

import kdcache
from kdcache.cli.job import job_main
from kdcache.errors import ConfigError
from kdcache.jobs.submit import (
    CONFIG_ENV,
    DEFAULT_EXCLUDES,
    SHIP_DIR,
    _placed,
    job_spec,
    resolve_address,
    uploaded,
)

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


def test_build_job_runs_the_visible_command_on_the_config_where_it_is(tmp_path):
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
    assert env["pip"] == ["zarr>=3"] and env["env_vars"] == {"AWS_REGION": "us-west-2"}
    # the command a Ray user would type: the config by its path in the working dir, the
    # overrides on the command line, and the submitter's Ray address dropped there
    assert spec.entrypoint == (
        "kdcache build build.yaml targets.temperature=2.5 executor.address=null"
    )
    assert spec.config_file == "build.yaml" and spec.shipped == {}
    assert spec.config["targets"]["temperature"] == 2.5
    assert spec.config["executor"]["address"] is None
    assert spec.submission_id.startswith("kdcache-build-")
    python = job_spec("build", path, working_dir=str(tmp_path), python="/opt/py/bin/python3")
    assert shlex.split(python.entrypoint)[:4] == [
        "/opt/py/bin/python3",
        "-m",
        "kdcache.cli",
        "build",
    ]


def _ray_keeps(root, relative, excludes=DEFAULT_EXCLUDES):
    """Whether Ray's own packaging (not kdcache's reading of it) uploads ``relative``."""
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    seen = set()
    _dir_travel(
        root,
        [_get_excludes(root, list(excludes))],
        lambda p: seen.add(p.relative_to(root).as_posix()),
        include_gitignore=True,
    )
    return relative in seen


def test_a_config_ray_would_not_upload_travels_as_a_copy_for_the_upload_only(tmp_path):
    pytest.importorskip("ray")
    work = tmp_path / "work"
    (work / "runs" / "demo").mkdir(parents=True)
    (work / ".gitignore").write_text("/runs/\n")
    ignored = _write(work / "runs" / "demo", "build.yaml", BUILD)
    assert not uploaded(str(work), "runs/demo/build.yaml", DEFAULT_EXCLUDES)
    assert not _ray_keeps(work, "runs/demo/build.yaml")  # what Ray does, checked
    spec = job_spec("build", ignored, working_dir=str(work), submission_id="kdcache-build-x1")
    assert spec.config_file == f"{SHIP_DIR}/kdcache-build-x1/build.yaml"
    assert spec.entrypoint == f"kdcache build {spec.config_file} executor.address=null"
    assert spec.shipped == {spec.config_file: ignored}
    with _placed(spec):
        assert (work / spec.config_file).read_text() == (work / "runs/demo/build.yaml").read_text()
        assert _ray_keeps(work, spec.config_file)
    assert sorted(os.listdir(work)) == [".gitignore", "runs"]  # nothing left behind
    # a config outside the working directory travels the same way
    outside = _write(tmp_path, "train.yaml", TRAIN)
    spec = job_spec("train", outside, working_dir=str(work))
    assert spec.config_file.startswith(f"{SHIP_DIR}/kdcache-train-")
    assert spec.config_file.endswith("/train.yaml") and spec.shipped == {spec.config_file: outside}


def test_a_working_dir_that_ignores_the_ship_dir_is_refused_before_upload(tmp_path):
    pytest.importorskip("ray")
    (tmp_path / ".gitignore").write_text(".*\n/runs/\n")
    (tmp_path / "runs").mkdir()
    path = _write(tmp_path / "runs", "build.yaml", BUILD)
    with pytest.raises(ConfigError, match=r"!\.kdcache-jobs/"):
        job_spec("build", path, working_dir=str(tmp_path))


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
    env = job_spec(
        "build", path, runtime_env=base, pip=["y"], env_vars={"B": "2"}, working_dir=str(tmp_path)
    )
    assert env.runtime_env["env_vars"] == {"A": "1", "B": "2"}
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
    from kdcache.cli.app import build_parser
    from kdcache.jobs import config as cfg

    path = _write(tmp_path, "train.yaml", TRAIN)
    spec = job_spec(
        "train", path, workers=4, use_gpu=True, cpus_per_worker=2, working_dir=str(tmp_path)
    )
    assert spec.config["ray"]["num_workers"] == 4
    # what the job runs: `kdcache train train.yaml ray.enabled=true ...`, parsed and
    # loaded as the cluster will
    argv = shlex.split(spec.entrypoint)
    assert argv[:3] == ["kdcache", "train", "train.yaml"]
    args, rest = build_parser().parse_known_args(argv[1:])
    assert not rest
    ray = cfg.load(cfg.TrainConfig, str(tmp_path / args.config), args.overrides).ray
    assert ray.enabled is True and ray.num_workers == 4
    assert ray.use_gpu is True and ray.cpus_per_worker == 2.0
    plain = job_spec("train", path, working_dir=str(tmp_path))
    assert plain.entrypoint == "kdcache train train.yaml"  # the README's line, as typed


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
    # the entrypoint `kdcache submit` sends now, run here in the working directory
    from kdcache.cli.app import main

    (tmp_path / "runs").mkdir()
    (tmp_path / ".gitignore").write_text("/runs/\n")
    spec = job_spec("build", _write(tmp_path / "runs", "b.yaml", config), working_dir=".")
    argv = shlex.split(spec.entrypoint)
    assert argv[:2] == ["kdcache", "build"] and argv[2].startswith(SHIP_DIR)
    with _placed(spec):
        assert main(argv[1:]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["hit"] is True
    assert not (tmp_path / SHIP_DIR).exists()


# -- secrets: nothing a job carries (entrypoint, metadata, runtime_env: what the Jobs API
# shows and the logs echo) may hold a credential; refused before anything is sent, with
# the value redacted in the message.

SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"


def _refused(match, *args, **kwargs):
    with pytest.raises(ConfigError, match=match) as info:
        job_spec(*args, **kwargs)
    message = str(info.value)
    assert SECRET not in message, message  # the message never shows the secret
    assert "docs/security.md" in message  # ... and says what to do instead
    return message


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_ACCESS_KEY_ID",
        "HF_TOKEN",
        "WANDB_API_KEY",
        "RAY_AUTH_TOKEN",
        "DB_PASSWORD",
        "AZURE_STORAGE_CONNECTION_STRING",
    ],
)
def test_secret_env_vars_are_refused_from_env_and_runtime_env(tmp_path, name):
    path = _write(tmp_path, "build.yaml", BUILD)
    msg = _refused(name, "build", path, working_dir=str(tmp_path), env_vars={name: SECRET})
    assert "Jobs API" in msg and "env_vars" in msg
    base = {"env_vars": {name: SECRET}}
    _refused(name, "build", path, working_dir=str(tmp_path), runtime_env=base)


def test_ordinary_env_vars_pass():
    from kdcache.jobs.submit import secret_name

    for name in (
        "AWS_REGION",
        "AWS_PROFILE",
        "AWS_DEFAULT_REGION",
        "TOKENIZERS_PARALLELISM",
        "MAX_TOKENS",
        "OMP_NUM_THREADS",
        "KDCACHE_JOB_CONFIG",
    ):
        assert not secret_name(name), name


@pytest.mark.parametrize(
    "uri",
    [
        f"s3://AKIAIOSFODNN7EXAMPLE:{SECRET}@bucket/cache",
        f"s3://bucket/cache?region=us-east-1&secret_key={SECRET}&access_key=AKIA",
        f"s3://bucket/cache?session_token={SECRET}",
        f"abfs://container@account.dfs.core.windows.net/c?sig={SECRET}",
        f"https://{SECRET}@storage.example.com/cache",
    ],
)
def test_credentials_in_a_uri_are_refused_in_the_config_and_the_overrides(tmp_path, uri):
    in_file = _write(tmp_path, "build.yaml", {**BUILD, "root": uri})
    msg = _refused("root holds credentials", "build", in_file, working_dir=str(tmp_path))
    assert "***" in msg  # redacted, not dropped: the user sees which URI
    plain = _write(tmp_path, "plain.yaml", BUILD)
    _refused("root holds credentials", "build", plain, [f"root={uri}"], working_dir=str(tmp_path))
    train = _write(tmp_path, "train.yaml", TRAIN)
    _refused(
        "output_dir holds credentials",
        "train",
        train,
        [f"output_dir={uri}"],
        working_dir=str(tmp_path),
    )
    _refused(
        "AWS_CONFIG holds credentials",
        "build",
        plain,
        working_dir=str(tmp_path),
        env_vars={"AWS_CONFIG": uri},
    )


def test_credentials_in_pip_and_runtime_env_and_secret_config_keys_are_refused(tmp_path):
    path = _write(tmp_path, "build.yaml", BUILD)
    index = f"--index-url=https://deploy:{SECRET}@pypi.example.com/simple"
    _refused(
        "runtime_env pip.0 holds credentials", "build", path, pip=[index], working_dir=str(tmp_path)
    )
    _refused(
        "runtime_env py_modules.0 holds credentials",
        "build",
        path,
        working_dir=str(tmp_path),
        runtime_env={"py_modules": [f"s3://k:{SECRET}@bucket/mod.zip"]},
    )
    keyed = {**BUILD, "dataset": {"factory": "mypkg:load", "kwargs": {"hf_token": SECRET}}}
    _refused(
        "dataset.kwargs.hf_token",
        "build",
        _write(tmp_path, "k.yaml", keyed),
        working_dir=str(tmp_path),
    )


def test_refusal_messages_name_what_and_what_to_do_and_ordinary_jobs_pass(tmp_path):
    """What ``job_spec`` lets through holds nothing secret: everything the Jobs API would
    show (entrypoint, metadata, runtime_env) is checked once more here."""
    from kdcache.jobs.submit import credentials_in, redact

    lm = {**BUILD, "dataset": {"factory": "mypkg:load", "kwargs": {"eos_token": "</s>"}}}
    spec = job_spec(
        "build",
        _write(tmp_path, "lm.yaml", lm),
        ["root=s3://bucket/cache?endpoint_override=127.0.0.1:9000&scheme=http&region=x"],
        working_dir=str(tmp_path),
        env_vars={"AWS_PROFILE": "kd", "TOKENIZERS_PARALLELISM": "false"},
        pip=["git+ssh://git@github.com/org/pkg.git", "zarr>=3"],
    )
    shown = json.dumps([spec.entrypoint, spec.metadata, spec.runtime_env])
    assert not credentials_in(shown)
    assert "endpoint_override=127.0.0.1:9000" in spec.entrypoint  # ordinary options travel
    assert redact(f"s3://k:{SECRET}@b/p?region=x&secret_key={SECRET}") == (
        "s3://***@b/p?region=x&secret_key=***"
    )


def test_a_job_server_address_with_credentials_is_refused(monkeypatch):
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN") as info:
        resolve_address(f"http://admin:{SECRET}@head:8265")
    assert SECRET not in str(info.value) and "http://***@head:8265" in str(info.value)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", f"https://{SECRET}@head:8265")
    with pytest.raises(ConfigError, match="holds credentials"):
        resolve_address(None)


def test_doctests_run():
    from kdcache.jobs import submit

    assert doctest.testmod(submit).failed == 0
