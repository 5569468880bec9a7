"""Cache entries: keys, the commit protocol, checks on read, leases, aliases."""

from __future__ import annotations

import json
import os
import pickle
import threading
import time

import numpy as np
import pytest
import torch

import kdcache
from kdcache import schema
from kdcache.cache import CacheEntry, Lease, write_alias
from kdcache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheNotFoundError,
    FormatVersionError,
    LeaseHeldError,
    SampleIdMismatchError,
    TeacherOutputError,
)
from kdcache.schema import TargetSpec
from kdcache.storage import Location
from kdcache.testing import linear_teacher, toy_dataset


def _entry(root, temperature=2.0, storage_dtype="float32", teacher_seed=0):
    ds = toy_dataset()
    spec = schema.entry_spec(
        ds.fingerprint(),
        linear_teacher(seed=teacher_seed).fingerprint(),
        TargetSpec(temperature, storage_dtype=storage_dtype),
    )
    entry = CacheEntry(root, schema.content_key(spec))
    entry.write_spec(spec)
    return entry


def _fill(entry, ds=None):
    ds = ds or toy_dataset()
    rng = np.random.default_rng(1)
    written = {}
    for i in range(ds.num_shards):
        ids = ds.read_shard(i)["sample_id"]
        vals = rng.standard_normal((len(ids), 5)).astype(np.float32)
        entry.write_shard(i, ids, vals)
        written[i] = (ids, vals)
    return written


def test_key_is_canonical_and_sensitive_to_what_changes_bytes():
    ds = toy_dataset()
    t = linear_teacher()
    base = schema.entry_spec(ds.fingerprint(), t.fingerprint(), TargetSpec(4.0))
    same = schema.entry_spec(
        toy_dataset().fingerprint(), linear_teacher().fingerprint(), TargetSpec(4)
    )
    assert schema.content_key(base) == schema.content_key(same)
    changed = [
        schema.entry_spec(ds.fingerprint(), t.fingerprint(), TargetSpec(2.0)),
        schema.entry_spec(ds.fingerprint(), linear_teacher(seed=1).fingerprint(), TargetSpec(4.0)),
        schema.entry_spec(
            ds.fingerprint(), t.fingerprint(), TargetSpec(4.0, storage_dtype="float16")
        ),
        schema.entry_spec(toy_dataset(seed=3).fingerprint(), t.fingerprint(), TargetSpec(4.0)),
    ]
    keys = {schema.content_key(s) for s in changed} | {schema.content_key(base)}
    assert len(keys) == 5


def test_run_specific_settings_do_not_change_the_dataset_fingerprint():
    # labels are not part of the fingerprint: relabelled data reuses the teacher cache
    a = toy_dataset()
    b = kdcache.ArrayDataset(
        a.sample_ids,
        a.inputs,
        np.zeros(len(a), np.int64),
        num_shards=4,
        preprocessing=a.preprocessing,
    )
    assert a.fingerprint() == b.fingerprint()


def test_round_trip_and_manifest_written_last(root):
    entry = _entry(root)
    written = _fill(entry)
    assert not entry.is_complete
    with pytest.raises(CacheIncompleteError, match="Rerun the same build"):
        kdcache.open_cache(entry.location.uri)
    entry.commit(4, {"teacher_name": "t"})
    opened = kdcache.open_cache(entry.location.uri)
    assert opened.num_rows == 64 and opened.num_shards == 4 and opened.vocab_size == 5
    for i, (ids, vals) in written.items():
        got_ids, got = opened.read_shard(i)
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got, vals)


def test_rewrite_is_byte_identical(root):
    entry = _entry(root)
    _fill(entry)
    before = {n: entry.shards_location.read_bytes(n) for n in entry.shards_location.listdir()}
    _fill(entry)
    after = {n: entry.shards_location.read_bytes(n) for n in entry.shards_location.listdir()}
    assert before == after
    assert not [n for n in after if n.startswith(".tmp-")]


def test_commit_refuses_missing_shard(root):
    entry = _entry(root)
    _fill(entry)
    os.unlink(os.path.join(entry.shards_location.uri, "shard-00002.json"))
    with pytest.raises(CacheIncompleteError, match="shard 2"):
        entry.commit(4, {})
    assert not entry.is_complete


