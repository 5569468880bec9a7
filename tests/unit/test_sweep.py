"""The sweep job without Ray: its config, the trials it draws, the temperature rule checked
before any trial starts, and the results table and plot."""

from __future__ import annotations

import csv
import logging
import sys

import pytest
import yaml

import kdcache
from kdcache.errors import ConfigError, SpecMismatchError
from kdcache.jobs import sweep
from kdcache.jobs.config import from_dict
from kdcache.testing import linear_teacher, toy_dataset

DATASET = {"factory": "kdcache.testing:toy_dataset", "kwargs": {"num_records": 40}}


def _train(cache=None):
    return {
        "student": {"factory": "torch.nn:Linear", "kwargs": {"in_features": 8, "out_features": 5}},
        "cache": {"uri": cache.key, "root": str(cache.root.uri)} if cache else {"uri": "k"},
        "dataset": DATASET,
        "eval_dataset": DATASET,
        "max_steps": 2,
    }


def _sweep(tmp_path, parameters, cache=None, **extra):
    data = {"train": _train(cache), "output_dir": str(tmp_path / "sweep"), "parameters": parameters}
    return from_dict(sweep.SweepConfig, {**data, **extra})


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("sweep") / "cache")
    ds = toy_dataset(num_records=40)

    def build(kind, params=None):
        return kdcache.build_cache(
            ds,
            linear_teacher(),
            temperature=2.0,
            root=root,
            executor="local",
            progress=False,
            kind=kind,
            params=params,
        )

    return {
        "dense": build("dense"),
        "sampled": build("sampled", {"num_samples": 4}),
        "topk": build("topk", {"k": 3, "grid_temperatures": [2.0, 4.0]}),
    }


# -- the config --------------------------------------------------------------------------


def test_load_reads_a_file_and_overrides_name_swept_keys(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "train": "train.yaml",
                "output_dir": "runs/sweep",
                "parameters": {"loss.alpha": [0.5, 0.9], "loss": {"kind": ["forward_kl"]}},
            }
        )
    )
    cfg = sweep.load_sweep(
        str(path), ["parameters.loss.alpha=[0.1,0.2,0.3]", "parameters.lr=[0.01]"]
    )
    assert cfg.parameters == {
        "loss.alpha": [0.1, 0.2, 0.3],
        "loss.kind": ["forward_kl"],
        "lr": [0.01],
    }
    assert (cfg.search, cfg.metric, cfg.mode, cfg.train) == (
        "grid",
        "eval/accuracy",
        "max",
        "train.yaml",
    )
    r = sweep.load_sweep(
        str(path), ["search=random", "num_samples=4", "parameters.lr={low: 0.001, high: 0.1}"]
    )
    assert r.parameters["lr"] == sweep.RangeConfig(0.001, 0.1)
    # nested mappings are dotted keys wherever the config comes from (kdcache config show)
    nested = _sweep(
        tmp_path, {"loss": {"alpha": [0.5], "kind": ["jsd"]}, "student.kwargs.hidden": [[8]]}
    )
    assert nested.parameters == {
        "loss.alpha": [0.5],
        "loss.kind": ["jsd"],
        "student.kwargs.hidden": [[8]],
    }


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"serach": "grid"}, "unknown key 'serach'; SweepConfig accepts: train, output_dir"),
        ({"num_samples": 1.5}, "num_samples: expected an integer, got 1.5"),
        ({"parameters": {"lr": "0.1"}}, "parameters.lr: expected a list or a mapping, got '0.1'"),
        ({"parameters": {"lr": {"low": 0.1, "hihg": 1}}}, "unknown key 'parameters.lr.hihg'"),
        (
            {"parameters": {"lr": {"low": 0.1, "high": 1.0}}},
            "parameters.lr: a {low, high} range needs search: random",
        ),
        ({"parameters": {"output_dir": ["a"]}}, "parameters.output_dir: a sweep sets output_dir"),
        ({"parameters": {"loss.alpha": []}}, "parameters.loss.alpha: give at least one value"),
        ({"num_samples": 4}, "num_samples is for search: random"),
        ({"search": "bayes"}, "search must be 'grid' or 'random', got 'bayes'"),
        ({"mode": "best"}, "mode must be 'max' or 'min'"),
    ],
)
def test_config_errors_name_the_dotted_path(tmp_path, extra, message):
    data = {"parameters": {"loss.alpha": [0.5]}, **extra}
    with pytest.raises(ConfigError) as info:
        _sweep(tmp_path, **data)
    assert message in str(info.value)


# -- the trials --------------------------------------------------------------------------


