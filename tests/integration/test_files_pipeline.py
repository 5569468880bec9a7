"""Both stages over a file-backed dataset: the driver reads no records (Ray actors do), the
student joins through the same plan, and an input file changed after the build (same
size, same modification time: invisible to the plan) is caught by the digest the teacher
stage recorded with each shard."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import kdcache
from kdcache.data import FileDataset, ParquetDataset
from kdcache.errors import InputChangedError
from kdcache.stores.admin import verify
from kdcache.testing import linear_teacher

pytestmark = pytest.mark.integration

N, F = 120, 8


def _write(path, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((N, F)).astype(np.float32)
    table = pa.table(
        {
            "id": pa.array(np.arange(N) + 500, pa.int64()),
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), F),
            "y": pa.array(rng.integers(0, 5, N), pa.int64()),
        }
    )
    pq.write_table(table, path, row_group_size=20, compression="none", use_dictionary=False)
    return x


def _dataset(path):
    return ParquetDataset(
        path, id_column="id", input_columns="x", label_column="y", rows_per_shard=20
    )


@pytest.fixture(scope="module")
def local_ray():
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    yield
    ray.shutdown()


def test_the_driver_reads_no_records_on_ray(local_ray, tmp_path, root, monkeypatch):
    path = str(tmp_path / "data.parquet")
    x = _write(path)
    ds = _dataset(path)

    def no_records_here(*args, **kwargs):
        raise AssertionError("the driver read input records")

    # In this (driver) process any read of records fails; the actors read their shards.
    monkeypatch.setattr(FileDataset, "open_shard", no_records_here)
    monkeypatch.setattr(FileDataset, "read_shard", no_records_here)
    cache = kdcache.build_cache(
        ds,
        [linear_teacher(seed=0), linear_teacher(seed=1)],
        temperature=2.0,
        root=root,
        executor=kdcache.ExecutorConfig(num_actors=2),
        progress=False,
    )
    monkeypatch.undo()
    assert verify(cache).ok
    assert all(rec.input_digest for e in cache.entries for rec in e.shards)
    ids, scaled = cache.entries[0].read_shard(2)
    want = linear_teacher(seed=0).logits(torch.from_numpy(x[40:60])) / 2.0
    np.testing.assert_array_equal(ids, np.arange(540, 560))
    np.testing.assert_allclose(scaled, want.numpy(), rtol=1e-6, atol=1e-6)


def test_an_input_changed_after_the_build_is_refused_at_the_join(tmp_path, root):
    path = str(tmp_path / "data.parquet")
    x = _write(path)
    teacher = linear_teacher()
    cache = kdcache.build_cache(
        _dataset(path), teacher, temperature=2.0, root=root, executor="local", progress=False
    )
    stream = kdcache.SoftTargetDataset(cache, _dataset(path), batch_size=30)
    assert sum(len(b["sample_id"]) for b in stream) == N

    # One changed float of row 70 (shard 3), same size; the modification time restored,
    # so the plan and the cache key cannot see it.
    st = os.stat(path)
    with open(path, "r+b") as f:
        data = f.read()
        at = data.find(x[70].tobytes())
        assert at > 0
        f.seek(at)
        f.write(np.float32(x[70, 0] + 1).tobytes())
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    changed = _dataset(path)
    assert changed.fingerprint() == _dataset(path).fingerprint()
    again = kdcache.build_cache(
        changed, teacher, temperature=2.0, root=root, executor="local", progress=False
    )
    assert again.build_report.hit and again.key == cache.key
    stream = kdcache.SoftTargetDataset(again, changed, batch_size=30)
    with pytest.raises(InputChangedError, match=r"input shard 3 is not the one teacher"):
        for _ in stream:
            pass


def double(inputs):
    return np.asarray(inputs, dtype=np.float32) * 2


def test_a_transform_is_in_the_key_and_the_student_may_use_its_own(tmp_path, root):
    from kdcache.data import Transform

    path = str(tmp_path / "data.parquet")
    x = _write(path)
    teacher = linear_teacher()
    plain = kdcache.build_cache(
        _dataset(path), teacher, temperature=2.0, root=root, executor="local", progress=False
    )
    doubled = _dataset(path).with_transform(Transform("test_files_pipeline:double"))
    other = kdcache.build_cache(
        doubled, teacher, temperature=2.0, root=root, executor="local", progress=False
    )
    assert other.key != plain.key  # the preprocessing is part of what the teacher saw
    ids, scaled = other.read_shard(0)
    np.testing.assert_array_equal(ids, np.arange(500, 520))
    want = teacher.logits(torch.from_numpy(x[:20] * 2)) / 2.0
    np.testing.assert_allclose(scaled, want.numpy(), rtol=1e-6, atol=1e-6)
    # the student reads the same files with its own transform and still joins
    stream = kdcache.SoftTargetDataset(plain, doubled, batch_size=40, shuffle=False)
    batch = next(iter(stream))
    np.testing.assert_allclose(batch["inputs"].numpy(), x[:40] * 2)
