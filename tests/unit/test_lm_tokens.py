"""Token-level soft targets for causal LMs: alignment, padding, vocabularies, round trips,
sequence-level data. Tiny GPT-2 models from configs; nothing is downloaded."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache import Teacher, losses
from kdcache.build.stage import build_cache
from kdcache.data.tokens import TokenDataset, encode_texts, target_positions, tokenizer_files_sha256
from kdcache.errors import ConfigError, SampleIdMismatchError, SpecMismatchError
from kdcache.executors import ExecutorConfig
from kdcache.losses.kd import token_distill_loss
from kdcache.stores.entry import CacheEntry
from kdcache.stream import (
    ShardedStream,
    SoftTargetDataset,
    check_student_vocabulary,
    read_token_shard,
)
from kdcache.stream.collate import scatter_sparse
from kdcache.targets.sparse import concat_sparse, sparsify
from kdcache.teachers.generate import generate_continuations
from pipelines.bpe import save_tokenizer, train_bpe_tokenizer
from pipelines.corpora import read_fortunes, split_by_id

transformers = pytest.importorskip("transformers")

VOCAB = 300  # tokenizer size; the models' output layer is padded to 320
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A penny saved is a penny earned, or so they say.",
    "To be or not to be, that is the question.",
    "All that glitters is not gold; all who wander are not lost.",
    "Never put off till tomorrow what you can do the day after tomorrow.",
    "Time flies like an arrow; fruit flies like a banana.",
] * 4
TAU = 2.0


def _tokenizer(texts=TEXTS, vocab=VOCAB):
    return train_bpe_tokenizer(texts, vocab)


def _save_model(path, tok, *, seed, n_embd=16, padded=320):
    cfg = transformers.GPT2Config(
        vocab_size=padded,
        n_positions=64,
        n_embd=n_embd,
        n_layer=1,
        n_head=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        initializer_range=0.5,  # peaked distributions, so a misalignment shows clearly
        activation_function="gelu",
    )
    torch.manual_seed(seed)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(str(path))
    save_tokenizer(tok, str(path), pad_token="<|pad|>", eos_token="<|endoftext|>")
    return str(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lm")
    tok = _tokenizer()
    path = _save_model(tmp / "teacher", tok, seed=0)
    teacher = Teacher.from_hf(path, task="causal-lm", name="t0")
    path_b = _save_model(tmp / "teacher_b", tok, seed=1, n_embd=8)
    teacher_b = Teacher.from_hf(path_b, task="causal-lm", name="t1")
    recs = list(enumerate(TEXTS))
    prep = {"tokenizer_files_sha256": tokenizer_files_sha256(path), "vocab_size": VOCAB}
    ds = encode_texts(
        tok, recs, max_tokens=24, eos_token_id=1, num_shards=3, pad_token_id=0, preprocessing=prep
    )
    return {"tok": tok, "teacher": teacher, "teacher_b": teacher_b, "ds": ds, "tmp": tmp}


def _build(world, root, kind="topk", params=None, teachers=None, batch_size=5, dataset=None):
    return build_cache(
        dataset or world["ds"],
        teachers or world["teacher"],
        temperature=TAU,
        root=root,
        executor=ExecutorConfig(kind="local", batch_size=batch_size),
        kind=kind,
        params=params if params is not None else {"k": 8},
        progress=False,
    )


def _full_log_probs(teacher, seq):
    """float64 [L, V] teacher log-probabilities at tau for one sequence, computed alone."""
    z = teacher.logits(torch.from_numpy(np.asarray(seq, np.int64))[None])[0, :, :VOCAB]
    return torch.log_softmax(z.double() / TAU, dim=-1)


def _per_position_kd(logits, batch):
    """float32 [B, T] forward KL per position (0 where masked)."""
    d = losses.divergence(logits[..., :VOCAB], batch["targets"], temperature=TAU)
    return torch.where(batch["mask"], d, torch.zeros_like(d))


# -- alignment ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,params", [("topk", {"k": 8}), ("sampled", {"num_samples": 16})])
def test_copy_of_teacher_has_zero_loss_at_every_valid_position(world, root, kind, params):
    cache = _build(world, root, kind, params)
    stream = SoftTargetDataset(cache, world["ds"], batch_size=6, seed=0)
    student = world["teacher"].module  # an exact copy of the teacher
    seen = 0
    for batch in stream:
        with torch.no_grad():
            logits = student(batch["inputs"])
        per_pos = _per_position_kd(logits, batch)
        assert float(per_pos.abs().max()) < 1e-5
        loss = token_distill_loss(logits, batch, temperature=TAU, vocab_size=VOCAB)
        assert abs(float(loss)) < 1e-5
        seen += int(batch["mask"].sum())
    assert len(world["ds"]) % 6 == 0 and seen == world["ds"].num_targets


def test_one_position_shift_gives_clearly_nonzero_loss(world, root):
    cache = _build(world, root)
    batch = next(iter(SoftTargetDataset(cache, world["ds"], batch_size=6)))
    with torch.no_grad():
        logits = world["teacher"].module(batch["inputs"])
    shifted = torch.roll(logits, shifts=1, dims=1)  # prediction of t used at t + 1
    aligned = token_distill_loss(logits, batch, temperature=TAU, vocab_size=VOCAB)
    off = token_distill_loss(shifted, batch, temperature=TAU, vocab_size=VOCAB)
    assert float(aligned) < 1e-5
    assert float(off) > 0.1


def test_targets_hold_the_distribution_of_the_next_token(world, root):
    """Row (sample, t) equals the teacher's full distribution at t, computed alone."""
    cache = _build(world, root, "topk", {"k": VOCAB})
    ds = world["ds"]
    shard = read_token_shard(cache, 0, ds)
    seq = ds.read_shard(0)
    first = seq["tokens"][: seq["token_offsets"][1]]
    rows = slice(int(shard.row_offsets[0]), int(shard.row_offsets[1]))
    assert shard.positions[rows].tolist() == list(range(len(first) - 1))
    lp = _full_log_probs(world["teacher"], first)[:-1]
    t = shard.targets.rows(rows)
    got = torch.full_like(lp, -math.inf).scatter_(1, t.ids_BS, t.log_probs().double())
    assert torch.allclose(got, lp, atol=2e-5)