def test_grid_expands_to_every_combination_as_train_overrides(tmp_path):
    cfg = _sweep(tmp_path, {"loss.alpha": [0.5, 0.9], "loss.temperature": [2.0, 4.0]})
    assert sweep.expand_trials(cfg) == [
        {"loss.alpha": 0.5, "loss.temperature": 2.0},
        {"loss.alpha": 0.5, "loss.temperature": 4.0},
        {"loss.alpha": 0.9, "loss.temperature": 2.0},
        {"loss.alpha": 0.9, "loss.temperature": 4.0},
    ]
    trials = sweep.make_trials(cfg)
    assert [t.overrides for t in trials][1] == ["loss.alpha=0.5", "loss.temperature=4.0"]
    assert [(t.config.loss.alpha, t.config.loss.temperature) for t in trials] == [
        (0.5, 2.0),
        (0.5, 4.0),
        (0.9, 2.0),
        (0.9, 4.0),
    ]
    dirs = [t.config.output_dir for t in trials]
    assert dirs == [str(tmp_path / "sweep" / "trials" / f"trial-{i:03d}") for i in range(4)]
    assert trials[0].config.max_steps == 2  # the rest of the base config is kept


def test_student_size_and_small_learning_rates_survive_the_overrides(tmp_path):
    cfg = _sweep(
        tmp_path,
        {"student.kwargs.out_features": [5, 7], "lr": [1e-5], "loss.kind": ["jsd"]},
    )
    trials = sweep.make_trials(cfg)
    assert [t.config.student.kwargs for t in trials] == [
        {"in_features": 8, "out_features": 5},
        {"in_features": 8, "out_features": 7},
    ]
    assert trials[0].config.lr == 1e-5 and trials[0].config.loss.kind == "jsd"


