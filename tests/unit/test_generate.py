"""Sequence-level distillation data with the key/value cache: the cached decoder writes
the tokens of the no-cache path (greedy and sampled, one teacher and ensembles), runs one
token per step after the prefill, and refuses prompts that outgrow a teacher's context.
Tiny GPT-2 models with random weights, built from configs; nothing is downloaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdcache import Teacher
from kdcache.data.tokens import TokenDataset
from kdcache.errors import ConfigError, TeacherOutputError
from kdcache.teachers.generate import generate_continuations
from kdcache.teachers.loaders import HFLogits

transformers = pytest.importorskip("transformers")

PAD, EOS = 0, 1
REAL_V, PADDED_V = 50, 64  # real vocabulary; the output layer is padded to 64


def _gpt2(seed: int, *, n_positions: int = 48, vocab: int = PADDED_V) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=32,
        n_layer=2,
        n_head=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        bos_token_id=EOS,
        initializer_range=0.2,  # spread-out logits: samples vary, arg-maxes are clear
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
    """Two saved GPT-2 teachers (no tokenizer: the vocabulary is given by the caller)."""
    out = []
    for seed in (1, 2):
        path = tmp_path_factory.mktemp(f"gpt2-{seed}")
        _gpt2(seed).save_pretrained(path)
        out.append(str(path))
    return out


def _prompts(lengths, *, seed=0, pad_inside=False, num_shards=2):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(2, REAL_V, size=n) for n in lengths]
    if pad_inside:  # the pad id as a prompt token: a Teacher masks it on both paths
        for s in seqs:
            s[len(s) // 2] = PAD
    return TokenDataset.from_sequences(
        np.arange(100, 100 + len(seqs)),
        seqs,
        num_shards=num_shards,
        pad_token_id=PAD,
        preprocessing={"source": "test prompts"},
    )


LENGTHS = [2, 7, 12, 3, 9, 5, 11]


def _same(a: TokenDataset, b: TokenDataset) -> None:
    assert a.sample_ids.tolist() == b.sample_ids.tolist()
    assert a.prompt_lengths.tolist() == b.prompt_lengths.tolist()
    assert [a.sequence(i).tolist() for i in range(len(a))] == [
        b.sequence(i).tolist() for i in range(len(b))
    ]
    assert a.preprocessing == b.preprocessing
    assert a.fingerprint() == b.fingerprint()


def test_from_hf_greedy_cached_equals_recompute(hf_dirs):
    teacher = Teacher.from_hf(hf_dirs[0], task="causal-lm")
    prompts = _prompts(LENGTHS)
    kw = dict(max_new_tokens=10, vocab_size=REAL_V, batch_size=4, description={"t": 1})
    cached = generate_continuations([teacher], prompts, **kw)
    slow = generate_continuations([teacher.logits], prompts, **kw)
    _same(cached, slow)
    assert cached.lengths.tolist() == [n + 10 for n in LENGTHS]
    # and both are the teacher's arg-max after each prefix, computed one sequence alone
    seq = torch.from_numpy(cached.sequence(2).astype(np.int64))
    z = teacher.logits(seq[None])[0, :, :REAL_V]
    assert z[11:-1].argmax(-1).tolist() == seq[12:].tolist()


def test_sampled_ensemble_cached_equals_recompute(hf_dirs):
    teachers = [Teacher.from_hf(p, task="causal-lm", name=f"t{k}") for k, p in enumerate(hf_dirs)]
    prompts = _prompts(LENGTHS, seed=3)
    for seed in (0, 7):
        kw = dict(
            max_new_tokens=12,
            greedy=False,
            temperature=1.3,
            seed=seed,
            eos_token_id=EOS,
            vocab_size=REAL_V,
            batch_size=3,
        )
        cached = generate_continuations(teachers, prompts, **kw)
        slow = generate_continuations([t.logits for t in teachers], prompts, **kw)
        _same(cached, slow)
        greedy = generate_continuations(teachers, prompts, max_new_tokens=12, vocab_size=REAL_V)
        assert [cached.sequence(i).tolist() for i in range(len(cached))] != [
            greedy.sequence(i).tolist() for i in range(len(greedy))
        ]  # sampling did sample


def test_eos_stops_a_sequence_on_both_paths(hf_dirs):
    teacher = Teacher.from_hf(hf_dirs[1], task="causal-lm")
    prompts = _prompts(LENGTHS, seed=5)
    first = generate_continuations([teacher], prompts, max_new_tokens=1, vocab_size=REAL_V)
    eos = int(first.sequence(1)[-1])  # the first token after prompt 1: it stops there
    kw = dict(max_new_tokens=8, vocab_size=REAL_V, eos_token_id=eos, batch_size=len(LENGTHS))
    cached = generate_continuations([teacher], prompts, **kw)
    _same(cached, generate_continuations([teacher.logits], prompts, **kw))
    assert cached.lengths[1] == LENGTHS[1] + 1
    assert cached.lengths.max() > LENGTHS[int(cached.lengths.argmax())] + 1


def test_pad_tokens_inside_prompts_are_masked_as_without_cache(hf_dirs):
    teacher = Teacher.from_hf(hf_dirs[0], task="causal-lm")
    assert teacher.module.pad_token_id == PAD
    prompts = _prompts(LENGTHS, seed=4, pad_inside=True)
    kw = dict(max_new_tokens=6, vocab_size=REAL_V, batch_size=4)
    cached = generate_continuations([teacher], prompts, **kw)
    _same(cached, generate_continuations([teacher.logits], prompts, **kw))
    # the mask matters here: the bare model (no pad masking) continues differently
    bare = generate_continuations([teacher.module.model], prompts, **kw)
    assert [cached.sequence(i).tolist() for i in range(len(cached))] != [
        bare.sequence(i).tolist() for i in range(len(bare))
    ]


def test_bare_hf_module_and_padded_vocabulary(hf_dirs):
    model = _gpt2(1)
    prompts = _prompts(LENGTHS, seed=6)
    kw = dict(max_new_tokens=7, vocab_size=REAL_V, greedy=False, seed=3, batch_size=5)
    cached = generate_continuations([model], prompts, **kw)
    _same(cached, generate_continuations([lambda ids: model(ids).logits], prompts, **kw))
    # a Teacher that trims its padded output layer itself (as the LM pipeline builds it)
    teacher = Teacher("trimmed", HFLogits(model, pad_token_id=PAD, vocab_size=REAL_V))
    kw.pop("vocab_size")
    trimmed = generate_continuations([teacher], prompts, **kw)
    _same(trimmed, generate_continuations([teacher.logits], prompts, **kw))
    assert max(int(trimmed.sequence(i).max()) for i in range(len(trimmed))) < REAL_V


def test_mixed_ensemble_of_cached_and_plain_teachers(hf_dirs):
    cached_t = Teacher.from_hf(hf_dirs[0], task="causal-lm", name="a")
    other = Teacher.from_hf(hf_dirs[1], task="causal-lm", name="b")
    prompts = _prompts(LENGTHS, seed=8)
    kw = dict(max_new_tokens=9, vocab_size=REAL_V, greedy=False, seed=11, batch_size=4)
    mixed = generate_continuations([cached_t, other.logits], prompts, **kw)
    _same(mixed, generate_continuations([cached_t.logits, other.logits], prompts, **kw))


def test_cached_path_feeds_one_token_per_step(hf_dirs):
    teacher = Teacher.from_hf(hf_dirs[0], task="causal-lm")
    widths: list[tuple[int, int]] = []

    def record(module, args, kwargs):
        widths.append(tuple(kwargs["input_ids"].shape))

    handle = teacher.module.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        generate_continuations(
            [teacher], _prompts(LENGTHS), max_new_tokens=5, vocab_size=REAL_V, batch_size=4
        )
    finally:
        handle.remove()
    # per batch: one prefill of the longest prompt, then four single-token steps
    assert widths == [(4, 12)] + [(4, 1)] * 4 + [(3, 11)] + [(3, 1)] * 4


def test_context_overflow_is_refused_up_front(tmp_path):
    _gpt2(1, n_positions=16).save_pretrained(tmp_path)
    teacher = Teacher.from_hf(str(tmp_path), task="causal-lm", name="short")
    prompts = _prompts([4, 10, 6])
    with pytest.raises(ConfigError, match=r"context of 16 tokens \(config n_positions\)") as e:
        generate_continuations([teacher], prompts, max_new_tokens=8, vocab_size=REAL_V)
    msg = str(e.value)
    assert "sample_id 101" in msg and "10 tokens" in msg and "would make 18" in msg
    assert "max_new_tokens to at most 6" in msg and "prompts to at most 8 tokens" in msg
    # the no-cache path of the same teacher is refused the same way, before any work
    with pytest.raises(ConfigError, match="context of 16"):
        generate_continuations([teacher.logits], prompts, max_new_tokens=8, vocab_size=REAL_V)
    # exactly the context fits
    out = generate_continuations([teacher], prompts, max_new_tokens=6, vocab_size=REAL_V)
    assert int(out.lengths.max()) == 16


def test_bad_teachers_are_refused(hf_dirs):
    prompts = _prompts([3, 4])
    with pytest.raises(ConfigError, match="at least one teacher"):
        generate_continuations([], prompts, max_new_tokens=2)
    with pytest.raises(ConfigError, match=r"expected a kdcache\.Teacher"):
        generate_continuations([42], prompts, max_new_tokens=2)  # type: ignore[list-item]
    classifier = Teacher.from_module(torch.nn.Sequential(torch.nn.Embedding(60, 5)))
    with pytest.raises(TeacherOutputError, match=r"logits \[B, T, V\]"):
        generate_continuations(
            [lambda ids: classifier.logits(ids)[:, 0]], prompts, max_new_tokens=2
        )
    wider = _gpt2(3, vocab=80)
    with pytest.raises(TeacherOutputError, match="80 logits"):
        generate_continuations([_gpt2(1), wider], prompts, max_new_tokens=2)