def test_shifted_positions_in_the_cache_are_refused(world, root):
    cache = _build(world, root)
    ds = world["ds"]
    _, sparse = cache.read_sparse_shard(0)
    cols = cache.read_columns(0)
    ids = cols.sample_ids_N
    pos = np.asarray(cols.rows["position"]).astype(np.int64) + 1  # off by one
    bad = CacheEntry(cache.root, cache.key)
    bad.write_shard(0, ids, sparse, vocab_size=VOCAB, positions_N=pos)
    with pytest.raises(SampleIdMismatchError, match="position"):
        read_token_shard(bad, 0, ds, verify=False)


def test_cache_over_other_sequences_is_refused(world, root):
    cache = _build(world, root)
    other = world["ds"].subset(np.arange(len(world["ds"]))[::-1].copy(), num_shards=3)
    with pytest.raises(SampleIdMismatchError):
        read_token_shard(cache, 0, other)


def test_store_refuses_split_samples(world, root):
    cache = _build(world, root)
    _, sparse = cache.read_sparse_shard(0)
    cols = cache.read_columns(0)
    ids = np.asarray(cols.sample_ids_N).copy()
    ids[-1] = ids[0]  # the first sample reappears after others
    with pytest.raises(SampleIdMismatchError, match="contiguous"):
        cache.write_shard(0, ids, sparse, vocab_size=VOCAB, positions_N=cols.rows["position"])


def test_verify_accepts_token_entries_and_counts_sequences(world, root):
    from kdcache.stores.admin import verify

    cache = _build(world, root)
    result = verify(cache)
    assert result.ok, result.problems
    assert result.checked_rows == world["ds"].num_targets > len(world["ds"])


