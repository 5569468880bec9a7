"""Nothing read is trusted: edited specs, torn or edited manifests and sidecars, paths that
climb out of an entry, and the build lease's race window. Each test fails on a reader that
believes what it reads."""

from __future__ import annotations

import json
import os
import threading
import time

import numpy as np
import pytest
import torch

import kdcache
from kdcache import schema
from kdcache.cli import main as cli
from kdcache.errors import CacheCorruptError, LeaseHeldError, TeacherOutputError
from kdcache.stores.entry import CacheEntry
from kdcache.stores.lease import Lease
from kdcache.testing import linear_teacher, toy_dataset


def _build(root, temperature=4.0):
    ds = toy_dataset(num_records=40, num_shards=2)
    return ds, kdcache.build_cache(
        ds, linear_teacher(seed=0), temperature=temperature, root=root, executor="local",
        progress=False,
    )  # fmt: skip


def _path(entry, name):
    return os.path.join(entry.location.path, name)


def _rewrite_json(path, change):
    with open(path) as f:
        obj = json.load(f)
    change(obj)
    with open(path, "w") as f:
        json.dump(obj, f)


def test_edited_spec_is_refused_on_open_and_in_verify_and_repaired(root, capsys):
    _, entry = _build(root)
    _rewrite_json(_path(entry, schema.SPEC_FILE), lambda s: s["targets"].update(temperature=2.0))
    with pytest.raises(CacheCorruptError, match="does not hash to its key"):
        kdcache.open_cache(entry.location.uri)
    assert cli(["verify", entry.location.uri]) == 1
    assert "does not hash to its key" in capsys.readouterr().out
    assert cli(["verify", entry.location.uri, "--repair"]) == 0
    assert "repaired" in capsys.readouterr().out
    again = kdcache.open_cache(entry.location.uri)
    assert again.temperature == 4.0  # the value the shards were built at
    assert cli(["verify", entry.location.uri]) == 0


def test_torn_manifest_is_a_clear_fault_and_a_rebuild_heals_it(root, capsys):
    _, entry = _build(root)
    path = _path(entry, schema.MANIFEST_FILE)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])  # torn mid-write
    with pytest.raises(CacheCorruptError, match=r"manifest\.json is not a readable manifest"):
        kdcache.open_cache(entry.location.uri)
    assert cli(["verify", entry.location.uri]) == 1
    assert "FAULT" in capsys.readouterr().out
    assert cli(["verify", entry.location.uri, "--repair"]) == 0
    _, rebuilt = _build(root)
    assert rebuilt.key == entry.key
    assert rebuilt.build_report.computed == 0 and rebuilt.build_report.reused == 2
    assert cli(["verify", entry.location.uri]) == 0


def test_an_unfinished_entry_is_a_fault_exit_1_not_an_error(root, capsys):
    _, entry = _build(root)
    os.remove(_path(entry, schema.MANIFEST_FILE))
    assert cli(["verify", entry.location.uri]) == 1
    assert "no manifest" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["../../../../outside.arrow", "/etc/passwd", "a/b.arrow", ".."])
def test_shard_paths_cannot_leave_the_entry(root, name):
    _, entry = _build(root)

    def climb(m):
        m["shards"][0]["file"] = name

    _rewrite_json(_path(entry, schema.MANIFEST_FILE), climb)
    with pytest.raises(CacheCorruptError, match="not a plain file name"):
        kdcache.open_cache(entry.location.uri)


def test_edited_shard_record_fields_are_refused(root):
    _, entry = _build(root)
    _rewrite_json(
        _path(entry, schema.MANIFEST_FILE), lambda m: m["shards"][1].update(num_rows="many")
    )
    with pytest.raises(CacheCorruptError, match="num_rows must be an integer"):
        kdcache.open_cache(entry.location.uri)


def test_a_torn_sidecar_is_recomputed_on_resume(root):
    ds, entry = _build(root)
    os.remove(_path(entry, schema.MANIFEST_FILE))  # as if the build was interrupted
    sidecar = os.path.join(entry.shards_location.path, schema.shard_stem(1) + ".json")
    with open(sidecar, "w") as f:
        f.write('{"index": 1, "file": ')
    again = kdcache.build_cache(
        ds, linear_teacher(seed=0), temperature=4.0, root=root, executor="local", progress=False
    )
    assert again.build_report.computed == 1 and again.build_report.reused == 1
    assert kdcache.open_cache(again.location.uri).num_rows == 40


