"""The student stream: order, sharding across ranks, resume, and the sample_id join."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kdcache
from kdcache import targets
from kdcache.errors import ConfigError, SampleIdMismatchError, SpecMismatchError
from kdcache.stream import ShardedStream
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