# -- padding ------------------------------------------------------------------------------


def test_same_sequence_padded_to_two_lengths_gives_the_same_loss(world, root):
    cache = _build(world, root)
    ds = world["ds"]
    one = ds.subset(np.array([0]), num_shards=1)
    cache_one = _build(world, root, dataset=one)
    batch = next(iter(SoftTargetDataset(cache_one, one, batch_size=1)))
    torch.manual_seed(3)
    student = torch.nn.Sequential(torch.nn.Embedding(320, 12), torch.nn.Linear(12, 320))
    student.requires_grad_(False)
    short = student(batch["inputs"])
    loss_short = token_distill_loss(short, batch, temperature=TAU, alpha=0.5)
    # The same sequence padded with 7 more positions.
    extra = 7
    b, t = batch["inputs"].shape
    padded = dict(batch)
    padded["inputs"] = torch.cat([batch["inputs"], torch.zeros(b, extra, dtype=torch.int64)], 1)
    padded["mask"] = torch.cat([batch["mask"], torch.zeros(b, extra, dtype=torch.bool)], 1)
    padded["labels"] = torch.cat([batch["labels"], torch.full((b, extra), -100)], 1)
    rows = batch["mask"].reshape(-1).nonzero().flatten()
    flat = (padded["mask"].reshape(-1)).nonzero().flatten()
    padded["targets"] = scatter_sparse(batch["targets"].rows(rows), flat, b * (t + extra))
    long = student(padded["inputs"])
    loss_long = token_distill_loss(long, padded, temperature=TAU, alpha=0.5)
    assert float(loss_short) > 0.1
    assert float(loss_long) == pytest.approx(float(loss_short), rel=1e-6)
    del cache


def test_teacher_stage_targets_do_not_depend_on_padding(world, tmp_path):
    """Batched with longer sequences (padded) or alone, a sequence gets the same targets."""
    a = _build(world, str(tmp_path / "a"), "topk", {"k": 8}, batch_size=1)
    b = _build(world, str(tmp_path / "b"), "topk", {"k": 8}, batch_size=8)
    assert a.key == b.key  # batch size is not in the key
    for i in range(world["ds"].num_shards):
        ta = read_token_shard(a, i, world["ds"]).targets
        tb = read_token_shard(b, i, world["ds"]).targets
        assert torch.allclose(ta.log_probs(), tb.log_probs(), atol=1e-4)


def test_sampled_draws_do_not_depend_on_batching(world, tmp_path):
    params = {"num_samples": 16, "seed": 5}
    a = _build(world, str(tmp_path / "a"), "sampled", params, batch_size=1)
    b = _build(world, str(tmp_path / "b"), "sampled", params, batch_size=8)
    for i in range(world["ds"].num_shards):
        ta = read_token_shard(a, i, world["ds"]).targets
        tb = read_token_shard(b, i, world["ds"]).targets
        assert torch.equal(ta.ids_BS, tb.ids_BS) and torch.equal(ta.counts_BS, tb.counts_BS)


# -- vocabulary ---------------------------------------------------------------------------


def test_padded_logits_are_trimmed_to_the_tokenizer(world, root):
    assert world["teacher"].logits(torch.tensor([[2, 3, 4]])).shape[-1] == VOCAB
    cache = _build(world, root, "topk", {"k": 8})
    assert cache.vocab_size == VOCAB
    for i in range(world["ds"].num_shards):
        ids = read_token_shard(cache, i, world["ds"]).targets.ids_BS
        assert int(ids.max()) < VOCAB


def test_teachers_with_different_tokenizers_are_refused(world, root):
    other_tok = _tokenizer([t.upper() for t in TEXTS])
    path = _save_model(world["tmp"] / "other", other_tok, seed=2)
    other = Teacher.from_hf(path, task="causal-lm", name="other")
    with pytest.raises(ConfigError, match="different tokens"):
        _build(world, root, teachers=[world["teacher"], other])
    with pytest.raises(ConfigError, match="vocabularies"):
        big = _tokenizer(vocab=310)
        p2 = _save_model(world["tmp"] / "big", big, seed=2)
        _build(world, root, teachers=[world["teacher"], Teacher.from_hf(p2, task="causal-lm")])


