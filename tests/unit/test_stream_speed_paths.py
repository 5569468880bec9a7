"""The student's fast paths change no value.

A shard's torch work (the layout's ``finish``: re-tempering, the ensemble combination)
runs in the prefetch thread only where torch runs one thread there, else in the consuming
thread; the batches must be exactly those of the path that did it all in the prefetch
thread (``load`` then ``finish`` there, as before). The trainer skips DeepSpeed's
all-reduce over a single rank and reads the losses without a host sync per step; the
weights and losses must be bit-identical to a run that does neither.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import numpy as np
import pytest
import torch

import kdcache
from kdcache.stream.dataset import SoftTargetDataset
from kdcache.targets.sparse import SparseTargets
from kdcache.testing import linear_teacher, toy_dataset
from kdcache.train.loop import to_device

# shards of 2,000 rows x 3 teachers x 10 classes: above torch's grain, so a torch call on
# a whole shard runs on several threads when it may
NUM_RECORDS, NUM_SHARDS, NUM_CLASSES = 6000, 3, 10


@pytest.fixture
def threads():
    """Restores torch's thread count after the test."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


def _dataset():
    return toy_dataset(
        num_records=NUM_RECORDS, num_features=8, num_classes=NUM_CLASSES, num_shards=NUM_SHARDS
    )


def _build(root, ds, **kw: Any):
    ens = kdcache.TeacherEnsemble(
        [linear_teacher(seed=s, num_classes=NUM_CLASSES) for s in range(3)], rule="mean_probs"
    )
    return kdcache.build_cache(
        ds, ens, temperature=2.0, root=root, executor="local", progress=False, **kw
    )


def _all_in_load(stream: SoftTargetDataset) -> SoftTargetDataset:
    """The stream with the path before the split: the whole shard's work in ``load`` (the
    prefetch thread), nothing left for ``finish``."""
    layout = stream.layout
    load, finish = layout.load, layout.finish
    layout.load = lambda shard: finish(load(shard))  # type: ignore[method-assign]
    layout.finish = lambda raw: raw  # type: ignore[method-assign]
    return stream


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
        return
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
        return
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
        return
    if dataclasses.is_dataclass(a):
        assert type(a) is type(b)
        for f in dataclasses.fields(a):
            _assert_same(getattr(a, f.name), getattr(b, f.name))
        return
    assert a == b


def _batches(stream, epochs: int = 2) -> list[Any]:
    return [b for _ in range(epochs) for b in stream]


@pytest.mark.parametrize("num_threads", [1, 2])
@pytest.mark.parametrize("temperature", [2.0, 3.0])
def test_dense_batches_equal_those_of_the_all_in_prefetch_path(
    root, threads, num_threads, temperature
):
    threads(num_threads)
    ds = _dataset()
    cache = _build(root, ds)
    kw = dict(batch_size=256, seed=5, temperature=temperature, retemper=True)
    new = _batches(SoftTargetDataset(cache, ds, **kw))
    old = _batches(_all_in_load(SoftTargetDataset(cache, ds, **kw)))
    assert len(new) == len(old) == 2 * (NUM_RECORDS // 256)
    for a, b in zip(new, old, strict=True):
        _assert_same(a, b)
    # and the targets are what they claim: the teachers' mixture at that temperature
    assert new[0]["teacher_log_probs"].dtype == torch.float32
    torch.testing.assert_close(
        new[0]["teacher_log_probs"].exp().sum(-1), torch.ones(256), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("num_threads", [1, 2])
def test_sparse_batches_equal_those_of_the_all_in_prefetch_path(root, threads, num_threads):
    threads(num_threads)
    ds = _dataset()
    cache = _build(root, ds, kind="topk", params={"k": 3})
    kw = dict(batch_size=200, seed=2, shuffle_window=3000)  # batches span shards
    new = _batches(SoftTargetDataset(cache, ds, **kw))
    old = _batches(_all_in_load(SoftTargetDataset(cache, ds, **kw)))
    assert len(new) == len(old) > 0
    for a, b in zip(new, old, strict=True):
        _assert_same(a, b)
    assert isinstance(new[0]["targets"], SparseTargets)


def test_finish_runs_in_the_prefetch_thread_only_at_one_torch_thread(root, threads):
    ds = _dataset()
    cache = _build(root, ds)
    where: list[str] = []

    for n in (1, 2):
        threads(n)
        stream = SoftTargetDataset(cache, ds, batch_size=500, seed=0)
        finish = stream.layout.finish

        def spy(raw, finish=finish):
            where.append(threading.current_thread().name)
            return finish(raw)

        stream.layout.finish = spy  # type: ignore[method-assign]
        assert len(list(stream)) == NUM_RECORDS // 500
    main = threading.main_thread().name
    at_one, at_two = where[:NUM_SHARDS], where[NUM_SHARDS:]
    assert len(at_two) == NUM_SHARDS  # once per shard, not per batch
    assert all(w.startswith("kdcache-prefetch") for w in at_one)
    assert all(w == main for w in at_two)


def test_to_device_keeps_a_cpu_batch_and_moves_dataclass_fields():
    t = torch.arange(6).reshape(2, 3)
    batch = {"inputs": t, "ids": [t, (t,)], "n": 3}
    same = to_device(batch, torch.device("cpu"))
    assert same["inputs"] is t and same["ids"][0] is t and same["ids"][1][0] is t
    assert same["n"] == 3
    st = SparseTargets(
        torch.zeros((2, 1), dtype=torch.int64), torch.zeros((2, 1)), torch.zeros(2), "topk"
    )
    assert to_device(st, torch.device("cpu")) is st
    moved = to_device({"targets": st}, torch.device("meta"))["targets"]
    assert isinstance(moved, SparseTargets) and moved.ids_BS.device.type == "meta"
    assert moved.kind == "topk" and moved.counts_BS is None


@pytest.mark.integration
def test_single_rank_training_without_allreduce_and_per_step_reads_is_bit_identical(
    monkeypatch,
):
    pytest.importorskip("deepspeed")
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from kdcache.train import distributed, loop

    ds = toy_dataset(num_records=256, num_features=8, num_classes=5, num_shards=4)

    def run(fast: bool) -> Any:
        torch.manual_seed(0)
        stream = kdcache.ShardedStream(ds, batch_size=16, seed=1)
        if not fast:
            monkeypatch.setattr(loop, "skip_single_rank_allreduce", lambda engine: False)
            monkeypatch.setattr(loop, "_LOSS_READ_EVERY", 1)
        else:
            monkeypatch.setattr(loop, "skip_single_rank_allreduce", skipped.append_result)
            monkeypatch.setattr(loop, "_LOSS_READ_EVERY", 5)
        _, result = loop.train_student(
            torch.nn.Linear(8, 5),
            stream,
            lambda logits, b: kdcache.losses.cross_entropy(logits, b["labels"]),
            ds_config=distributed.cpu_ds_config(lr=0.05, micro_batch_size=16),
            max_steps=2 * len(stream),
            progress=False,
        )
        return result

    class _Spy(list):
        def append_result(self, engine):
            self.append(distributed.skip_single_rank_allreduce(engine))
            return self[-1]

    skipped = _Spy()
    fast, slow = run(True), run(False)
    assert skipped == [True]  # the all-reduce was off in the fast run
    assert len(fast.losses) == len(slow.losses) == 32
    assert fast.losses == slow.losses
    assert fast.state_dict.keys() == slow.state_dict.keys()
    for k in fast.state_dict:
        assert torch.equal(fast.state_dict[k], slow.state_dict[k]), k
    assert not np.allclose(fast.losses[0], fast.losses[-1])  # it did train
