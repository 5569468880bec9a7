"""Configs of the language-model path: token datasets from text (``dataset.text``),
Hugging Face causal-LM teachers and students, hard-label students without a cache, and
the errors a mistyped or inconsistent config gets (each naming its key)."""

from __future__ import annotations

import sys
import types

import pytest

from kdcache.errors import ConfigError
from kdcache.jobs import config as cfg

TEXT = {"paths": ["data/fortunes.txt"], "tokenizer": "runs/tok"}


def _build(**changes):
    data = {
        "root": "cache",
        "dataset": {"text": dict(TEXT)},
        "teachers": [{"name": "gpt", "hf": "teacher", "task": "causal-lm"}],
        "targets": {"kind": "topk", "params": {"k": 16}},
    }
    data.update(changes)
    return data


def _train(**changes):
    data = {
        "output_dir": "out",
        "student": {"hf_config": "student/config.json"},
        "dataset": {"text": dict(TEXT)},
        "cache": {"uri": "abc", "root": "cache"},
    }
    data.update(changes)
    return data


def test_text_dataset_passes_only_the_options_it_gives(monkeypatch, tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    made = []

    class FakeTextDataset:
        layout = "tokens"

        def __init__(self, paths, **options):
            made.append((paths, options))

    monkeypatch.setitem(
        sys.modules, "kdcache.data.text", types.SimpleNamespace(TextDataset=FakeTextDataset)
    )
    text = {**TEXT, "tokenizer": str(tmp_path), "max_tokens": 64, "add_eos": False}
    c = cfg.from_dict(cfg.BuildConfig, _build(dataset={"text": text}))
    assert isinstance(c.dataset.build(), FakeTextDataset)
    assert made == [
        (["data/fortunes.txt"], {"tokenizer": str(tmp_path), "max_tokens": 64, "add_eos": False})
    ]
    # the agreed keys all parse, and the config round-trips
    full = {
        **TEXT,
        "format": "jsonl",
        "text_field": "text",
        "prompt_field": None,
        "completion_field": None,
        "messages_field": None,
        "record_separator": "\n",
        "id_field": "id",
        "max_tokens": 512,
        "truncation": "right",
        "add_eos": True,
        "num_shards": 8,
    }
    c = cfg.from_dict(cfg.BuildConfig, _build(dataset={"text": full}))
    assert cfg.from_dict(cfg.BuildConfig, cfg.to_dict(c)) == c
    assert c.dataset.text.options()["id_field"] == "id"


def test_the_targets_pass_through_to_target_spec():
    c = cfg.from_dict(
        cfg.BuildConfig,
        _build(targets={"kind": "sampled", "params": {"num_samples": 32, "seed": 0}}),
    )
    assert c.targets.kind == "sampled" and dict(c.targets.params) == {"num_samples": 32, "seed": 0}
    with pytest.raises(ConfigError, match="targets"):
        cfg.from_dict(cfg.BuildConfig, _build(targets={"kind": "no-such-kind"}))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ({**TEXT, "max_token": 64}, "dataset.text.max_token"),
        ({**TEXT, "truncation": "left"}, "text.truncation"),
        ({**TEXT, "format": "csv"}, "text.format"),
        ({**TEXT, "max_tokens": 1}, "text.max_tokens"),
        ({**TEXT, "num_shards": 0}, "text.num_shards"),
        ({**TEXT, "paths": []}, "text.paths"),
        ({"paths": ["a.txt"]}, "dataset.text.tokenizer"),
    ],
)
def test_a_bad_text_dataset_names_its_key(text, where):
    with pytest.raises(ConfigError, match=where.replace(".", r"\.")):
        cfg.from_dict(cfg.BuildConfig, _build(dataset={"text": text}))