def test_lease_is_never_seen_empty_by_a_second_job(root, monkeypatch):
    """The race the old lease had: created empty, filled after; a second job reading in
    between took it as expired and built the same entry at once."""
    entry = CacheEntry(root, "0" * 32)
    entry.location.makedirs()
    real_fsync = os.fsync

    def slow_fsync(fd):  # widen the window between creating and filling the lease
        time.sleep(0.6)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    first = Lease(entry, ttl_s=60)
    got = []
    t = threading.Thread(target=lambda: got.append(first.acquire(wait_s=5)))
    t.start()
    time.sleep(0.2)  # the first job is inside its create
    second = Lease(entry, ttl_s=60)
    with pytest.raises(LeaseHeldError):
        second.acquire(wait_s=1.5, poll_s=0.1)
    t.join()
    assert got == [True]
    held = json.loads(entry.location.read_bytes(schema.LEASE_FILE))
    assert held["owner"] == first.owner
    first.release()
    assert not entry.location.exists(schema.LEASE_FILE)
    assert not [n for n in os.listdir(entry.location.path) if n.startswith(".tmp-")]


def test_an_unreadable_lease_counts_as_held_until_it_expires(root):
    entry = CacheEntry(root, "1" * 32)
    entry.location.makedirs()
    entry.location.write_atomic(schema.LEASE_FILE, b"{torn")
    with pytest.raises(LeaseHeldError, match="unreadable"):
        Lease(entry, ttl_s=60).acquire(wait_s=0.3, poll_s=0.1)
    old = time.time() - 120
    os.utime(_path(entry, schema.LEASE_FILE), (old, old))
    lease = Lease(entry, ttl_s=60)
    assert lease.acquire(wait_s=1, poll_s=0.1)
    lease.release()


def test_aliases_and_views_cannot_point_outside_their_folders(root, tmp_path):
    _, entry = _build(root)
    aliases = os.path.join(root, schema.ALIASES_DIR)
    os.makedirs(aliases, exist_ok=True)
    with open(os.path.join(aliases, "evil.json"), "w") as f:
        json.dump({"key": "../../../" + str(tmp_path.name), "kind": "entry"}, f)
    with pytest.raises(CacheCorruptError, match="not a cache key"):
        kdcache.open_cache("evil", root=root)
    with pytest.raises(kdcache.errors.CacheNotFoundError, match="not a key"):
        kdcache.open_cache("..", root=root)
    with pytest.raises(kdcache.errors.CacheNotFoundError):
        kdcache.open_cache("../entries/" + entry.key + "/..", root=root)
    views = os.path.join(root, schema.ENSEMBLES_DIR)
    os.makedirs(views, exist_ok=True)
    with open(os.path.join(views, "a" * 32 + ".json"), "w") as f:
        json.dump({"format_version": 1, "entries": ["/etc"], "rule": "mean_probs"}, f)
    with pytest.raises(CacheCorruptError, match="not a cache key"):
        kdcache.open_cache("a" * 32, root=root)


def test_ls_lists_the_rest_and_marks_damaged_records(root, capsys):
    _, entry = _build(root)
    _, other = _build(root, temperature=2.0)
    with open(_path(entry, schema.MANIFEST_FILE), "w") as f:
        f.write("{torn")
    aliases = os.path.join(root, schema.ALIASES_DIR)
    os.makedirs(aliases, exist_ok=True)
    with open(os.path.join(aliases, "bad.json"), "w") as f:
        f.write("[]")
    assert cli(["ls", root]) == 0
    out = capsys.readouterr().out
    assert f"entry     {entry.key}  DAMAGED" in out
    assert f"{other.key}  complete" in out
    assert "alias     bad  DAMAGED" in out