def test_altered_or_truncated_shard_is_named(root):
    entry = _entry(root)
    _fill(entry)
    entry.commit(4, {})
    path = os.path.join(entry.shards_location.uri, "shard-00001.arrow")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-100] ^= 0xFF
    with open(path, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(CacheCorruptError, match=r"shard-00001\.arrow"):
        kdcache.open_cache(entry.location.uri).read_shard(1)
    with open(path, "wb") as f:
        f.write(bytes(data[:-10]))
    with pytest.raises(CacheCorruptError, match="truncated or altered"):
        kdcache.open_cache(entry.location.uri).read_shard(1)


def test_newer_format_version_refused(root):
    entry = _entry(root)
    _fill(entry)
    entry.commit(4, {})
    manifest = json.loads(entry.location.read_bytes(schema.MANIFEST_FILE))
    manifest["format_version"] = schema.FORMAT_VERSION + 1
    entry.location.write_atomic(schema.MANIFEST_FILE, json.dumps(manifest).encode())
    with pytest.raises(FormatVersionError, match=f"format_version {schema.FORMAT_VERSION + 1}"):
        kdcache.open_cache(entry.location.uri)


def test_missing_cache_and_bad_uri(root):
    with pytest.raises(CacheNotFoundError):
        kdcache.open_cache(os.path.join(root, "entries", "0" * 32))
    with pytest.raises(CacheNotFoundError):
        kdcache.open_cache(root)


def test_float16_refuses_overflow_instead_of_inf(root):
    entry = _entry(root, storage_dtype="float16")
    ids = np.arange(3, dtype=np.int64)
    with pytest.raises(TeacherOutputError, match="float16"):
        entry.write_shard(0, ids, np.array([[1.0, 7e4], [0, 0], [0, 0]], np.float32))
    assert entry.committed_shard(0) is None
    rec = entry.write_shard(0, ids, np.array([[1.0, 6e4], [0, 0], [0, 0]], np.float32))
    assert rec.num_rows == 3


def test_duplicate_ids_refused(root):
    entry = _entry(root)
    with pytest.raises(SampleIdMismatchError):
        entry.write_shard(0, np.array([1, 1]), np.zeros((2, 5), np.float32))


def test_pickle_round_trip(root):
    entry = _entry(root)
    clone = pickle.loads(pickle.dumps(entry))
    assert clone.key == entry.key and clone.location.uri == entry.location.uri
    loc = pickle.loads(pickle.dumps(Location(root)))
    assert loc == Location(root)


def test_alias_and_key_lookup(root):
    entry = _entry(root)
    _fill(entry)
    entry.commit(4, {})
    write_alias(root, "best", entry.key, "entry")
    assert kdcache.open_cache("best", root=root).key == entry.key
    assert kdcache.open_cache(entry.key, root=root).key == entry.key
    assert kdcache.open_cache(f"file://{entry.location.uri}").key == entry.key


def test_lease_second_job_waits_then_reuses(root):
    entry = _entry(root)
    first = Lease(entry, ttl_s=60)
    assert first.acquire()

    def finish():
        time.sleep(0.5)
        _fill(entry)
        entry.commit(4, {})
        first.release()

    th = threading.Thread(target=finish)
    th.start()
    second = Lease(entry, ttl_s=60)
    assert second.acquire(wait_s=30, poll_s=0.1) is False  # it was completed meanwhile
    th.join()


def test_lease_expired_is_taken_over_and_live_one_times_out(root):
    entry = _entry(root)
    assert Lease(entry, ttl_s=60).acquire()
    with pytest.raises(LeaseHeldError):
        Lease(entry, ttl_s=60).acquire(wait_s=0.3, poll_s=0.1)
    dead = _entry(root, temperature=3.0)
    assert Lease(dead, ttl_s=-1).acquire()  # already expired: a crashed job
    taker = Lease(dead, ttl_s=60)
    assert taker.acquire(wait_s=5, poll_s=0.1)
    assert json.loads(dead.location.read_bytes(schema.LEASE_FILE))["owner"] == taker.owner


def test_ensemble_view_saved_and_reopened(root):
    ds = toy_dataset()
    teachers = [linear_teacher(seed=s) for s in range(2)]
    view = kdcache.build_cache(
        ds,
        kdcache.TeacherEnsemble(teachers, weights=[1, 3]),
        temperature=2.0,
        root=root,
        executor="local",
        progress=False,
    )
    path = os.path.join(root, "ensembles", f"{view.key}.json")
    reopened = kdcache.open_cache(path)
    assert isinstance(reopened, kdcache.EnsembleView)
    assert [e.key for e in reopened.entries] == [e.key for e in view.entries]
    assert reopened.weights == [1.0, 3.0]
    _, vals = reopened.read_shard(0)
    expect = torch.stack([t.logits(ds.read_shard(0)["inputs"]) / 2.0 for t in teachers])
    np.testing.assert_allclose(vals, expect.numpy(), rtol=1e-6)
