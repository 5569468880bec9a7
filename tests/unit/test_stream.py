"""The student stream: order, sharding across ranks, resume, and the sample_id join."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcache
from kdcache import targets
from kdcache.errors import ConfigError, SampleIdMismatchError, SpecMismatchError
from kdcache.stream.dataset import ShardedStream
from kdcache.testing import linear_teacher, toy_dataset


def _ids(stream):
    return [b["sample_id"].tolist() for b in stream]


def test_order_depends_on_seed_and_epoch_only():
    ds = toy_dataset(num_records=50, num_shards=3)
    a = ShardedStream(ds, batch_size=4, seed=7)
    b = ShardedStream(ds, batch_size=4, seed=7)
    first = _ids(a)
    assert first == _ids(b)
    assert _ids(a) != first  # a's second epoch differs from its first
    assert _ids(ShardedStream(ds, batch_size=4, seed=8)) != first


def test_global_steps_are_world_size_independent_and_even():
    ds = toy_dataset(num_records=103, num_shards=5)  # uneven shards
    single = _ids(ShardedStream(ds, batch_size=8, seed=1, world_size=1, rank=0))
    for w in (2, 4):
        per_rank = [
            _ids(ShardedStream(ds, batch_size=8 // w, seed=1, world_size=w, rank=r))
            for r in range(w)
        ]
        assert len({len(x) for x in per_rank}) == 1  # equal step counts on every rank
        for step, global_batch in enumerate(single):
            union = sorted(i for r in range(w) for i in per_rank[r][step])
            assert union == sorted(global_batch)
    flat = [i for batch in single for i in batch]
    assert len(flat) == len(set(flat)) == 96  # each sample at most once per epoch


def test_resume_mid_epoch_gives_the_same_samples_even_on_another_world_size():
    ds = toy_dataset(num_records=96, num_shards=4)
    full = _ids(ShardedStream(ds, batch_size=8, seed=3))
    s = ShardedStream(ds, batch_size=8, seed=3)
    it = iter(s)
    seen = [next(it)["sample_id"].tolist() for _ in range(5)]
    state = s.state_dict()
    it.close()
    assert seen == full[:5]
    resumed = ShardedStream(ds, batch_size=8, seed=3)
    resumed.load_state_dict(state)
    assert seen + _ids(resumed) == full
    halves = [ShardedStream(ds, batch_size=4, seed=3, world_size=2, rank=r) for r in range(2)]
    for h in halves:
        h.load_state_dict(state)
    rest = [_ids(h) for h in halves]
    for step, global_batch in enumerate(full[5:]):
        assert sorted(rest[0][step] + rest[1][step]) == sorted(global_batch)


def test_bad_configuration_is_refused():
    ds = toy_dataset()
    with pytest.raises(ConfigError):
        ShardedStream(ds, batch_size=0)
    with pytest.raises(ConfigError):
        ShardedStream(ds, batch_size=4, world_size=2, rank=2)
    with pytest.raises(ConfigError):
        ShardedStream(ds, batch_size=4, world_size=2, rank=0, drop_last=False)
    with pytest.raises(ConfigError, match="seed"):
        ShardedStream(ds, batch_size=4, seed=1).load_state_dict(
            {"seed": 2, "epoch": 0, "consumed": 0}
        )


@pytest.fixture
def built(root):
    ds = toy_dataset(num_records=60, num_shards=3)
    teachers = [linear_teacher(seed=s) for s in range(3)]
    ens = kdcache.TeacherEnsemble(teachers, rule="mean_probs")
    cache = kdcache.build_cache(
        ds, ens, temperature=2.0, root=root, executor="local", progress=False
    )
    return ds, ens, cache


def test_soft_targets_joined_by_sample_id_equal_online_targets(built):
    ds, ens, cache = built
    stream = kdcache.SoftTargetDataset(cache, ds, batch_size=10, seed=0)
    by_id = {int(i): k for k, i in enumerate(ds.sample_ids)}
    n = 0
    for batch in stream:
        rows = [by_id[int(i)] for i in batch["sample_id"]]
        online = ens.log_probs(ds.inputs[rows], temperature=2.0)
        torch.testing.assert_close(batch["teacher_log_probs"], online, rtol=1e-5, atol=1e-6)
        assert batch["labels"].tolist() == ds.labels[rows].tolist()
        n += len(rows)
    assert n == 60


def test_retemper_requires_consent_and_is_exact(built):
    ds, ens, cache = built
    with pytest.raises(SpecMismatchError, match="retemper=True"):
        kdcache.SoftTargetDataset(cache, ds, batch_size=10, temperature=1.0)
    stream = kdcache.SoftTargetDataset(
        cache, ds, batch_size=60, temperature=1.0, retemper=True, shuffle=False
    )
    batch = next(iter(stream))
    logits = torch.stack([t.logits(ds.inputs) for t in ens])
    want = targets.combine_ensemble(logits, rule="mean_probs")
    torch.testing.assert_close(batch["teacher_log_probs"], want, rtol=1e-5, atol=1e-6)


def test_cache_over_other_data_is_refused(built):
    _, _, cache = built
    with pytest.raises(SpecMismatchError, match="different dataset"):
        kdcache.SoftTargetDataset(
            cache, toy_dataset(num_records=60, num_shards=3, seed=5), batch_size=10
        )


class _SwappedIds:
    """The cache's dataset, except that shard 1 reports one different sample_id."""

    layout = "records"

    def __init__(self, inner):
        self.inner = inner
        self.num_shards = inner.num_shards

    def fingerprint(self):
        return self.inner.fingerprint()

    def read_shard(self, i):
        out = dict(self.inner.read_shard(i))
        if i == 1:
            ids = out["sample_id"].copy()
            ids[3] = 999_999
            out["sample_id"] = ids
        return out


