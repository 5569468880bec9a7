"""The store conformance suite: the pytest tests every shard backend and every root pass.

:class:`StoreSuite` is a pytest test class (as zarr-python ships ``zarr.testing.store``):
subclass it in a test module under a name pytest collects (``Test...``) and every test
runs over each ``backend`` x ``kind`` on the root that ``store_root`` gives. Override a
fixture to point the suite at your part; keep the rest.

* ``backend``: the :class:`~kdcache.stores.backends.ShardBackend` names to test
  (default: every backend in ``kdcache.stores.backends.BACKENDS``). Register your own
  for the duration of a test with :func:`register_backend`.
* ``store_root``: the cache root URI (default: a fresh local directory). Point it at an
  object store to test a filesystem (``tests/integration/test_s3.py`` runs the suite on
  an S3-compatible server this way).
* ``kind``: the target kinds (default :data:`KINDS`: dense and every sparse kind).

The tests cover the round trip of dense and sparse rows (ordinary, one-row and empty
shards), byte-identical rewrites, checksums naming altered and truncated files, the
pickle round trip of backends, locations and entries (they travel to Ray actors), the
manifest written last, readers opening only what the manifest lists, refusal of the
wrong kind of rows, narrow storage dtypes (round trip, overflow refused) and
:class:`~kdcache.errors.CacheCorruptError` from ``decode`` on garbage.

Example (a test module of your own; ``MyBackend`` implements ``ShardBackend``)::

    import pytest
    from kdcache.testing.store_suite import StoreSuite, register_backend

    class TestMyBackend(StoreSuite):
        @pytest.fixture(params=["mine"])
        def backend(self, request, monkeypatch):
            register_backend(monkeypatch, MyBackend())  # MyBackend().name == "mine"
            return request.param

This module needs pytest; ``import kdcache.testing`` does not import it.
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import torch

import kdcache
from kdcache import schema, targets
from kdcache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    ConfigError,
    TeacherOutputError,
)
from kdcache.schema import TargetSpec
from kdcache.stores import backends as _backends
from kdcache.stores.admin import describe, verify
from kdcache.stores.backends import ShardBackend, get_backend
from kdcache.stores.entry import CacheEntry
from kdcache.stores.fs import Location

__all__ = [
    "KINDS",
    "SHARD_ROWS",
    "VOCAB",
    "StoreSuite",
    "assert_same_rows",
    "fill",
    "make_entry",
    "make_rows",
    "read",
    "register_backend",
    "reopen",
]

#: The target kinds the suite writes (``mixture`` is made by ensembles, not by a teacher).
KINDS = ("dense", "topk", "topp", "sampled")
#: Classes (vocabulary size V) of the rows the suite writes.
VOCAB = 40
#: Rows per shard: an ordinary one, a one-row one and an empty one.
SHARD_ROWS = (12, 1, 0)

_PARAMS: dict[str, dict[str, Any] | None] = {
    "dense": None,
    "topk": {"k": 6, "grid_temperatures": [1.0, 4.0]},
    "topp": {"top_p": 0.5, "max_k": 8, "labels": True},
    "sampled": {"num_samples": 10, "seed": 3, "labels": True},
}


def register_backend(monkeypatch: pytest.MonkeyPatch, backend: ShardBackend) -> None:
    """Make ``backend`` usable under ``backend.name`` until the test ends.

    Adds it to the backend registry (``kdcache.stores.backends.BACKENDS``) and its name to
    the names a :class:`~kdcache.schema.TargetSpec` accepts (``kdcache.schema.BACKENDS``);
    ``monkeypatch`` undoes both.
    """
    monkeypatch.setattr(schema, "BACKENDS", schema.BACKENDS)  # restored after the test
    monkeypatch.setitem(_backends.BACKENDS, backend.name, backend)  # likewise
    _backends.register_backend(backend)


def make_entry(root: str, backend: str, kind: str, storage_dtype: str = "float32") -> CacheEntry:
    """An uncommitted entry under ``root`` for three shards of :data:`SHARD_ROWS` rows."""
    spec = TargetSpec(
        2.0, kind=kind, storage_dtype=storage_dtype, backend=backend, params=_PARAMS[kind]
    )
    material = schema.entry_spec(
        {"num_records": sum(SHARD_ROWS), "shards": [{"num_records": n} for n in SHARD_ROWS]},
        {"architecture": "conformance", "weights_sha256": backend + kind},
        spec,
    )
    entry = CacheEntry(root, schema.content_key(material))
    entry.write_spec(material)
    return entry


def make_rows(kind: str, num_rows: int, seed: int) -> tuple[np.ndarray, Any]:
    """(sample_ids int64 [N], dense scaled logits float32 [N, V] or SparseTargets) of one shard.

    V is :data:`VOCAB`; the values are seeded, so equal arguments give equal rows.
    """
    rng = np.random.default_rng(seed)
    ids = np.arange(num_rows, dtype=np.int64) * 7 + 1000 * seed
    scaled = torch.from_numpy(rng.standard_normal((num_rows, VOCAB)).astype(np.float32) * 3)
    labels = torch.from_numpy(rng.integers(0, VOCAB, num_rows))
    if kind == "dense":
        return ids, scaled.numpy()
    if kind == "topk":
        return ids, targets.topk_targets(scaled, 6, temperature=2.0, grid_temperatures=(1.0, 4.0))
    if kind == "topp":
        return ids, targets.topp_targets(scaled, 0.5, max_k=8, labels_B=labels)
    gen = torch.Generator().manual_seed(3)
    return ids, targets.sampled_targets(scaled, 10, labels_B=labels, generator=gen)


def _compact(t: targets.SparseTargets) -> dict[str, np.ndarray]:
    """Kept entries first (stable), pads after: the form a store gives back."""
    order = (~t.valid_BS).to(torch.int8).argsort(dim=1, stable=True)
    out = {
        "ids": t.ids_BS.gather(1, order).numpy(),
        "values": t.values_BS.float().gather(1, order).numpy(),
        "log_partition": t.log_partition_B.float().numpy(),
    }
    if t.counts_BS is not None:
        out["counts"] = t.counts_BS.gather(1, order).numpy()
    if t.tail_log_mass_B is not None:
        out["tail"] = t.tail_log_mass_B.float().numpy()
    if t.log_partition_grid_BG is not None:
        out["grid"] = t.log_partition_grid_BG.float().numpy()
    return out


def assert_same_rows(kind: str, got: Any, want: Any) -> None:
    """Assert that two shards' rows are equal: exactly, value by value, padding aside."""
    if kind == "dense":
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        return
    assert isinstance(got, targets.SparseTargets) and isinstance(want, targets.SparseTargets)
    assert got.kind == want.kind and got.num_slots == want.num_slots
    assert got.grid_temperatures == want.grid_temperatures
    g, w = _compact(got), _compact(want)
    assert g.keys() == w.keys()
    for name in w:
        np.testing.assert_array_equal(g[name], w[name], err_msg=name)