def test_student_with_another_tokenizer_is_refused(world, root):
    cache = _build(world, root)
    sha = world["ds"].preprocessing["tokenizer_files_sha256"]
    check_student_vocabulary(cache, vocab_size=VOCAB, tokenizer_sha256=sha)
    with pytest.raises(ConfigError, match="different tokens"):
        check_student_vocabulary(cache, vocab_size=VOCAB, tokenizer_sha256="0" * 64)
    with pytest.raises(ConfigError, match="vocabularies differ"):
        check_student_vocabulary(cache, vocab_size=VOCAB + 1)


# -- round trip ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,params",
    [
        ("topk", {"k": 8}),
        ("sampled", {"num_samples": 12, "seed": 1}),
        ("topp", {"top_p": 0.9, "max_k": 16}),
    ],
)
def test_sparse_targets_round_trip_identically(world, root, kind, params):
    cache = _build(world, root, kind, params)
    ds = world["ds"]
    spec = cache.target_spec
    for i in range(ds.num_shards):
        got = read_token_shard(cache, i, ds)
        sh = ds.read_shard(i)
        expect = []
        for j, sid in enumerate(sh["sample_id"]):
            seq = sh["tokens"][sh["token_offsets"][j] : sh["token_offsets"][j + 1]]
            z = world["teacher"].logits(torch.from_numpy(seq.astype(np.int64))[None])[0, :-1]
            scaled = z / TAU
            expect.append(sparsify(scaled, spec, row_sample_ids_M=np.full(len(scaled), sid)))
        want = concat_sparse(expect)
        assert torch.equal(got.targets.ids_BS, want.ids_BS)
        # float16 storage would round; the default float32 keeps values bit for bit
        assert torch.allclose(got.targets.values_BS, want.values_BS, atol=1e-5, equal_nan=False)
        assert torch.allclose(got.targets.log_partition_B, want.log_partition_B, atol=1e-5)
        if want.counts_BS is not None:
            assert torch.equal(got.targets.counts_BS, want.counts_BS)


def test_exact_tail_mass_from_stored_log_partition_matches_full_distribution(world, root):
    cache = _build(world, root, "topk", {"k": 4})
    ds = world["ds"]
    shard = read_token_shard(cache, 1, ds)
    sh = ds.read_shard(1)
    seq = sh["tokens"][: sh["token_offsets"][1]]
    lp = _full_log_probs(world["teacher"], seq)[:-1]  # float64 [L - 1, V]
    rows = slice(0, int(shard.row_offsets[1]))
    t = shard.targets.rows(rows)
    kept = lp.gather(1, t.ids_BS).exp().sum(dim=1)
    tail_true = 1.0 - kept
    # from the stored log-partition: 1 - sum exp(value - logZ)
    tail_from_z = 1.0 - (t.values_BS.double() - t.log_partition_B.double()[:, None]).exp().sum(1)
    assert torch.allclose(tail_from_z, tail_true, atol=1e-5)
    assert torch.allclose(t.tail_log_mass().double().exp(), tail_true, rtol=1e-4)
    assert float(tail_true.min()) > 1e-3  # a real tail, not a trivial one


# -- streaming and sequence-level data -----------------------------------------------------