def test_gc_never_follows_links_nor_deletes_what_it_did_not_write(root, tmp_path):
    _, entry = _build(root)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "shard-00009.arrow").write_bytes(b"precious")
    (outside / "precious.txt").write_bytes(b"precious")
    shards = entry.shards_location.path
    (tmp_path / "mine.txt").write_bytes(b"x")
    with open(os.path.join(shards, "notes.txt"), "w") as f:
        f.write("a user's file")
    os.symlink(outside, os.path.join(shards, "linked"))
    os.symlink(outside / "shard-00009.arrow", os.path.join(shards, "shard-00008.arrow"))
    result = kdcache.stores.admin.gc(root)
    assert result.removed == []
    assert (outside / "shard-00009.arrow").read_bytes() == b"precious"
    assert os.path.exists(os.path.join(shards, "notes.txt"))
    # a symlinked shards/ folder is left alone as a whole
    other_root = tmp_path / "cache2"
    _, e2 = _build(str(other_root))
    moved = tmp_path / "elsewhere"
    os.rename(e2.shards_location.path, moved)
    os.symlink(moved, e2.shards_location.path)
    (moved / "shard-00077.arrow").write_bytes(b"not listed")
    assert kdcache.stores.admin.gc(str(other_root)).removed == []
    assert (moved / "shard-00077.arrow").exists()