def fill(entry: CacheEntry, kind: str) -> dict[int, tuple[np.ndarray, Any]]:
    """Write every shard of :data:`SHARD_ROWS`; returns what was written, by shard index."""
    written = {}
    for i, n in enumerate(SHARD_ROWS):
        ids, rows = make_rows(kind, n, seed=i + 1)
        entry.write_shard(i, ids, rows, vocab_size=VOCAB)
        written[i] = (ids, rows)
    return written


def reopen(entry: CacheEntry) -> CacheEntry:
    """``entry`` opened afresh from its URI with :func:`kdcache.open_cache`, as a reader would."""
    opened = kdcache.open_cache(entry.location.uri)
    assert isinstance(opened, CacheEntry), f"open_cache gave {type(opened).__name__}"
    return opened


def read(entry: CacheEntry, index: int) -> tuple[np.ndarray, Any]:
    """One shard's (sample_ids, rows), dense or sparse as the entry holds."""
    if entry.is_sparse:
        return entry.read_sparse_shard(index)
    return entry.read_shard(index)


class StoreSuite:
    """The tests every backend passes, on whatever root ``store_root`` gives.

    Not collected itself (its name does not start with ``Test``); subclass it.
    """

    @pytest.fixture
    def store_root(self, tmp_path: Any) -> str:
        """The cache root URI the tests write under (a fresh local directory)."""
        return str(tmp_path / "cache")

    @pytest.fixture(params=sorted(_backends.BACKENDS))
    def backend(self, request: pytest.FixtureRequest) -> str:
        """A registered backend name."""
        return str(request.param)

    @pytest.fixture(params=KINDS)
    def kind(self, request: pytest.FixtureRequest) -> str:
        """A target kind."""
        return str(request.param)

    def test_round_trip(self, store_root, backend, kind):
        entry = make_entry(store_root, backend, kind)
        written = fill(entry, kind)
        entry.commit(len(SHARD_ROWS), {"teacher_name": "t"})
        opened = reopen(entry)
        assert opened.num_rows == sum(SHARD_ROWS) and opened.vocab_size == VOCAB
        for i, (ids, rows) in written.items():
            got_ids, got = read(opened, i)
            np.testing.assert_array_equal(got_ids, ids)
            assert_same_rows(kind, got, rows)
        suffix = get_backend(backend).suffix
        assert [r.file for r in opened.shards] == [f"shard-0000{i}{suffix}" for i in range(3)]
        assert verify(opened).ok
        described = describe(opened, num_samples=2)
        assert [s["sample_id"] for s in described["samples"]] == written[0][0][:2].tolist()
        assert all(0.0 < p <= 1.0 for s in described["samples"] for p in s["top_probs"])

    @pytest.mark.parametrize(
        "token_kind, params",
        [
            ("topk", {"k": 6, "value_bits": 8}),
            ("sampled", {"num_samples": 10, "labels": True}),
            ("sampled_counts", {"num_samples": 10}),
        ],
    )
    def test_token_level_sequence_layout(self, store_root, backend, token_kind, params):
        """A token-level entry of format 2 (the sequence-major layout: ragged columns with
        offsets of their own, bit-packed bytes) reads back what was written."""
        spec = TargetSpec(2.0, kind=token_kind, backend=backend, params=params)
        material = schema.entry_spec(
            {"tokens": "conformance"}, {"weights_sha256": backend}, spec, token_level=True
        )
        entry = CacheEntry(store_root, schema.content_key(material))
        entry.write_spec(material)
        rng = np.random.default_rng(5)
        lengths = [5, 1, 9]
        ids = np.repeat(np.array([3, 11, 7], np.int64), lengths)
        positions = np.concatenate([np.arange(2, 2 + n) for n in lengths])
        scaled = torch.from_numpy(rng.standard_normal((len(ids), VOCAB)).astype(np.float32) * 3)
        labels = torch.from_numpy(rng.integers(0, VOCAB, len(ids)))
        rows = targets.sparsify(scaled, spec, labels_M=labels, row_sample_ids_M=ids)
        entry.write_shard(0, ids, rows, vocab_size=VOCAB, positions_N=positions)
        entry.commit(1, {})
        opened = reopen(entry)
        cols = opened.read_columns(0)
        np.testing.assert_array_equal(cols.sample_ids_N, ids)
        np.testing.assert_array_equal(cols.rows[schema.COL_POSITION], positions)
        got_ids, got = opened.read_sparse_shard(0)
        np.testing.assert_array_equal(got_ids, ids)
        want = rows
        assert isinstance(want, targets.SparseTargets)
        if params.get("value_bits"):  # lossy values: compare ids and the exact parts
            assert isinstance(got, targets.SparseTargets)
            np.testing.assert_array_equal(got.ids_BS.numpy(), want.ids_BS.numpy())
            np.testing.assert_array_equal(got.log_partition_B.numpy(), want.log_partition_B.numpy())
            assert opened.quantization_error()["kl_nats_max"] < 1e-3
        else:
            assert_same_rows(token_kind, got, want)

    def test_rewrite_is_byte_identical(self, store_root, backend, kind):
        entry = make_entry(store_root, backend, kind)
        fill(entry, kind)
        loc = entry.shards_location
        before = {n: loc.read_bytes(n) for n in loc.listdir() if not loc.is_dir(n)}
        fill(entry, kind)
        after = {n: loc.read_bytes(n) for n in loc.listdir() if not loc.is_dir(n)}
        assert before == after and len(after) == 2 * len(SHARD_ROWS)
        assert not [n for n in after if n.startswith(".tmp-")]

    def test_checksum_names_truncated_and_altered_files(self, store_root, backend, kind):
        entry = make_entry(store_root, backend, kind)
        fill(entry, kind)
        entry.commit(len(SHARD_ROWS), {})
        name = entry.manifest_record(0).file
        data = entry.shards_location.read_bytes(name)
        altered = bytearray(data)
        altered[len(data) // 2] ^= 0x01
        for bad in (bytes(altered), data[:-7]):
            entry.shards_location.write_atomic(name, bad)
            with pytest.raises(CacheCorruptError, match=name.replace(".", r"\.")):
                read(reopen(entry), 0)
        # verify=False skips the checksum; the decoder must still refuse a truncated file.
        with pytest.raises(CacheCorruptError):
            opened = reopen(entry)
            if opened.is_sparse:
                opened.read_sparse_shard(0, verify=False)
            else:
                opened.read_shard(0, verify=False)
        result = verify(reopen(entry))
        assert not result.ok and name in result.problems[0]

    def test_pickle_round_trip(self, store_root, backend, kind):
        be = get_backend(backend)
        clone = pickle.loads(pickle.dumps(be))
        assert type(clone) is type(be) and clone.suffix == be.suffix
        entry = make_entry(store_root, backend, kind)
        written = fill(entry, kind)
        entry.commit(len(SHARD_ROWS), {})
        loc = pickle.loads(pickle.dumps(entry.location))
        assert loc == entry.location and loc.exists(schema.MANIFEST_FILE)
        twin = pickle.loads(pickle.dumps(reopen(entry)))
        ids, rows = read(twin, 0)
        np.testing.assert_array_equal(ids, written[0][0])
        assert_same_rows(kind, rows, written[0][1])
        # an entry pickled before commit (as a Ray actor gets it) writes normally
        other = make_entry(store_root, backend, kind, storage_dtype="float16")
        remote = pickle.loads(pickle.dumps(other))
        ids0, rows0 = make_rows(kind, 3, seed=9)
        assert remote.write_shard(0, ids0, rows0, vocab_size=VOCAB).num_rows == 3
        assert other.committed_shard(0) is not None

    def test_manifest_is_written_last(self, store_root, backend, kind):
        entry = make_entry(store_root, backend, kind)
        fill(entry, kind)
        assert all(entry.committed_shard(i) is not None for i in range(len(SHARD_ROWS)))
        assert not entry.location.exists(schema.MANIFEST_FILE)
        with pytest.raises(CacheIncompleteError, match="Rerun the same build"):
            kdcache.open_cache(entry.location.uri)
        with pytest.raises(CacheIncompleteError, match="shard 3"):
            entry.commit(len(SHARD_ROWS) + 1, {})
        assert not entry.location.exists(schema.MANIFEST_FILE)
        entry.commit(len(SHARD_ROWS), {})
        assert entry.location.exists(schema.MANIFEST_FILE)

    def test_readers_open_only_listed_files(self, store_root, backend, kind, monkeypatch):
        entry = make_entry(store_root, backend, kind)
        fill(entry, kind)
        entry.commit(len(SHARD_ROWS), {})
        suffix = get_backend(backend).suffix
        junk = {
            f"shard-00009{suffix}": b"not a shard",
            "shard-00009.json": b"{}",
            f".tmp-shard-00000{suffix}.deadbeef": b"half a file",
        }
        for name, data in junk.items():
            entry.shards_location.write_atomic(name, data)
        opened: list[str] = []
        real = Location.read_buffer  # read_bytes reads through it too

        def spy(self, name):
            opened.append(self.display(name))
            return real(self, name)

        monkeypatch.setattr(Location, "read_buffer", spy)
        cache = reopen(entry)
        for i in range(cache.num_shards):
            read(cache, i)
        listed = {entry.shards_location.display(r.file) for r in cache.shards}
        allowed = listed | {entry.location.display(schema.MANIFEST_FILE)}
        allowed |= {entry.location.display(schema.SPEC_FILE)}
        assert set(opened) <= allowed and listed <= set(opened)

    def test_wrong_kind_of_rows_refused(self, store_root, backend, kind):
        entry = make_entry(store_root, backend, kind)
        other = "topk" if kind == "dense" else "dense"
        ids, rows = make_rows(other, 4, seed=1)
        with pytest.raises(ConfigError):
            entry.write_shard(0, ids, rows, vocab_size=VOCAB)
        assert entry.committed_shard(0) is None

    @pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
    @pytest.mark.parametrize("kind", ["dense", "topk"])
    def test_narrow_storage_dtypes_round_trip_and_refuse_overflow(
        self, store_root, backend, kind, storage_dtype
    ):
        torch_dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16}[storage_dtype]
        entry = make_entry(store_root, backend, kind, storage_dtype=storage_dtype)
        ids, rows = make_rows(kind, 12, seed=1)
        entry.write_shard(0, ids, rows, vocab_size=VOCAB)
        entry.commit(1, {})
        got_ids, got = read(reopen(entry), 0)
        np.testing.assert_array_equal(got_ids, ids)
        if kind == "dense":
            # values come back as the storage dtype would round them (bfloat16 upcast exactly)
            want = torch.from_numpy(rows).to(torch_dtype).float().numpy()
            assert got.dtype == (np.float16 if storage_dtype == "float16" else np.float32)
            np.testing.assert_array_equal(np.asarray(got, np.float32), want)
            assert not np.array_equal(want, rows)  # the cast really happened
        else:
            assert got.values_BS.dtype == torch_dtype
            want_vals = rows.values_BS.to(torch_dtype).float()
            np.testing.assert_array_equal(got.values_BS.float().numpy(), want_vals.numpy())
            # the log-partition is float32 whatever the storage dtype
            np.testing.assert_array_equal(got.log_partition_B.numpy(), rows.log_partition_B.numpy())
        # out of range: refused, nothing written, never stored as inf
        big = 7e4 if storage_dtype == "float16" else 3.4e38
        bad_ids, bad = make_rows(kind, 3, seed=2)
        if kind == "dense":
            bad = bad.copy()
            bad[1, 2] = big
        else:
            values = bad.values_BS.clone()
            values[1, 0] = big
            bad = targets.SparseTargets(
                bad.ids_BS,
                values,
                bad.log_partition_B,
                bad.kind,
                grid_temperatures=bad.grid_temperatures,
                log_partition_grid_BG=bad.log_partition_grid_BG,
                tail_log_mass_B=bad.tail_log_mass_B,
            )
        with pytest.raises(TeacherOutputError, match=f"exceeds {storage_dtype}"):
            entry.write_shard(1, bad_ids, bad, vocab_size=VOCAB)
        assert entry.committed_shard(1) is None

    def test_decode_of_garbage_raises_cache_corrupt_error(self, backend):
        with pytest.raises(CacheCorruptError, match="somewhere"):
            get_backend(backend).decode(b"\x00" * 64, "somewhere")