def test_stream_order_resume_and_ranks(world, root):
    cache = _build(world, root)
    ds = world["ds"]
    full = SoftTargetDataset(cache, ds, batch_size=4, seed=3)
    ids = [b["sample_id"].tolist() for b in full]
    flat = [i for batch in ids for i in batch]
    assert len(flat) == len(set(flat)) == len(ds) - len(ds) % 4
    cut = SoftTargetDataset(cache, ds, batch_size=4, seed=3)
    it = iter(cut)
    next(it), next(it)
    resumed = SoftTargetDataset(cache, ds, batch_size=4, seed=3)
    resumed.load_state_dict(cut.state_dict())
    assert [b["sample_id"].tolist() for b in resumed] == ids[2:]
    r0 = SoftTargetDataset(cache, ds, batch_size=2, seed=3, rank=0, world_size=2)
    r1 = SoftTargetDataset(cache, ds, batch_size=2, seed=3, rank=1, world_size=2)
    merged = [
        a["sample_id"].tolist() + b["sample_id"].tolist() for a, b in zip(r0, r1, strict=True)
    ]
    assert merged == ids


def test_ensemble_batches_combine_topk_and_keep_sampled_apart(world, root):
    teachers = [world["teacher"], world["teacher_b"]]
    topk = _build(world, root, teachers=teachers)
    b = next(iter(SoftTargetDataset(topk, world["ds"], batch_size=4)))
    assert b["targets"].kind == "mixture"
    sampled = _build(world, root, "sampled", {"num_samples": 8}, teachers=teachers)
    b = next(iter(SoftTargetDataset(sampled, world["ds"], batch_size=4)))
    assert isinstance(b["targets"], list) and len(b["targets"]) == 2
    logits = world["teacher"].module(b["inputs"]).detach().requires_grad_()
    loss = token_distill_loss(logits, b, temperature=TAU, alpha=0.7)
    loss.backward()
    assert float(loss.detach()) > 0 and torch.isfinite(logits.grad).all()


def test_sequence_level_data_masks_prompts(world, root):
    ds = world["ds"]
    prompts = TokenDataset.from_sequences(
        ds.sample_ids[:4], [ds.sequence(i)[:3] for i in range(4)], num_shards=2, pad_token_id=0
    )
    gen = generate_continuations(
        [world["teacher"].logits], prompts, max_new_tokens=5, vocab_size=VOCAB, greedy=True
    )
    assert gen.prompt_lengths.tolist() == [3] * 4
    assert all(3 < n <= 8 for n in gen.lengths)
    # greedy continuation = the teacher's arg-max after the prompt
    z = world["teacher"].logits(torch.from_numpy(ds.sequence(0)[:3].astype(np.int64))[None])
    assert int(gen.sequence(0)[3]) == int(z[0, -1].argmax())
    cache = _build(world, root, dataset=gen)
    assert cache.num_rows == gen.num_targets == int((gen.lengths - 3).sum())
    batch = next(iter(SoftTargetDataset(cache, gen, batch_size=2)))
    assert not bool(batch["mask"][:, :2].any())  # positions 0, 1 predict prompt tokens
    assert bool(batch["mask"][:, 2].all())  # position 2 predicts the first new token
    with torch.no_grad():
        logits = world["teacher"].module(batch["inputs"])
    assert float(_per_position_kd(logits, batch).abs().max()) < 1e-5


def test_token_dataset_rejects_bad_input():
    with pytest.raises(ConfigError, match="at least 2"):
        TokenDataset.from_sequences([1, 2], [[5, 6], [7]], num_shards=1)
    with pytest.raises(ConfigError, match="unique"):
        TokenDataset.from_sequences([1, 1], [[5, 6], [7, 8]], num_shards=1)
    with pytest.raises(ConfigError, match="prompt"):
        TokenDataset.from_sequences([1], [[5, 6]], prompt_lengths=[2], num_shards=1)
    assert target_positions(5, 0).tolist() == [0, 1, 2, 3]
    assert target_positions(5, 3).tolist() == [2, 3]


def test_fortunes_ids_are_stable_and_split_is_deterministic():
    recs = read_fortunes()
    assert len(recs) > 1000 and len({i for i, _ in recs}) == len(recs)
    again = read_fortunes()
    assert recs[:50] == again[:50]
    ids = np.array([i for i, _ in recs])
    val = split_by_id(ids, 0.05)
    assert 0.03 < val.mean() < 0.07
    assert np.array_equal(val, split_by_id(ids, 0.05))


