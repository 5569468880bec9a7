"""The teacher stage in-process (executor="local"): hits, misses, resume, fatal errors."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import kdcache
from kdcache.errors import ConfigError, TeacherOutputError
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
    assert main(["verify", entry.location.uri, "--repair"]) == 1
    assert "uncommitted" in capsys.readouterr().out
    again = _build(ds, t, root)
    assert (again.build_report.computed, again.build_report.reused) == (1, 3)
    assert main(["verify", entry.location.uri]) == 0