def test_text_beside_path_or_file_options_is_refused():
    with pytest.raises(ConfigError, match=r"give one of path.*got path and text"):
        cfg.from_dict(cfg.BuildConfig, _build(dataset={"text": TEXT, "path": "x.parquet"}))
    with pytest.raises(ConfigError, match="input_columns beside text"):
        cfg.from_dict(cfg.BuildConfig, _build(dataset={"text": TEXT, "input_columns": "x"}))


def test_a_token_dataset_with_a_classifier_teacher_names_the_teachers_task():
    with pytest.raises(ConfigError) as exc:
        cfg.from_dict(cfg.BuildConfig, _build(teachers=[{"name": "bert", "hf": "teacher"}]))
    msg = str(exc.value)
    assert "teachers.0.task" in msg and "'bert'" in msg and "(the default of hf teachers)" in msg
    assert "teachers.0.task=causal-lm" in msg


def test_a_missing_tokenizer_names_the_key(tmp_path):
    c = cfg.from_dict(cfg.BuildConfig, _build())
    with pytest.raises(ConfigError, match=r"dataset\.text\.tokenizer: runs/tok does not exist"):
        c.dataset.build()
    (tmp_path / "README").write_text("no tokenizer here")
    c = cfg.from_dict(
        cfg.BuildConfig, _build(dataset={"text": {**TEXT, "tokenizer": str(tmp_path)}})
    )
    with pytest.raises(ConfigError, match="holds no tokenizer file"):
        c.dataset.text.check_tokenizer()
    with pytest.raises(ConfigError, match=r"student\.tokenizer: nowhere does not exist"):
        cfg.StudentConfig(hf_config=str(tmp_path), tokenizer="nowhere").tokenizer_path()


@pytest.mark.parametrize(
    ("student", "match"),
    [
        ({}, r"give one of factory.*got none"),
        ({"factory": "m:f", "hf_config": "c.json"}, "got factory and hf_config"),
        ({"hf_config": "c.json", "kwargs": {"n_layer": 2}}, "student.kwargs apply to a factory"),
        ({"hf": "dir", "tokenizerr": "t"}, r"student\.tokenizerr"),
    ],
)
def test_a_bad_student_names_its_key(student, match):
    with pytest.raises(ConfigError, match=match):
        cfg.from_dict(cfg.TrainConfig, _train(student=student))


def test_a_missing_student_config_names_the_key(tmp_path):
    pytest.importorskip("transformers")
    c = cfg.from_dict(cfg.TrainConfig, _train(student={"hf_config": str(tmp_path / "none")}))
    with pytest.raises(ConfigError, match=r"student\.hf_config: .* does not exist"):
        c.student.build()


def test_the_student_tokenizer_defaults_to_its_directory_then_the_dataset(tmp_path):
    c = cfg.from_dict(cfg.TrainConfig, _train(student={"hf_config": str(tmp_path)}))
    assert c.student.tokenizer_path(c.dataset) == "runs/tok"  # the dataset's
    (tmp_path / "tokenizer.json").write_text("{}")
    assert c.student.tokenizer_path(c.dataset) == str(tmp_path)  # its own directory
    assert c.student.is_hf and not cfg.StudentConfig(factory="m:f").is_hf


def test_hard_labels_need_no_cache_but_a_distilled_student_does():
    data = _train()
    del data["cache"]
    with pytest.raises(ConfigError, match="cache: required for a distilled student"):
        cfg.from_dict(cfg.TrainConfig, data)
    c = cfg.from_dict(cfg.TrainConfig, {**data, "loss": {"alpha": 0.0}})
    assert c.cache is None
    assert cfg.from_dict(cfg.TrainConfig, {**data, "loss": {"kind": "cross_entropy"}}).cache is None
    assert cfg.detect_kind(data) == "train"
    # an override back to hard labels on a distilled config
    assert (
        cfg.from_dict(
            cfg.TrainConfig, cfg.apply_overrides(_train(), ["cache=null", "loss.alpha=0"])
        ).cache
        is None
    )
