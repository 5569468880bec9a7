"""Teachers: loaders (module, checkpoint, TorchScript, Hugging Face), fingerprints, dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcache
from kdcache.errors import DataFileNotFoundError, TeacherOutputError
from kdcache.testing import linear_teacher, toy_dataset


def test_fingerprint_covers_weights_config_and_autocast():
    a, b = linear_teacher(seed=0), linear_teacher(seed=0)
    assert a.fingerprint() == b.fingerprint()
    assert (
        linear_teacher(seed=1).fingerprint()["weights_sha256"] != a.fingerprint()["weights_sha256"]
    )
    other_cfg = kdcache.Teacher(a.name, a.module, {"in": 8, "out": 5, "note": "x"})
    assert other_cfg.fingerprint() != a.fingerprint()
    bf16 = kdcache.Teacher(a.name, a.module, a.config, autocast_dtype=torch.bfloat16)
    assert bf16.fingerprint()["autocast_dtype"] == "torch.bfloat16"
    out = bf16.logits(np.ones((2, 8), np.float32))
    assert out.dtype == torch.float32 and out.shape == (2, 5)


def test_from_checkpoint_safetensors_and_state_dict(tmp_path):
    from safetensors.torch import save_file

    t = linear_teacher()
    save_file(t.module.state_dict(), str(tmp_path / "w.safetensors"))
    torch.save(t.module.state_dict(), str(tmp_path / "w.pt"))

    def factory(**kw):
        return torch.nn.Linear(kw["in"], kw["out"])

    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    for f in ("w.safetensors", "w.pt"):
        loaded = kdcache.Teacher.from_checkpoint(factory, str(tmp_path / f), config=t.config)
        torch.testing.assert_close(loaded.logits(x), t.logits(x))
        assert loaded.fingerprint()["weights_sha256"] == t.fingerprint()["weights_sha256"]
    with pytest.raises(DataFileNotFoundError, match=r"nope\.safetensors"):
        kdcache.Teacher.from_checkpoint(
            factory, str(tmp_path / "nope.safetensors"), config=t.config
        )


def test_wrong_output_shape_is_named():
    t = kdcache.Teacher("flat", torch.nn.Flatten(0))
    with pytest.raises(TeacherOutputError, match=r"'flat'.*\[B, V\]"):
        t.logits(np.ones((3, 4), np.float32))


transformers = pytest.importorskip("transformers")


def _tokenizer(path, vocab_words):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *vocab_words])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]"
    )
    fast.save_pretrained(str(path))
    return fast


def test_from_hf_sequence_classification_matches_the_model(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=20,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(str(tmp_path))
    _tokenizer(tmp_path, [f"w{i}" for i in range(18)])
    teacher = kdcache.Teacher.from_hf(str(tmp_path), task="sequence-classification", name="bert")
    ids = torch.tensor([[2, 3, 4, 0, 0], [5, 6, 7, 8, 9]])
    got = teacher.logits(ids)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=(ids != 0).long()).logits
    torch.testing.assert_close(got, want)
    fp = teacher.fingerprint()
    assert fp["config"]["tokenizer_sha256"] and fp["config"]["task"] == "sequence-classification"

    # it caches like any teacher
    ds = kdcache.ArrayDataset(
        np.arange(6), np.random.default_rng(0).integers(1, 20, (6, 5)), num_shards=2
    )
    entry = kdcache.build_cache(
        ds, teacher, temperature=2.0, root=str(tmp_path / "c"), executor="local", progress=False
    )
    _, vals = entry.read_shard(0)
    assert vals.shape == (3, 3)


def test_from_hf_causal_lm_trims_padded_vocabulary(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=16)
    transformers.GPT2LMHeadModel(cfg).eval().save_pretrained(str(tmp_path))
    _tokenizer(tmp_path, [f"w{i}" for i in range(23)])  # 25 real tokens, 32 logits
    teacher = kdcache.Teacher.from_hf(str(tmp_path), task="causal-lm")
    out = teacher.logits(torch.tensor([[2, 3, 4, 5]]))
    assert out.shape == (1, 4, 25)
    with pytest.raises(kdcache.errors.ConfigError, match="task must be one of"):
        kdcache.Teacher.from_hf(str(tmp_path), task="vision")
    with pytest.raises(DataFileNotFoundError):
        kdcache.Teacher.from_hf(str(tmp_path / "missing"))


def test_ensemble_online_log_probs_are_normalised():
    ens = kdcache.TeacherEnsemble([linear_teacher(seed=s) for s in range(3)], weights=[1, 1, 2])
    x = toy_dataset().inputs[:7]
    lp = ens.log_probs(x, temperature=3.0)
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(7))


def _double_sum(x):
    return torch.stack([x.sum(1), 2 * x.sum(1)], dim=1)


def test_from_callable_caches_like_any_teacher(tmp_path):
    t = kdcache.Teacher.from_callable(_double_sum, name="fn", config={"version": 1})
    t2 = kdcache.Teacher.from_callable(_double_sum, name="fn", config={"version": 2})
    assert t.fingerprint() != t2.fingerprint()
    assert t.fingerprint()["config"]["callable"].endswith("_double_sum")
    entry = kdcache.build_cache(
        toy_dataset(), t, temperature=1.0, root=str(tmp_path), executor="local", progress=False
    )
    _, vals = entry.read_shard(0)
    np.testing.assert_allclose(vals[:, 1], 2 * vals[:, 0], rtol=1e-5)
    with pytest.raises(kdcache.errors.ConfigError, match="non-empty config"):
        kdcache.Teacher.from_callable(_double_sum, name="fn", config={})


def test_checkpoint_of_another_architecture_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    from kdcache.errors import ConfigError

    t = linear_teacher(seed=0)
    save_file(t.module.state_dict(), str(tmp_path / "w.safetensors"))
    with pytest.raises(ConfigError, match="do not fit the architecture"):
        kdcache.Teacher.from_checkpoint(
            lambda **kw: torch.nn.Linear(8, 7), str(tmp_path / "w.safetensors"), config={"v": 7}
        )


def test_a_factory_failure_names_the_teacher_and_its_arguments():
    from kdcache.errors import ConfigError
    from kdcache.jobs.config import call_factory

    def factory(width: int) -> torch.nn.Module:
        return torch.nn.Linear(8, width)

    with pytest.raises(ConfigError, match=r"teacher 'a' failed with kwargs \{'width': '3'\}"):
        call_factory(factory, {"width": "3"}, "teacher 'a'")