def test_a_resume_recomputes_a_committed_shard_whose_bytes_were_altered(root):
    ds, entry = _build(root)
    os.remove(_path(entry, schema.MANIFEST_FILE))  # an interrupted build, to be resumed
    rec = entry.shards[0] if entry.is_complete else None
    assert rec is None
    sidecar = os.path.join(entry.shards_location.path, schema.shard_stem(0) + ".json")
    with open(sidecar) as f:
        name = json.load(f)["file"]
    data_path = os.path.join(entry.shards_location.path, name)
    with open(data_path, "r+b") as f:  # same size, one byte flipped
        f.seek(os.path.getsize(data_path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    again = kdcache.build_cache(
        ds, linear_teacher(seed=0), temperature=4.0, root=root, executor="local", progress=False
    )
    assert again.build_report.computed == 1 and again.build_report.reused == 1
    assert kdcache.stores.admin.verify(kdcache.open_cache(again.location.uri)).ok


@pytest.mark.parametrize("storage_dtype", ["float16"])
def test_a_very_large_temperature_in_a_narrow_dtype_is_refused_not_stored(root, storage_dtype):
    ds = toy_dataset(num_records=40, num_shards=2)
    with pytest.raises(kdcache.errors.TeacherOutputError, match="cannot represent"):
        kdcache.build_cache(
            ds, linear_teacher(seed=0), temperature=1e12, root=root, executor="local",
            storage_dtype=storage_dtype, progress=False,
        )  # fmt: skip
    # an ordinary temperature still stores in the narrow dtype
    ok = kdcache.build_cache(
        ds, linear_teacher(seed=0), temperature=2.0, root=root, executor="local",
        storage_dtype=storage_dtype, progress=False,
    )  # fmt: skip
    assert kdcache.stores.admin.verify(ok).ok


def test_narrow_dtypes_refuse_what_they_cannot_represent_in_both_directions():
    import numpy as np

    from kdcache.stores.codec import to_storage_dtype

    tiny = np.array([[1e-9, -2e-9, 3e-9]], np.float32)  # float16 flushes all to 0
    with pytest.raises(kdcache.errors.TeacherOutputError, match="cannot represent"):
        to_storage_dtype(tiny, "float16", "t")
    assert to_storage_dtype(tiny, "bfloat16", "t").dtype == np.uint16  # bf16 has the range
    close = np.array([[1000.0, 1000.01, 1000.02]], np.float32)  # 8 bits of mantissa
    with pytest.raises(kdcache.errors.TeacherOutputError, match="cannot represent"):
        to_storage_dtype(close, "bfloat16", "t")
    ordinary = np.random.default_rng(0).normal(size=(64, 50)).astype(np.float32) * 3
    for dtype in ("float16", "bfloat16"):
        to_storage_dtype(ordinary, dtype, "t")  # ordinary logits are fine


def test_bad_roots_are_clear_errors_not_tracebacks(root, capsys):
    assert cli(["ls", "bogus://x"]) == 2
    err = capsys.readouterr().err
    assert "not on a filesystem kdcache can use" in err and "Traceback" not in err
    assert cli(["gc", os.path.join(root, "nowhere"), "--dry-run"]) == 2
    assert "does not exist" in capsys.readouterr().err
    from kdcache.stores.fs import Location

    assert Location("s3://KEY:SECRET@bucket/p").display() == "s3://bucket/p"


def test_verify_reports_a_damaged_member_of_an_ensemble_as_a_fault(root, capsys):
    ds = toy_dataset(num_records=40, num_shards=2)
    view = kdcache.build_cache(
        ds, kdcache.TeacherEnsemble([linear_teacher(seed=0), linear_teacher(seed=1)]),
        temperature=4.0, root=root, executor="local", progress=False,
    )  # fmt: skip
    member = view.entries[1]
    with open(_path(member, schema.MANIFEST_FILE), "w") as f:
        f.write("{torn")
    assert cli(["verify", view.key, "--root", root]) == 1
    out = capsys.readouterr().out
    assert member.key in out and "FAULT" in out


def test_an_alias_that_cannot_be_one_is_refused_before_the_build():
    from kdcache.jobs.config import BuildConfig, from_dict

    base = {
        "root": "r",
        "dataset": {"factory": "kdcache.testing:toy_dataset"},
        "teachers": [{"name": "t", "factory": "m:f", "checkpoint": "c"}],
    }
    for bad in ("bad/alias", "0" * 32):
        with pytest.raises(kdcache.errors.ConfigError, match="alias"):
            from_dict(BuildConfig, {**base, "alias": bad})


def test_ids_duplicated_across_shards_are_refused_before_the_commit(root):
    """Two shards holding one sample_id: the manifest is never written (only verify found
    it before); disjoint and interleaved-but-unique ids still commit."""
    from kdcache.data.base import ArrayDataset
    from kdcache.errors import SampleIdMismatchError

    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((40, 8)).astype(np.float32)
    ids = np.arange(40)
    interleaved = ArrayDataset(np.concatenate([ids[::2], ids[1::2]]), inputs, num_shards=2)
    entry = kdcache.build_cache(
        interleaved,
        linear_teacher(),
        temperature=2.0,
        root=root,
        executor="local",
        progress=False,
    )
    assert entry.is_complete  # overlapping ranges, unique ids: read and accepted

    class Overlapping(ArrayDataset):
        def __post_init__(self) -> None:  # skip the dataset's own uniqueness check
            self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
            self._bounds = np.array([0, 20, 40])

    dup = ids.copy()
    dup[25] = 7  # shard 1 repeats an id of shard 0
    bad = Overlapping(dup, inputs, num_shards=2)
    with pytest.raises(SampleIdMismatchError, match=r"sample_id 7 is in shard 0 and in shard 1"):
        kdcache.build_cache(
            bad, linear_teacher(), temperature=2.0, root=root, executor="local", progress=False
        )
    key = schema.content_key(
        schema.entry_spec(
            bad.fingerprint(), linear_teacher().fingerprint(), schema.TargetSpec(temperature=2.0)
        )
    )
    assert not CacheEntry(root, key).is_complete  # no manifest


# -- bad input to the teacher stage: a clear error before (or instead of) wasted work ------


def _dataset_declaring(rows_declared, *, rows_read=None):
    """An ArrayDataset whose fingerprint declares ``rows_declared`` per shard and whose
    shard ``i`` reads ``rows_read[i]`` rows (default: as declared)."""
    from kdcache.data.base import ArrayDataset

    n = sum(rows_read or rows_declared)
    rng = np.random.default_rng(0)

    class Lying(ArrayDataset):
        def __post_init__(self) -> None:
            self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
            bounds = np.cumsum([0, *(rows_read or rows_declared)])
            self._bounds = bounds
            self.num_shards = len(rows_declared)

        def fingerprint(self):
            return {
                "lying": True,
                "shards": [{"num_records": int(r), "i": i} for i, r in enumerate(rows_declared)],
            }

    return Lying(np.arange(n), rng.standard_normal((n, 8)).astype(np.float32))


def _local_build(ds, teachers, root):
    return kdcache.build_cache(
        ds, teachers, temperature=2.0, root=root, executor="local", progress=False
    )


def test_empty_dataset_and_declared_empty_shards_are_refused_before_any_work(root):
    from kdcache.errors import DataError

    with pytest.raises(DataError, match=r"no shards \(an empty dataset\)"):
        _local_build(_dataset_declaring([]), linear_teacher(), root)
    with pytest.raises(DataError, match=r"shard\(s\) 1 declare no records.*nothing was computed"):
        _local_build(_dataset_declaring([5, 0, 5]), linear_teacher(), root)
    assert not os.path.exists(os.path.join(root, "entries")) or not any(
        f.startswith("shard-") for _, _, fs in os.walk(root) for f in fs
    )


def test_a_shard_reading_other_rows_than_declared_is_refused_and_others_kept(root):
    from kdcache.errors import DataError

    ds = _dataset_declaring([10, 10, 10], rows_read=[10, 9, 10])
    with pytest.raises(DataError, match=r"shard 1 of Lying read 9 records, but its fingerprint "):
        _local_build(ds, linear_teacher(), root)
    (entry_dir,) = os.listdir(os.path.join(root, "entries"))
    shards = sorted(os.listdir(os.path.join(root, "entries", entry_dir, "shards")))
    assert "shard-00000.json" in shards and "shard-00001.json" not in shards  # 0 kept, 1 not


def test_a_teacher_whose_width_changes_between_batches_is_an_error(root):
    class Flaky(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def forward(self, x):
            self.calls += 1
            return torch.zeros(x.shape[0], 5 if self.calls == 1 else 6)

    teacher = kdcache.Teacher.from_module(Flaky(), name="flaky")
    with pytest.raises(TeacherOutputError, match=r"'flaky' returned V=6 .* V=5 for the batches"):
        kdcache.build_cache(
            toy_dataset(num_records=40, num_shards=1), teacher, temperature=2.0, root=root,
            executor=kdcache.ExecutorConfig(kind="local", batch_size=8), progress=False,
        )  # fmt: skip


def test_teachers_of_different_class_counts_stop_the_build_at_the_first_shard(root):
    ds = toy_dataset(num_records=80, num_shards=8)
    five, six = linear_teacher(num_classes=5), linear_teacher(num_classes=6, name="six")
    with pytest.raises(TeacherOutputError, match=r"'linear-0': V=5, 'six': V=6"):
        _local_build(ds, [five, six], root)
    sidecars = [f for _, _, fs in os.walk(root) for f in fs if f.endswith(".json")]
    assert sum(f.startswith("shard-") for f in sidecars) == 2  # shard 0 of each, not 8


def test_a_cache_hit_writes_nothing_so_it_works_on_a_read_only_root(root, monkeypatch):
    from kdcache.stores.fs import Location

    ds = toy_dataset(num_records=40, num_shards=2)
    teachers = [linear_teacher(seed=0), linear_teacher(seed=1)]
    first = _local_build(ds, teachers, root)

    def refuse(self, *args, **kwargs):
        raise PermissionError(f"read-only file system: {self.uri}")

    monkeypatch.setattr(Location, "write_atomic", refuse)
    monkeypatch.setattr(Location, "makedirs", refuse)
    again = _local_build(ds, teachers, root)
    assert again.build_report.hit and again.key == first.key


def test_config_errors_never_echo_credentials():
    from kdcache.errors import ConfigError, redact
    from kdcache.jobs import config as cfg

    bad = {
        "output_dir": "memory://AKIAEXAMPLE:wJalrXUtnFEMI@bucket/run?secret_key=s3cr3t&x=1",
        "student": {"factory": "a:b"},
        "cache": {"uri": "k"},
        "dataset": {"factory": "a:b"},
    }
    with pytest.raises(ConfigError) as info:
        cfg.from_dict(cfg.TrainConfig, bad)
    text = str(info.value)
    assert "memory://***@bucket/run" in text
    assert "wJalrXUtnFEMI" not in text and "AKIAEXAMPLE" not in text and "s3cr3t" not in text
    assert redact("s3://b/p?token=abc&region=us") == "s3://b/p?token=***&region=us"


def test_shards_are_hashed_once_per_file_version_per_process(root, monkeypatch):
    """A second epoch does not hash unchanged shards again; a shard rewritten since (new
    size or modification time) is hashed, and an altered one is still refused."""
    from kdcache.stores import entry as entry_mod

    _, cache = _build(root)
    calls = []
    real = entry_mod.sha256_hex
    monkeypatch.setattr(entry_mod, "sha256_hex", lambda data: calls.append(1) or real(data))
    entry_mod._VERIFIED.clear()
    cache.read_shard(0)
    cache.read_shard(0)
    cache.read_shard(1)
    assert len(calls) == 2  # shard 0 once, shard 1 once
    path = os.path.join(cache.location.path, "shards", "shard-00000.arrow")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    data[-20] ^= 0xFF
    st = os.stat(path)
    with open(path, "wb") as f:
        f.write(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000))  # a rewrite: a new time
    with pytest.raises(CacheCorruptError, match="truncated or altered"):
        cache.read_shard(0)
    assert len(calls) >= 3
