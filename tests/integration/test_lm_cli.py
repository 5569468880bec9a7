"""The language-model path from config files through the ``kdcache`` command, in process:
``kdcache build`` (Hugging Face causal-LM teacher, per-token top-k targets; a second build
is a cache hit), ``kdcache train`` (a GPT-2 student from a ``config.json``, the token
stream and loss, validation perplexity), and the export: the student loads with
``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` from the output directory and
gives exactly the logits of the trained module. A student whose tokenizer differs from
the teachers' is refused before any training.

Everything is tiny and made here: a few hundred short lines, a byte-level BPE tokenizer
(``pipelines/bpe.py``), a random GPT-2 teacher saved with ``save_pretrained``; the teacher
stage runs on the local executor. The token dataset comes from a factory beside the
config, and also from ``dataset.text`` (``kdcache.data.text.TextDataset``) where that
module exists.
"""

from __future__ import annotations

import importlib.util
import json
import textwrap

import numpy as np
import pytest
import torch
import yaml

import kdcache.jobs.train as train_job
from kdcache.cli import main
from pipelines.bpe import save_tokenizer, train_bpe_tokenizer

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.integration

PAD, EOS = "<|pad|>", "<|endoftext|>"
WORDS = "the cat sat on a mat while dogs ran far away from home and birds sang".split()

FACTORY = '''
from kdcache.data.tokens import encode_texts, tokenizer_files_sha256


def tiny_corpus(path, tokenizer, max_tokens=24, num_shards=3):
    """One record a line of PATH, tokenized with the tokenizer in directory TOKENIZER."""
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(tokenizer + "/tokenizer.json")
    with open(path) as f:
        records = [(i, line.rstrip("\\n")) for i, line in enumerate(f) if line.strip()]
    return encode_texts(
        tok,
        records,
        max_tokens=max_tokens,
        eos_token_id=tok.token_to_id("<|endoftext|>"),
        pad_token_id=tok.token_to_id("<|pad|>"),
        num_shards=num_shards,
        preprocessing={"tokenizer_files_sha256": tokenizer_files_sha256(tokenizer)},
    )
'''


def _lines(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(3, 9)))) for _ in range(n)]


def _tokenizer(directory, texts: list[str], vocab_size: int):
    """A trained BPE tokenizer, saved in ``directory`` (returned)."""
    tok = train_bpe_tokenizer(texts, vocab_size)
    save_tokenizer(tok, str(directory), pad_token=PAD, eos_token=EOS)
    return tok


def _gpt2(vocab_size: int, seed: int, **arch: int):
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab_size,
        n_positions=32,
        n_embd=arch.get("n_embd", 32),
        n_layer=arch.get("n_layer", 1),
        n_head=2,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=1,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg)


