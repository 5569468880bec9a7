"""The teacher stage in-process (executor="local"): hits, misses, resume, fatal errors; the
executor interface (the base skips committed work) and get_executor."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kdcache
from kdcache.errors import ConfigError, TeacherOutputError
from kdcache.executors import (
    EXECUTORS,
    ExecutorConfig,
    LocalExecutor,
    ShardTask,
    TaskContext,
    get_executor,
)
from kdcache.testing import NaNAt, linear_teacher, toy_dataset


def _build(ds, teachers, root, **kw):
    kw.setdefault("temperature", 2.0)
    return kdcache.build_cache(ds, teachers, root=root, executor="local", progress=False, **kw)


def test_single_teacher_values_are_logits_over_temperature(root):
    ds = toy_dataset()
    t = linear_teacher()
    entry = _build(ds, t, root, temperature=4.0)
    assert isinstance(entry, kdcache.CacheEntry)
    assert entry.temperature == 4.0 and entry.manifest["teacher_name"] == t.name
    for i in range(ds.num_shards):
        ids, vals = entry.read_shard(i)
        shard = ds.read_shard(i)
        np.testing.assert_array_equal(ids, shard["sample_id"])
        np.testing.assert_allclose(vals, (t.logits(shard["inputs"]) / 4.0).numpy(), rtol=1e-6)


def test_rerun_is_a_hit_and_changed_temperature_or_weights_a_miss(root):
    ds = toy_dataset()
    first = _build(ds, [linear_teacher(seed=0), linear_teacher(seed=1)], root)
    assert first.build_report.hit is False and first.build_report.computed == 8
    again = _build(ds, [linear_teacher(seed=0), linear_teacher(seed=1)], root)
    assert again.build_report.hit is True and again.build_report.computed == 0
    assert again.key == first.key
    hotter = _build(ds, [linear_teacher(seed=0), linear_teacher(seed=1)], root, temperature=3.0)
    assert hotter.build_report.hit is False and hotter.key != first.key
    changed = linear_teacher(seed=1)
    with torch.no_grad():
        changed.module.bias[0] += 1e-3
    other = _build(ds, [linear_teacher(seed=0), changed], root)
    # only the changed teacher is computed; the other entry is reused
    assert other.build_report.hit is False
    assert other.build_report.computed == 4 and other.build_report.reused == 0
    assert other.entries[0].key == first.entries[0].key
    assert other.entries[1].key != first.entries[1].key


def test_adding_a_teacher_computes_only_that_teacher(root):
    ds = toy_dataset()
    a, b = linear_teacher(seed=0), linear_teacher(seed=1)
    _build(ds, a, root)
    both = _build(ds, [a, b], root)
    assert both.build_report.computed == 4  # b's four shards only


def test_interrupted_build_resumes_only_missing_shards(root):
    ds = toy_dataset()
    t = linear_teacher()
    entry = _build(ds, t, root)
    full = entry.manifest
    # simulate a crash before the manifest, with shard 2 never committed
    os.unlink(os.path.join(entry.location.uri, "manifest.json"))
    os.unlink(os.path.join(entry.shards_location.uri, "shard-00002.json"))
    with pytest.raises(kdcache.errors.CacheIncompleteError):
        kdcache.open_cache(entry.location.uri)
    resumed = _build(ds, t, root)
    assert resumed.build_report.computed == 1 and resumed.build_report.reused == 3
    again = resumed.manifest
    assert again["shards"] == full["shards"]  # byte-identical shards, same checksums


def test_nan_in_teacher_output_names_teacher_and_sample_and_keeps_committed(root):
    ds = toy_dataset(num_shards=4)
    bad_row = ds.read_shard(2)["inputs"][5]
    inner = linear_teacher().module
    teacher = kdcache.Teacher.from_module(NaNAt(inner, float(bad_row[0])), name="flaky")
    with pytest.raises(TeacherOutputError, match=r"'flaky'.*sample_id 1037"):
        _build(ds, teacher, root)
    entry = kdcache.CacheEntry(root, os.listdir(os.path.join(root, "entries"))[0])
    assert not entry.is_complete
    assert [entry.committed_shard(i) is not None for i in range(4)] == [True, True, False, False]
    assert not os.path.exists(os.path.join(entry.location.uri, "lease.json"))


def test_bad_arguments(root):
    ds = toy_dataset()
    with pytest.raises(ConfigError, match="temperature"):
        _build(ds, linear_teacher(), root, temperature=0.0)
    with pytest.raises(ConfigError, match="executor"):
        kdcache.build_cache(ds, linear_teacher(), temperature=1.0, root=root, executor="dask")
    with pytest.raises(ConfigError, match="unique"):
        kdcache.TeacherEnsemble([linear_teacher(), linear_teacher()])


def test_sparse_entries_for_classifiers_equal_dense_at_k_equal_v(root):
    from kdcache import losses, targets

    ds = toy_dataset(num_classes=5)
    t = linear_teacher()
    top2 = _build(ds, t, root, kind="topk", params={"k": 2, "labels": True})
    full = _build(ds, t, root, kind="topk", params={"k": 5})
    dense = _build(ds, t, root)
    assert len({top2.key, full.key, dense.key}) == 3
    ids, kept = top2.read_sparse_shard(1)
    shard = ds.read_shard(1)
    np.testing.assert_array_equal(ids, shard["sample_id"])
    # the label is always kept (an extra slot when it is not in the top 2)
    for row, label in zip(kept.ids_BS.tolist(), shard["labels"].tolist(), strict=True):
        assert label in row
    _, all5 = full.read_sparse_shard(1)
    student = torch.randn(len(ids), 5)
    want = losses.forward_kl(
        student, targets.log_probs(torch.tensor(dense.read_shard(1)[1])), temperature=2.0
    )
    got = losses.forward_kl(student, all5, temperature=2.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_missing_shard_of_a_complete_entry_is_recomputed_not_a_false_hit(root):
    ds = toy_dataset()
    t = linear_teacher()
    entry = _build(ds, t, root)
    before = entry.manifest["shards"]
    os.unlink(os.path.join(entry.shards_location.uri, "shard-00001.arrow"))
    again = _build(ds, t, root)
    assert again.build_report.hit is False
    assert (again.build_report.computed, again.build_report.reused) == (1, 3)
    assert again.manifest["shards"] == before


def test_verify_repair_then_rebuild_recomputes_only_the_altered_shard(root, capsys):
    from kdcache.cli import main

    ds = toy_dataset()
    t = linear_teacher()
    entry = _build(ds, t, root)
    path = os.path.join(entry.shards_location.uri, "shard-00002.arrow")
    with open(path, "r+b") as f:  # same size, altered bytes: only the checksum sees it
        f.seek(300)
        f.write(b"\xff\xfe\xfd")
    assert main(["verify", entry.location.uri]) == 1
    assert "--repair" in capsys.readouterr().out
    assert main(["verify", entry.location.uri, "--repair"]) == 0  # repaired all it found
    assert "uncommitted" in capsys.readouterr().out
    again = _build(ds, t, root)
    assert (again.build_report.computed, again.build_report.reused) == (1, 3)
    assert main(["verify", entry.location.uri]) == 0


class _RecordingExecutor(LocalExecutor):
    """A local executor that records what the base hands to ``_run`` and its closes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.runs: list[list[ShardTask]] = []
        self.num_closed = 0

    def _run(self, context, tasks, report, *, progress):
        self.runs.append(list(tasks))
        super()._run(context, tasks, report, progress=progress)

    def close(self):
        self.num_closed += 1