def test_a_bad_trial_value_names_the_trial_and_the_path(tmp_path):
    cfg = _sweep(tmp_path, {"loss.alpha": [0.5, 1.5]})
    with pytest.raises(
        ConfigError, match=r"trial 1 \(loss.alpha=1.5\): loss.alpha must be in \[0, 1\]"
    ):
        sweep.make_trials(cfg)
    with pytest.raises(ConfigError, match=r"unknown key 'loss\.alhpa'"):
        sweep.make_trials(_sweep(tmp_path, {"loss.alhpa": [0.5]}))
    bad_base = _sweep(tmp_path, {"loss.alpha": [0.5]}, train={**_train(), "ray": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"train\.ray\.enabled"):
        sweep.make_trials(bad_base)


def test_random_search_is_seeded_and_stays_in_its_ranges(tmp_path):
    params = {
        "lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "loss.alpha": {"low": 0.2, "high": 0.8},
        "loss.kind": ["forward_kl", "reverse_kl"],
    }
    a = sweep.expand_trials(_sweep(tmp_path, params, search="random", num_samples=50, seed=3))
    b = sweep.expand_trials(_sweep(tmp_path, params, search="random", num_samples=50, seed=3))
    c = sweep.expand_trials(_sweep(tmp_path, params, search="random", num_samples=50, seed=4))
    assert a == b and a != c and len(a) == 50
    assert all(1e-4 <= t["lr"] <= 1e-2 and 0.2 <= t["loss.alpha"] <= 0.8 for t in a)
    assert {t["loss.kind"] for t in a} == {"forward_kl", "reverse_kl"}
    assert sum(t["lr"] < 1e-3 for t in a) > 10  # log-uniform: half the draws below 1e-3
    assert len(sweep.make_trials(_sweep(tmp_path, params, search="random", num_samples=3))) == 3


# -- the temperature rule ----------------------------------------------------------------


def test_dense_caches_re_temper_to_any_temperature(tmp_path, caches):
    cfg = _sweep(tmp_path, {"loss.temperature": [1.0, 2.0, 3.5]}, cache=caches["dense"])
    assert sweep.check_cache(sweep.make_trials(cfg)).key == caches["dense"].key


def test_a_sampled_cache_refuses_another_temperature_before_any_trial(
    tmp_path, caches, monkeypatch
):
    cfg = _sweep(tmp_path, {"loss.temperature": [2.0, 3.0]}, cache=caches["sampled"])

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started although the sweep is refused")

    monkeypatch.setattr(sweep, "_connect", no_ray)
    with pytest.raises(SpecMismatchError) as info:
        sweep.run_sweep(cfg)
    text = str(info.value)
    assert "temperature(s) [3.0]" in text and "no trial was started" in text
    assert "sampled entries cannot be re-tempered" in text
    assert not (tmp_path / "sweep").exists()
    # at the cache's own temperature a sampled cache is fine
    same = _sweep(tmp_path, {"loss.alpha": [0.5, 0.9]}, cache=caches["sampled"])
    sweep.check_cache(sweep.make_trials(same))


def test_a_top_k_cache_re_tempers_only_to_its_grid(tmp_path, caches):
    ok = _sweep(tmp_path, {"loss.temperature": [2.0, 4.0]}, cache=caches["topk"])
    sweep.check_cache(sweep.make_trials(ok))
    bad = _sweep(tmp_path, {"loss.temperature": [3.0, 4.0, 5.0]}, cache=caches["topk"])
    with pytest.raises(SpecMismatchError) as info:
        sweep.check_cache(sweep.make_trials(bad))
    text = str(info.value)
    assert "temperature(s) [3.0, 5.0]" in text
    assert "temperature 3.0 is not in the entry's grid (2.0, 4.0)" in text
    assert "temperature 5.0 is not in the entry's grid (2.0, 4.0)" in text
    assert "4.0 is not" not in text
    # a temperature fixed in the base config is checked too, even when not swept
    base = {**_train(caches["topk"]), "loss": {"temperature": 3.0}}
    fixed = _sweep(tmp_path, {"loss.alpha": [0.5]}, train=base)
    with pytest.raises(SpecMismatchError, match=r"temperature 3\.0 is not in the entry's grid"):
        sweep.check_cache(sweep.make_trials(fixed))
    # hard-label trials read no soft targets, so their temperature is not checked
    hard = {**_train(caches["topk"]), "loss": {"temperature": 3.0, "kind": "cross_entropy"}}
    sweep.check_cache(sweep.make_trials(_sweep(tmp_path, {"lr": [0.01]}, train=hard)))


def test_a_token_cache_refuses_another_temperature(caches):
    with pytest.raises(
        SpecMismatchError, match="token-level cache streams soft targets at its own"
    ):
        sweep.check_temperatures(caches["dense"], [3.0], layout="tokens")
    sweep.check_temperatures(caches["dense"], [2.0], layout="tokens")


# -- the table and the plot --------------------------------------------------------------


def _rows():
    return [
        {"trial": "trial-000", "loss.kind": "forward_kl", "student.kwargs.hidden": [16], "lr": 0.01,
         "eval/cross_entropy": 1.25, "eval/accuracy": 0.5, "steps": 2, "wall_s": 3.5,
         "status": "ok", "output_dir": "/o/trial-000"},
        {"trial": "trial-001", "loss.kind": "jsd", "student.kwargs.hidden": [64], "lr": 0.1,
         "eval/cross_entropy": 1.0, "eval/accuracy": 0.75, "steps": 2, "wall_s": 4.0,
         "status": "ok", "output_dir": "/o/trial-001"},
        {"trial": "trial-002", "loss.kind": "jsd", "student.kwargs.hidden": [64], "lr": 1.0,
         "steps": None, "wall_s": None, "status": "error: boom", "output_dir": "/o/trial-002"},
    ]  # fmt: skip


def test_table_columns_csv_and_terminal(tmp_path):
    params = ["loss.kind", "student.kwargs.hidden", "lr"]
    columns = sweep.table_columns(_rows(), params)
    assert columns == [
        "trial", *params, "eval/accuracy", "eval/cross_entropy", "steps", "wall_s", "status",
        "output_dir",
    ]  # fmt: skip
    path = sweep.write_table(_rows(), columns, str(tmp_path / "results.csv"))
    with open(path, newline="") as f:
        got = list(csv.DictReader(f))
    assert len(got) == 3 and list(got[0]) == columns
    assert got[1]["student.kwargs.hidden"] == "[64]" and float(got[1]["eval/accuracy"]) == 0.75
    assert got[2]["eval/accuracy"] == "" and got[2]["status"] == "error: boom"
    text = sweep.format_table(_rows(), columns).splitlines()
    assert len(text) == 5 and text[0].startswith("trial") and set(text[1]) <= {"-", " "}
    assert text[3].index("0.75") == text[0].index("eval/accuracy")  # aligned columns
    assert "[64]" in text[3]


def test_plot_has_one_panel_per_swept_value(tmp_path):
    path = sweep.plot_sweep(
        _rows(),
        ["loss.kind", "student.kwargs.hidden", "lr"],
        "eval/accuracy",
        str(tmp_path / "a.png"),
    )
    assert path is not None
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_plot_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.WARNING, logger="kdcache.jobs.sweep"):
        assert sweep.plot_sweep(_rows(), ["lr"], "eval/accuracy", str(tmp_path / "a.png")) is None
    assert "matplotlib is not installed" in caplog.text
    assert not (tmp_path / "a.png").exists()
