"""The `kdcache` command's cache tools, run in-process."""

from __future__ import annotations

import json
import os

import pytest

import kdcache
from kdcache.cli import main
from kdcache.testing import linear_teacher, toy_dataset


@pytest.fixture
def view(root):
    teachers = [linear_teacher(seed=s) for s in range(2)]
    return kdcache.build_cache(
        toy_dataset(), teachers, temperature=2.0, root=root, executor="local", progress=False
    )


def test_ls_inspect_alias(view, root, capsys):
    assert main(["ls", root]) == 0
    out = capsys.readouterr().out
    assert out.count("complete") == 2 and view.key in out
    assert main(["inspect", view.key, "--root", root]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["kind"] == "ensemble" and info["num_rows"] == 64 and len(info["teachers"]) == 2
    assert len(info["samples"]) == 3
    probs = info["samples"][0]["top_probs"]  # probabilities (not logits), best first
    assert all(0 <= p <= 1 for p in probs) and probs == sorted(probs, reverse=True)
    assert sum(probs) <= 1 + 1e-3
    assert main(["alias", root, "mine", view.key]) == 0
    capsys.readouterr()
    assert main(["inspect", "mine", "--root", root, "--samples", "0"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] == view.key


def test_verify_ok_then_fault_named_with_nonzero_exit(view, root, capsys):
    assert main(["verify", view.key, "--root", root]) == 0
    assert "8 shard(s), 128 row(s): ok" in capsys.readouterr().out
    victim = view.entries[1]
    path = os.path.join(victim.shards_location.uri, "shard-00003.arrow")
    with open(path, "r+b") as f:
        f.seek(200)
        f.write(b"\x00\x01\x02")
    assert main(["verify", view.key, "--root", root]) == 1
    out = capsys.readouterr().out
    assert f"FAULT {victim.key}/shard-00003.arrow" in out


def test_unknown_name_is_a_clear_error(root, capsys):
    os.makedirs(root)
    assert main(["inspect", "nope", "--root", root]) == 2
    assert "kdcache ls" in capsys.readouterr().err


def test_version_flag_prints_the_version_and_exits_zero(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"kdcache {kdcache.__version__}"
    # `python -m kdcache --version`, as a user types it
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "kdcache", "--version"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"kdcache {kdcache.__version__}"


_TRAIN_CONFIG = {
    "output_dir": "out",
    "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
    "cache": {"uri": "toy"},
    "dataset": {"factory": "kdcache.testing:toy_dataset"},
    "max_steps": 15,
}


def test_config_show_prints_the_resolved_config_as_yaml(tmp_path, capsys):
    import yaml

    from kdcache.jobs import config as cfg

    path = tmp_path / "train.json"
    path.write_text(json.dumps(_TRAIN_CONFIG))
    assert main(["config", "show", str(path), "epochs=2", "loss.alpha=0.5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"# kdcache config show: train config {path}")
    shown = yaml.safe_load(out)
    assert shown["epochs"] == 2.0 and shown["max_steps"] is None  # the override replaced it
    assert shown["loss"]["alpha"] == 0.5 and shown["stream"]["global_batch_size"] == 128
    assert cfg.from_dict(cfg.TrainConfig, shown) == cfg.load(
        cfg.TrainConfig, str(path), ["epochs=2", "loss.alpha=0.5"]
    )  # what it prints is the config the job runs
    build = tmp_path / "build.yaml"
    build.write_text(
        "root: cache\ndataset: {factory: 'kdcache.testing:toy_dataset'}\n"
        "teachers: [{name: a, torchscript: a.pt}]\n"
    )
    topk = ["targets.kind=topk", "targets.params={k: 8}"]
    assert main(["config", "show", str(build), "--kind", "build", *topk]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["targets"]["kind"] == "topk" and shown["targets"]["temperature"] == 4.0
    assert main(["config", "show", str(build)]) == 0  # told from the keys
    assert yaml.safe_load(capsys.readouterr().out)["executor"]["kind"] == "ray"


def test_config_show_errors_exit_2(tmp_path, capsys):
    path = tmp_path / "odd.json"
    path.write_text(json.dumps({"something": 1}))
    assert main(["config", "show", str(path)]) == 2
    assert "pass --kind build|train" in capsys.readouterr().err
    path.write_text(json.dumps({**_TRAIN_CONFIG, "stream": {"batch_size": 16}}))
    assert main(["config", "show", str(path)]) == 2
    assert "is now stream.global_batch_size" in capsys.readouterr().err
    assert main(["config", "show", str(path), "--kind", "nope"]) == 2
    assert "unknown kind of config 'nope'" in capsys.readouterr().err


def test_config_schema_of_one_kind_or_all(capsys):
    from kdcache.jobs import config as cfg

    assert main(["config", "schema", "train"]) == 0
    train = json.loads(capsys.readouterr().out)
    assert train == json.loads(json.dumps(cfg.json_schema(cfg.TrainConfig)))
    assert "global_batch_size" in train["$defs"]["StreamConfig"]["properties"]
    assert main(["config", "schema"]) == 0
    every = json.loads(capsys.readouterr().out)
    assert list(every) == list(cfg.config_kinds()) and every["train"] == train
    assert {"build", "train"} <= set(every) and "teachers" in every["build"]["properties"]
    try:
        import kdcache.jobs.sweep  # noqa: F401  (being written beside this: listed once it is)
    except ImportError:
        pass
    else:
        assert "sweep" in every


def test_combine_stores_the_views_combination_once_then_hits(view, root, capsys):
    assert main(["combine", view.key, "--root", root, "--temperature", "1", "--no-progress"]) == 0
    out = capsys.readouterr().out
    entry = view.combined_entry(1.0)
    assert f"entry {entry.key} complete in" in out and "mean_probs of 2 teachers" in out
    assert entry.is_complete and entry.is_combined
    assert main(["combine", view.key, "--root", root, "--temperature", "1", "--no-progress"]) == 0
    assert "exists (a hit)" in capsys.readouterr().out
    assert main(["verify", entry.key, "--root", root]) == 0
    capsys.readouterr()
    # one teacher's entry has nothing to combine: a clear error, exit 2
    assert main(["combine", view.entries[0].key, "--root", root]) == 2
    assert "not an ensemble view: there is nothing to combine" in capsys.readouterr().err