def test_second_build_through_a_local_executor_computes_only_missing_shards(root):
    ds = toy_dataset()
    a, b = linear_teacher(seed=0), linear_teacher(seed=1)
    ex = _RecordingExecutor(ExecutorConfig(kind="local", batch_size=3))
    first = kdcache.build_cache(ds, [a, b], temperature=2.0, root=root, executor=ex, progress=False)
    assert ex.runs == [[ShardTask(i, (0, 1)) for i in range(4)]]
    assert first.entries[0].manifest["build"] == {"executor": "local", "batch_size": 3}
    before = [e.manifest["shards"] for e in first.entries]
    # a crash before the manifests: teacher a lost shard 1's commit record, b lost 1 and 3
    for entry, lost in zip(first.entries, [(1,), (1, 3)], strict=True):
        os.unlink(os.path.join(entry.location.uri, "manifest.json"))
        for i in lost:
            os.unlink(os.path.join(entry.shards_location.uri, f"shard-{i:05d}.json"))
    again = kdcache.build_cache(ds, [a, b], temperature=2.0, root=root, executor=ex, progress=False)
    # the base skipped the committed (teacher, shard) pairs: shard 1 for both, 3 for b only
    assert ex.runs[1] == [ShardTask(1, (0, 1)), ShardTask(3, (1,))]
    assert (again.build_report.computed, again.build_report.reused) == (3, 5)
    assert again.build_report.per_actor["local"]["shards"] == 2
    assert [e.manifest["shards"] for e in again.entries] == before
    assert ex.num_closed == 0  # an executor passed in is the caller's to close
    # nothing left to compute: the base does not call _run at all
    hit = kdcache.build_cache(ds, [a, b], temperature=2.0, root=root, executor=ex, progress=False)
    assert hit.build_report.hit and len(ex.runs) == 2