def _last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def lm_files(tmp_path_factory):
    """Corpus, tokenizer, a teacher directory and a student config.json."""
    tmp = tmp_path_factory.mktemp("lm")
    train, val = _lines(300, 0), _lines(40, 1)
    (tmp / "train.txt").write_text("\n".join(train) + "\n")
    (tmp / "validation.txt").write_text("\n".join(val) + "\n")
    tok = str(tmp / "tokenizer")
    vocab = _tokenizer(tok, train, 300).get_vocab_size()
    teacher = tmp / "teacher"
    _gpt2(vocab, seed=1, n_embd=48, n_layer=2).save_pretrained(teacher)
    _tokenizer(teacher, train, 300)  # the same tokenizer files as the data's
    student = tmp / "student"
    _gpt2(-(-vocab // 64) * 64, seed=2).config.save_pretrained(student)  # a padded head
    (tmp / "lm_data.py").write_text(textwrap.dedent(FACTORY))
    return {
        "dir": tmp,
        "tokenizer": tok,
        "teacher": str(teacher),
        "student": str(student),
        "vocab": vocab,
    }


def _dataset(files, split: str, source: str) -> dict:
    path = str(files["dir"] / f"{split}.txt")
    if source == "text":
        return {
            "text": {
                "paths": [path],
                "tokenizer": files["tokenizer"],
                "max_tokens": 24,
                "num_shards": 3 if split == "train" else 1,
                "truncation": "right",
            }
        }
    return {
        "factory": "lm_data:tiny_corpus",
        "kwargs": {
            "path": path,
            "tokenizer": files["tokenizer"],
            "num_shards": 3 if split == "train" else 1,
        },
    }


SOURCES = [
    "factory",
    pytest.param(
        "text",
        marks=pytest.mark.skipif(
            importlib.util.find_spec("kdcache.data.text") is None,
            reason="kdcache.data.text.TextDataset is not there yet",
        ),
    ),
]


@pytest.mark.parametrize("source", SOURCES)
def test_build_then_train_then_load_the_student_with_transformers(
    lm_files, source, tmp_path, capsys, monkeypatch
):
    root = str(tmp_path / "cache")
    build = {
        "root": root,
        "dataset": _dataset(lm_files, "train", source),
        "teachers": [{"name": "tiny-gpt", "hf": lm_files["teacher"], "task": "causal-lm"}],
        "targets": {"temperature": 2.0, "kind": "topk", "params": {"k": 8}},
        "executor": {"kind": "local", "batch_size": 16},
    }
    build_path = lm_files["dir"] / f"build-{source}.yaml"
    build_path.write_text(yaml.safe_dump(build))

    assert main(["build", str(build_path), "--no-progress"]) == 0
    first = _last_json(capsys.readouterr().out)
    assert first["hit"] is False and first["computed"] == 3
    assert main(["build", str(build_path), "--no-progress"]) == 0
    again = _last_json(capsys.readouterr().out)
    assert again["hit"] is True and again["key"] == first["key"] and again["computed"] == 0

    out = tmp_path / "student-out"
    train = {
        "output_dir": str(out),
        "student": {
            "hf_config": lm_files["student"] + "/config.json",
            "tokenizer": lm_files["tokenizer"],
        },
        "cache": {"uri": first["key"], "root": root},
        "dataset": _dataset(lm_files, "train", source),
        "eval_dataset": _dataset(lm_files, "validation", source),
        "loss": {"alpha": 0.5},
        "stream": {"global_batch_size": 16},
        "lr": 3e-3,
        "max_steps": 6,
        "seed": 3,
        "tensorboard": False,
    }
    train_path = lm_files["dir"] / f"train-{source}.yaml"
    train_path.write_text(yaml.safe_dump(train))

    trained: list[torch.nn.Module] = []
    real = train_job.train_student

    def recording(*args, **kwargs):
        module, result = real(*args, **kwargs)
        trained.append(module)
        return module, result

    monkeypatch.setattr(train_job, "train_student", recording)
    assert main(["train", str(train_path), "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["steps"] == 6 and summary["cache"]["key"] == first["key"]
    ppl = summary["evals"]["distilled"]["perplexity"]
    assert 1.0 < ppl < 2 * lm_files["vocab"]
    assert summary["student"]["path"] == str(out)

    # the export: transformers loads model and tokenizer from the output directory
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    assert len(tokenizer) == lm_files["vocab"] and tokenizer.pad_token == PAD
    meta = model.config.kdcache
    assert meta["cache_key"] == first["key"] and meta["teachers"] == ["tiny-gpt"]
    assert meta["steps"] == 6 and meta["vocab_size"] == lm_files["vocab"]
    from kdcache.train.export import read_safetensors_metadata

    assert read_safetensors_metadata(str(out / "model.safetensors"))["cache_key"] == first["key"]

    (module,) = trained
    ids = torch.tensor(
        tokenizer(["the cat sat on a mat", "birds sang far away"], padding=True)["input_ids"]
    )
    with torch.no_grad():
        want = module(ids)  # HFLogits: [B, T, V], trimmed to the tokenizer's V
        got = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id).long()).logits
    assert want.shape == (2, ids.shape[1], lm_files["vocab"])
    torch.testing.assert_close(got[..., : lm_files["vocab"]], want, rtol=0, atol=1e-6)
    assert not torch.allclose(
        want,
        transformers.AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(lm_files["student"])
        )(ids).logits[..., : want.shape[-1]],
    )

    # the validation perplexity of the exported student is the one the job reported
    from kdcache.jobs.config import DatasetConfig, from_dict
    from kdcache.teachers.loaders import HFLogits
    from kdcache.train.evaluate import evaluate_perplexity

    val = from_dict(DatasetConfig, _dataset(lm_files, "validation", source)).build()
    val = train_job.token_eval_data(val)
    exported = HFLogits(model, tokenizer.pad_token_id, lm_files["vocab"])
    assert evaluate_perplexity(exported, val)["perplexity"] == pytest.approx(ppl, rel=1e-6)


def test_a_student_tokenizer_unlike_the_teachers_is_refused_and_hard_labels_need_no_cache(
    lm_files, tmp_path, capsys
):
    root = str(tmp_path / "cache")
    build = {
        "root": root,
        "dataset": _dataset(lm_files, "train", "factory"),
        "teachers": [{"name": "tiny-gpt", "hf": lm_files["teacher"], "task": "causal-lm"}],
        "targets": {"temperature": 1.0, "kind": "topk", "params": {"k": 4}},
        "executor": {"kind": "local"},
    }
    (tmp_path / "lm_data.py").write_text(textwrap.dedent(FACTORY))
    (tmp_path / "build.yaml").write_text(yaml.safe_dump(build))
    assert main(["build", str(tmp_path / "build.yaml"), "--no-progress"]) == 0
    key = _last_json(capsys.readouterr().out)["key"]

    other = str(tmp_path / "other-tokenizer")
    _tokenizer(other, _lines(300, 0), 280)
    train = {
        "output_dir": str(tmp_path / "out"),
        "student": {"hf_config": lm_files["student"], "tokenizer": other},
        "cache": {"uri": key, "root": root},
        "dataset": _dataset(lm_files, "train", "factory"),
        "stream": {"global_batch_size": 16},
        "max_steps": 2,
        "tensorboard": False,
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(train))
    assert main(["train", str(tmp_path / "train.yaml"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "student.tokenizer" in err and "does not fit the teachers" in err
    assert not (tmp_path / "out" / "config.json").exists()

    # the hard-label student of the same data: no cache, alpha 0; exported the same way
    hard = ["cache=null", "loss.alpha=0", f"student.tokenizer={lm_files['tokenizer']}"]
    assert main(["train", str(tmp_path / "train.yaml"), *hard, "--no-progress"]) == 0
    summary = _last_json(capsys.readouterr().out)
    assert summary["cache"] is None and summary["steps"] == 2
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.config.kdcache["cache_key"] is None and model.config.kdcache["teachers"] == []


def test_plan_estimates_a_token_entry_within_ten_percent(lm_files, tmp_path, capsys):
    """``kdcache plan`` encodes its calibration rows in the layout a build writes (the
    sequence-major layout of format 2), so its estimate matches the built entry."""
    from kdcache.jobs.config import BuildConfig, load
    from kdcache.jobs.plan import plan_build

    build = {
        "root": str(tmp_path / "cache"),
        "dataset": _dataset(lm_files, "train", "factory"),
        "teachers": [{"name": "tiny-gpt", "hf": lm_files["teacher"], "task": "causal-lm"}],
        "targets": {"temperature": 1.0, "kind": "topk", "params": {"k": 8}},
        "executor": {"kind": "local", "batch_size": 16},
    }
    path = lm_files["dir"] / "build-plan.yaml"
    path.write_text(yaml.safe_dump(build))
    plan = plan_build(load(BuildConfig, str(path)))
    (configured,) = [c for c in plan.targets if c.configured]
    assert main(["build", str(path), "--no-progress"]) == 0
    built = _last_json(capsys.readouterr().out)
    assert abs(configured.total_bytes - built["bytes"]) <= 0.1 * built["bytes"], (
        configured.total_bytes,
        built["bytes"],
    )