def test_sample_id_mismatch_names_the_shard(built):
    ds, _, cache = built
    stream = kdcache.SoftTargetDataset(cache, _SwappedIds(ds), batch_size=10, shuffle=False)
    with pytest.raises(SampleIdMismatchError, match=r"shard 1: .*sample_id 999999 is missing"):
        for _ in stream:
            pass


def test_reordered_cache_rows_are_joined_by_id_not_position(built):
    ds, ens, cache = built

    class Reversed(_SwappedIds):
        def read_shard(self, i):
            return {k: v[::-1].copy() for k, v in self.inner.read_shard(i).items()}

    stream = kdcache.SoftTargetDataset(cache, Reversed(ds), batch_size=20, shuffle=False)
    batch = next(iter(stream))
    rows = [int(i) - 1000 for i in batch["sample_id"]]
    online = ens.log_probs(ds.inputs[rows], temperature=2.0)
    torch.testing.assert_close(batch["teacher_log_probs"], online, rtol=1e-5, atol=1e-6)
    assert np.all(np.diff(batch["sample_id"].numpy()) < 0)


class _CountingStream(ShardedStream):
    """Records the shards it reads."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.reads: list[int] = []

    def _load(self, shard):
        self.reads.append(shard)
        return super()._load(shard)


def test_shuffle_window_mixes_neighbouring_shards_and_stays_a_permutation():
    ds = toy_dataset(num_records=120, num_shards=6)
    plain = ShardedStream(ds, batch_size=10, seed=4)
    mixed = ShardedStream(ds, batch_size=10, seed=4, shuffle_window=40)
    shard_plain, _ = plain.epoch_sequence(0)
    shard_mixed, row_mixed = mixed.epoch_sequence(0)
    # same multiset of (shard, row); a pure function of (seed, epoch)
    pairs = sorted(zip(shard_mixed.tolist(), row_mixed.tolist(), strict=True))
    assert pairs == sorted((s, r) for s in range(6) for r in range(20))
    again = ShardedStream(ds, batch_size=10, seed=4, shuffle_window=40).epoch_sequence(0)
    assert np.array_equal(again[0], shard_mixed) and np.array_equal(again[1], row_mixed)
    # each window holds exactly the shards of the same window of the unmixed order...
    for lo in range(0, 120, 40):
        assert sorted(shard_mixed[lo : lo + 40]) == sorted(shard_plain[lo : lo + 40])
    # ...but the shard runs are broken up: far more shard changes than the 5 of the plain order
    assert np.count_nonzero(np.diff(shard_plain)) == 5
    assert np.count_nonzero(np.diff(shard_mixed)) > 20
    flat = [i for b in _ids(mixed) for i in b]
    assert len(flat) == len(set(flat)) == 120


@pytest.mark.parametrize("window", [0, 16])
def test_lanes_keep_global_batches_world_size_independent_and_reads_local(window):
    ds = toy_dataset(num_records=200, num_shards=16)  # uneven: 12 or 13 rows
    kw = {"seed": 5, "num_lanes": 4, "shuffle_window": window}
    single = _ids(ShardedStream(ds, batch_size=16, world_size=1, rank=0, **kw))
    assert len(single) == 12  # 200 // 16
    for w in (2, 4):
        ranks = [
            _CountingStream(ds, batch_size=16 // w, world_size=w, rank=r, **kw) for r in range(w)
        ]
        per_rank = [_ids(s) for s in ranks]
        assert {len(x) for x in per_rank} == {12}
        for step, global_batch in enumerate(single):
            assert sorted(i for r in range(w) for i in per_rank[r][step]) == sorted(global_batch)
        if window == 0:
            # a rank reads only the shards of its lanes, each once: about 16 / w + edges
            for s in ranks:
                assert len(s.reads) == len(set(s.reads)) <= 16 // w + 2
    flat = [i for b in single for i in b]
    assert len(flat) == len(set(flat)) == 192


def test_one_lane_every_rank_reads_every_shard():
    """The baseline the lanes improve on: one lane spreads each global batch over ranks."""
    ds = toy_dataset(num_records=160, num_shards=8)
    ranks = [_CountingStream(ds, batch_size=5, world_size=4, rank=r, seed=0) for r in range(4)]
    for s in ranks:
        _ids(s)
        assert sorted(s.reads) == list(range(8))


def test_lanes_must_divide_the_global_batch():
    with pytest.raises(ConfigError, match="divide the global batch"):
        ShardedStream(toy_dataset(), batch_size=6, num_lanes=4)


@pytest.mark.parametrize("external", [False, True])
def test_workers_give_the_same_order_and_exact_resume(external):
    ds = toy_dataset(num_records=96, num_shards=4)
    full = _ids(ShardedStream(ds, batch_size=8, seed=3, num_lanes=2))
    if external:
        s = ShardedStream(ds, batch_size=8, seed=3, num_lanes=2)
        loader = torch.utils.data.DataLoader(s, batch_size=None, num_workers=2)
        assert _ids(loader) == full
        return
    s = ShardedStream(ds, batch_size=8, seed=3, num_lanes=2, num_workers=2)
    it = iter(s)
    seen = [next(it)["sample_id"].tolist() for _ in range(5)]
    state = s.state_dict()
    it.close()
    assert seen == full[:5] and state["consumed"] == 40
    resumed = ShardedStream(ds, batch_size=8, seed=3, num_lanes=2, num_workers=1)
    resumed.load_state_dict(state)
    assert seen + _ids(resumed) == full
    assert resumed.state_dict()["epoch"] == 1 and resumed.state_dict()["consumed"] == 0


def test_a_state_saved_at_the_end_of_an_epoch_resumes_with_the_next_epoch():
    ds = toy_dataset(num_records=40, num_shards=2)
    s = ShardedStream(ds, batch_size=8, seed=1)
    it = iter(s)
    for _ in range(len(s)):
        next(it)
    state = s.state_dict()  # the last batch was handed out; the generator is not exhausted
    it.close()
    assert state["epoch"] == 0 and state["consumed"] == 40
    resumed = ShardedStream(ds, batch_size=8, seed=1)
    resumed.load_state_dict(state)
    reference = ShardedStream(ds, batch_size=8, seed=1)
    _ids(reference)
    assert _ids(resumed) == _ids(reference)  # both epoch 1


def test_resume_with_other_order_settings_is_refused():
    ds = toy_dataset(num_records=96, num_shards=4)
    s = ShardedStream(ds, batch_size=8, seed=3, num_lanes=2)
    it = iter(s)
    next(it)
    state = s.state_dict()
    it.close()
    with pytest.raises(ConfigError, match="num_lanes"):
        ShardedStream(ds, batch_size=8, seed=3).load_state_dict(state)
    with pytest.raises(ConfigError, match="shuffle_window"):
        ShardedStream(ds, batch_size=8, seed=3, num_lanes=2, shuffle_window=8).load_state_dict(
            state
        )
    with pytest.raises(ConfigError, match="global batch"):
        ShardedStream(ds, batch_size=12, seed=3, num_lanes=2).load_state_dict(state)


# -- sparse classifier entries: the same stream, another collation ------------------------


def _sparse_cache(root, labels, num_teachers=1, kind="topk", params=None):
    ds = toy_dataset(num_records=96, num_features=8, num_classes=5, num_shards=4)
    teachers = [linear_teacher(seed=s) for s in range(num_teachers)]
    ens = kdcache.TeacherEnsemble(teachers, rule="mean_probs")
    params = dict(params or {"k": 2})
    if labels:
        params["labels"] = True
    cache = kdcache.build_cache(
        ds, ens, temperature=2.0, root=root, executor="local", progress=False,
        kind=kind, params=params,
    )  # fmt: skip
    return ds, ens, cache


def _train(stream, steps=None, student=None, opt=None):
    """A tiny student trained on the stream; returns (losses, ids, student)."""
    torch.manual_seed(0)
    student = student or torch.nn.Linear(8, 5)
    opt = opt or torch.optim.SGD(student.parameters(), lr=0.1)
    out, ids = [], []
    for batch in stream:
        loss = kdcache.losses.kd_loss(
            student(batch["inputs"]), batch["targets"], temperature=2.0, alpha=0.7,
            labels_B=batch["labels"],
        )  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        out.append(loss.item())
        ids.append(batch["sample_id"].tolist())
        if len(out) == steps:
            break  # a run stopped here (its checkpoint holds the stream's state)
    return out, ids, student, opt


@pytest.mark.parametrize("labels", [False, True])
def test_sparse_classifier_entry_streams_with_workers_and_resumes_exactly(root, labels):
    ds, ens, cache = _sparse_cache(root, labels)
    kw = dict(batch_size=8, seed=5, num_lanes=2)
    full_losses, full_ids, full_student, _ = _train(kdcache.SoftTargetDataset(cache, ds, **kw))
    # kept ids are the teacher's top-2 (plus the label when asked), joined by sample_id
    batch = next(iter(kdcache.SoftTargetDataset(cache, ds, **kw)))
    t = batch["targets"]
    assert isinstance(t, targets.SparseTargets) and t.num_rows == 8
    rows = [int(i) - 1000 for i in batch["sample_id"]]
    online = ens.teachers[0].logits(torch.as_tensor(ds.inputs[rows]))
    top2 = online.topk(2, dim=-1).indices
    for b in range(8):
        kept = set(t.ids_BS[b][t.valid_BS[b]].tolist())
        assert set(top2[b].tolist()) <= kept
        if labels:
            assert int(batch["labels"][b]) in kept
    # interrupted after 5 steps with 2 workers, resumed with 1 worker: the same run
    cut = kdcache.SoftTargetDataset(cache, ds, num_workers=2, **kw)
    first_losses, first_ids, student, opt = _train(cut, steps=5)
    state = cut.state_dict()
    resumed = kdcache.SoftTargetDataset(cache, ds, num_workers=1, **kw)
    resumed.load_state_dict(state)
    rest_losses, rest_ids, student, _ = _train(resumed, student=student, opt=opt)
    assert first_ids + rest_ids == full_ids
    assert first_losses + rest_losses == full_losses
    for p, q in zip(student.parameters(), full_student.parameters(), strict=True):
        assert torch.equal(p, q)


def test_sparse_ensembles_combine_topk_and_keep_sampled_apart(root):
    ds, _, cache = _sparse_cache(root, labels=False, num_teachers=2)
    batch = next(iter(kdcache.SoftTargetDataset(cache, ds, batch_size=8, seed=0)))
    assert isinstance(batch["targets"], targets.SparseTargets)
    assert batch["targets"].kind == "mixture"
    apart = next(iter(kdcache.SoftTargetDataset(cache, ds, batch_size=8, seed=0, combine=False)))
    assert isinstance(apart["targets"], list) and len(apart["targets"]) == 2
    ds, _, sampled = _sparse_cache(
        root, labels=False, num_teachers=2, kind="sampled", params={"num_samples": 4}
    )
    batch = next(iter(kdcache.SoftTargetDataset(sampled, ds, batch_size=8, seed=0)))
    assert isinstance(batch["targets"], list) and len(batch["targets"]) == 2


def test_sparse_stream_refuses_another_dataset_naming_both_fingerprints(root):
    _, _, cache = _sparse_cache(root, labels=False)
    other = toy_dataset(num_records=96, num_features=8, num_classes=5, num_shards=4, seed=9)
    with pytest.raises(SpecMismatchError, match=r"fingerprint is [0-9a-f]{12}, .* is [0-9a-f]{12}"):
        kdcache.SoftTargetDataset(cache, other, batch_size=8)
