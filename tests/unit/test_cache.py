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
from kdcache.stores.admin import verify
from kdcache.stores.catalog import write_alias
from kdcache.stores.entry import CacheEntry
from kdcache.stores.fs import Location
from kdcache.stores.lease import Lease
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


# -- gc ---------------------------------------------------------------------------------


def _touch(loc, name, data=b"x" * 10):
    loc.write_atomic(name, data)


def test_gc_removes_staging_and_unreferenced_files_only(root, capsys):
    from kdcache.cli import main
    from kdcache.stores.admin import gc

    done = _entry(root)
    _fill(done)
    done.commit(4, {})
    shards = done.shards_location
    _touch(shards, ".tmp-shard-00000.arrow.abc")
    _touch(done.location, ".tmp-manifest.json.abc")
    _touch(shards, "shard-00007.arrow")  # not listed by the manifest
    _touch(shards, "shard-00007.json")
    _touch(shards, "shard-00001.parquet")  # another backend's leftover
    building = _entry(root, temperature=3.0)  # incomplete, no lease: resumable
    building.write_shard(0, np.arange(3), np.zeros((3, 5), np.float32))
    _touch(building.shards_location, ".tmp-shard-00001.arrow.abc")
    leased = _entry(root, temperature=5.0)  # a live build
    assert Lease(leased, ttl_s=600).acquire()
    _touch(leased.shards_location, ".tmp-shard-00000.arrow.abc")
    _touch(Location(root).child("aliases"), ".tmp-best.json.abc")
    garbage = {
        shards.display(".tmp-shard-00000.arrow.abc"),
        done.location.display(".tmp-manifest.json.abc"),
        shards.display("shard-00007.arrow"),
        shards.display("shard-00007.json"),
        shards.display("shard-00001.parquet"),
        building.shards_location.display(".tmp-shard-00001.arrow.abc"),
        Location(root).child("aliases").display(".tmp-best.json.abc"),
    }

    assert main(["gc", root, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"would remove {len(garbage)} file(s)" in out and leased.key in out
    dry = gc(root, dry_run=True)
    assert set(dry.removed) == garbage and dry.skipped_leased == [leased.key]
    assert all(os.path.exists(p) for p in garbage)  # dry run deleted nothing

    result = gc(root)
    assert set(result.removed) == garbage and result.num_bytes == 10 * len(garbage)
    assert not any(os.path.exists(p) for p in garbage)
    assert os.path.exists(leased.shards_location.display(".tmp-shard-00000.arrow.abc"))
    assert building.committed_shard(0) is not None  # resumable work kept
    assert verify(kdcache.open_cache(done.location.uri)).ok
    assert gc(root).removed == []  # idempotent


def test_gc_treats_expired_lease_as_dead(root):
    from kdcache.stores.admin import gc

    entry = _entry(root)
    assert Lease(entry, ttl_s=-1).acquire()  # a crashed job's lease
    _touch(entry.shards_location, ".tmp-shard-00000.arrow.abc")
    assert [os.path.basename(p) for p in gc(root).removed] == [".tmp-shard-00000.arrow.abc"]


# -- readers refuse a cache that disagrees with them --------------------------------------


def test_reader_mismatch_refused_unless_retempering(root):
    from kdcache.errors import SpecMismatchError
    from kdcache.stores.view import check_reader

    entry = _entry(root)
    _fill(entry)
    entry.commit(4, {"teacher_name": "linear-0"})
    uri = entry.location.uri
    with pytest.raises(SpecMismatchError, match="retemper=True"):
        kdcache.open_cache(uri, temperature=4.0)
    assert kdcache.open_cache(uri, temperature=4.0, retemper=True).key == entry.key
    assert kdcache.open_cache(uri, temperature=2.0, vocab_size=5, teachers=["linear-0"])
    with pytest.raises(SpecMismatchError, match="V=5 classes"):
        kdcache.open_cache(uri, vocab_size=10)
    with pytest.raises(SpecMismatchError, match="linear-0"):
        kdcache.open_cache(uri, teachers=["linear-0", "linear-1"])
    with pytest.raises(SpecMismatchError):
        kdcache.open_cache(uri, teachers=["other"])
    assert kdcache.open_cache(uri, teachers=[entry.key])  # keys name teachers too

    # sparse: top-k re-tempers only to a grid temperature; sampled never
    ds = toy_dataset()
    for kind, params, ok in (
        ("topk", {"k": 2, "grid_temperatures": [4.0]}, True),
        ("topk", {"k": 2}, False),
        ("sampled", {"num_samples": 4}, False),
    ):
        spec = schema.entry_spec(
            ds.fingerprint(),
            linear_teacher().fingerprint(),
            TargetSpec(2.0, kind=kind, params=params),
        )
        sparse = CacheEntry(root, schema.content_key(spec))
        sparse.write_spec(spec)
        scaled = torch.randn(3, 5)
        rows = (
            kdcache.targets.topk_targets(
                scaled, 2, temperature=2.0, grid_temperatures=params.get("grid_temperatures", ())
            )
            if kind == "topk"
            else kdcache.targets.sampled_targets(scaled, 4)
        )
        sparse.write_shard(0, np.arange(3), rows, vocab_size=5)
        sparse.commit(1, {})
        check_reader(sparse, temperature=2.0)
        if ok:
            check_reader(sparse, temperature=4.0, retemper=True)
        else:
            with pytest.raises(SpecMismatchError, match="cannot be re-tempered"):
                check_reader(sparse, temperature=4.0, retemper=True)


# -- killing a writer never leaves a complete-looking cache with data missing -------------

_WRITER = r"""
import json, os, sys
import numpy as np
from kdcache.stores.entry import CacheEntry
from kdcache.stores.lease import Lease

root, plan = sys.argv[1], json.loads(sys.argv[2])
real_replace = os.replace

def write(key, crash_at):
    calls = [0]
    def replace(src, dst):
        calls[0] += 1
        if calls[0] == crash_at[0] and crash_at[1] == "before":
            os._exit(17)
        real_replace(src, dst)
        if calls[0] == crash_at[0] and crash_at[1] == "after":
            os._exit(17)
    os.replace = replace
    entry = CacheEntry(root, key)
    lease = Lease(entry, ttl_s=0.2)
    assert lease.acquire()
    for i in range(2):
        rng = np.random.default_rng(i)
        entry.write_shard(i, np.arange(4) + 10 * i, rng.standard_normal((4, 3)).astype("f4"))
    entry.commit(2, {})
    lease.release()
    os._exit(0)

codes = []
for key, crash_at in plan:
    pid = os.fork()
    if pid == 0:
        write(key, crash_at)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print(json.dumps(codes))
"""


def test_killed_writer_leaves_previous_or_resumable_state(root):
    import subprocess
    import sys

    from kdcache.stores.admin import gc

    # renames in a 2-shard build: data 0, sidecar 0, data 1, sidecar 1, manifest
    points = [(n, when) for n in range(1, 6) for when in ("before", "after")]
    points.append((99, "never"))
    entries = [_entry(root, temperature=1.0 + j) for j in range(len(points))]
    plan = [(e.key, p) for e, p in zip(entries, points, strict=True)]
    proc = subprocess.run(
        [sys.executable, "-c", _WRITER, root, json.dumps(plan)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    codes = json.loads(proc.stdout.strip().splitlines()[-1])
    assert codes == [17] * (len(points) - 1) + [0]

    def expected(i):
        rng = np.random.default_rng(i)
        return np.arange(4) + 10 * i, rng.standard_normal((4, 3)).astype("f4")

    for entry, (n, when) in zip(entries, points, strict=True):
        complete_now = n == 99 or (n == 5 and when == "after")
        assert entry.is_complete == complete_now, (n, when)
        if not complete_now:
            with pytest.raises(CacheIncompleteError):
                kdcache.open_cache(entry.location.uri)
            # resume: take over the dead lease, compute only what is not committed
            lease = Lease(entry, ttl_s=60)
            assert lease.acquire(wait_s=10, poll_s=0.05)
            redo = [i for i in range(2) if entry.committed_shard(i) is None]
            step = n + (0.5 if when == "after" else 0.0)  # a sidecar rename commits
            assert redo == [i for i, sidecar in ((0, 2), (1, 4)) if step < sidecar + 0.5]
            for i in redo:
                entry.write_shard(i, *expected(i))
            entry.commit(2, {})
            lease.release()
        cache = kdcache.open_cache(entry.location.uri)
        for i in range(2):
            ids, vals = cache.read_shard(i)
            np.testing.assert_array_equal(ids, expected(i)[0])
            np.testing.assert_array_equal(vals, expected(i)[1])
        assert cache.num_rows == 8  # reads above checked every SHA-256
    leftovers = gc(root).removed
    assert all(".tmp-" in p for p in leftovers)
    assert len(leftovers) == 5  # one staging file per "before" crash


def test_alias_names_cannot_shadow_keys_or_escape_the_root(root):
    from kdcache.errors import ConfigError

    entry = _entry(root)
    _fill(entry)
    entry.commit(4, {})
    for bad in ("0" * 32, "../evil", "a/b", ""):
        with pytest.raises(ConfigError, match="plain name"):
            write_alias(root, bad, entry.key, "entry")
    assert not os.path.exists(os.path.join(root, "evil.json"))