class _Bigram(torch.nn.Module):
    """A tiny causal 'LM' over V=10 (logits at t depend on token t only)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(10, 10)

    def forward(self, ids):
        return 3.0 * self.emb(ids.long())


def test_dense_token_targets_for_a_small_vocabulary(root):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 10, size=n) for n in (5, 9, 3, 7)]
    ds = TokenDataset.from_sequences([10, 11, 12, 13], seqs, num_shards=2, pad_token_id=0)
    teacher = Teacher.from_module(_Bigram(), name="bigram")
    cache = build_cache(
        ds,
        teacher,
        temperature=TAU,
        root=root,
        executor=ExecutorConfig(kind="local", batch_size=3),
        progress=False,
    )
    assert cache.vocab_size == 10 and cache.num_rows == ds.num_targets == 20
    batch = next(iter(SoftTargetDataset(cache, ds, batch_size=4)))
    assert batch["targets"].shape == (*batch["inputs"].shape, 10)
    with torch.no_grad():
        logits = teacher.module(batch["inputs"])
    copy = token_distill_loss(logits, batch, temperature=TAU)
    shifted = token_distill_loss(torch.roll(logits, 1, 1), batch, temperature=TAU)
    assert abs(float(copy)) < 1e-6 and float(shifted) > 0.1


def test_token_stream_resumes_exactly_on_another_world_size(world, root):
    cache = _build(world, root)
    ds = world["ds"]
    full = [b["sample_id"].tolist() for b in SoftTargetDataset(cache, ds, batch_size=4, seed=3)]
    # two ranks of 2 for 2 steps, then one rank of 4 from their saved state
    ranks = [
        SoftTargetDataset(cache, ds, batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)
    ]
    its = [iter(r) for r in ranks]
    seen = []
    for _ in range(2):
        a, b = next(its[0]), next(its[1])
        seen.append(a["sample_id"].tolist() + b["sample_id"].tolist())
    state = ranks[0].state_dict()
    assert state == ranks[1].state_dict()
    one = SoftTargetDataset(cache, ds, batch_size=4, seed=3)
    one.load_state_dict(state)
    rest = list(one)
    assert seen + [b["sample_id"].tolist() for b in rest] == full
    # the targets of a resumed batch are the uninterrupted run's
    again = list(SoftTargetDataset(cache, ds, batch_size=4, seed=3))
    assert torch.equal(rest[0]["targets"].ids_BS, again[2]["targets"].ids_BS)
    assert torch.equal(rest[0]["inputs"], again[2]["inputs"])


def test_token_stream_refuses_another_dataset_naming_both_fingerprints(world, root):
    cache = _build(world, root)
    ds = world["ds"]
    other = TokenDataset.from_sequences(
        ds.sample_ids,
        [np.asarray(ds.sequence(i)) for i in range(len(ds))],
        num_shards=ds.num_shards,
        preprocessing={**ds.preprocessing, "tokenizer_files_sha256": "0" * 64},
        pad_token_id=ds.pad_token_id,
    )
    with pytest.raises(SpecMismatchError, match=r"fingerprint is [0-9a-f]{12}, .* is [0-9a-f]{12}"):
        SoftTargetDataset(cache, other, batch_size=4)
    with pytest.raises(SpecMismatchError, match="tokenizer"):
        SoftTargetDataset(cache, other, batch_size=4)


def test_distillation_loss_on_a_batch_without_targets_is_refused(world):
    batch = next(iter(ShardedStream(world["ds"], batch_size=2)))  # hard labels only
    logits = torch.zeros((*batch["inputs"].shape, VOCAB))
    assert torch.isfinite(token_distill_loss(logits, batch, temperature=TAU, alpha=0.0))
    with pytest.raises(ConfigError, match="no teacher 'targets'"):
        token_distill_loss(logits, batch, temperature=TAU, alpha=0.5)