def test_executor_run_skips_committed_pairs_and_runs_nothing_when_all_are_done(root):
    ds = toy_dataset()
    t = linear_teacher()
    entry = _build(ds, t, root)
    entry.invalidate_shard(2)
    context = TaskContext(ds, [t], [entry], batch_size=8)
    report = kdcache.BuildReport(hit=False, keys=[entry.key])
    with _RecordingExecutor() as ex:
        ran = ex.run(context, [(i, [0]) for i in range(4)], report, progress=False)
        assert ran == ex.runs[0] == [ShardTask(2, (0,))]
        num_rows = len(ds.read_shard(2)["sample_id"])
        assert (report.computed, report.reused, report.num_samples) == (1, 3, num_rows)
        assert entry.committed_shard(2) is not None
        assert ex.run(context, [(i, [0]) for i in range(4)], report, progress=False) == []
        assert len(ex.runs) == 1 and report.reused == 7
    assert ex.num_closed == 1  # the context manager closes it


def test_build_cache_closes_the_executor_it_makes(root, monkeypatch):
    made: list[_RecordingExecutor] = []

    class Made(_RecordingExecutor):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setitem(EXECUTORS, "local", Made)
    entry = kdcache.build_cache(
        toy_dataset(),
        linear_teacher(),
        temperature=2.0,
        root=root,
        executor=ExecutorConfig(kind="local", batch_size=7),
        progress=False,
    )
    assert [m.num_closed for m in made] == [1]
    assert made[0].config.batch_size == 7
    assert entry.manifest["build"] == {"executor": "local", "batch_size": 7}


def test_get_executor_accepts_names_configs_and_executors_and_names_what_it_got():
    assert isinstance(get_executor("local"), LocalExecutor)
    config = ExecutorConfig(kind="local", batch_size=5)
    ex = get_executor(config)
    assert isinstance(ex, LocalExecutor) and ex.config is config
    assert get_executor(ex) is ex
    assert LocalExecutor(batch_size=6).config == ExecutorConfig(kind="local", batch_size=6)
    with pytest.raises(ConfigError, match=r"'dask'.*|.*'ray', 'local', an ExecutorConfig"):
        get_executor("dask")
    with pytest.raises(ConfigError) as info:
        get_executor(42)
    assert "42" in str(info.value) and "'ray', 'local', an ExecutorConfig" in str(info.value)
    with pytest.raises(ConfigError, match=r"kind='ray'.*get_executor"):
        LocalExecutor(ExecutorConfig(kind="ray"))
    with pytest.raises(ConfigError, match="not both"):
        LocalExecutor(ExecutorConfig(kind="local"), batch_size=3)
    with pytest.raises(ConfigError, match="one entry per teacher"):
        TaskContext(toy_dataset(), [linear_teacher()], [], batch_size=8)
