"""Cache entries and ensemble views: the commit protocol on the write side, and the
checks on the read side.

Commit protocol (``docs/format.md``):

1. ``spec.json`` (the key material) is written first, so an unfinished entry says what
   it is.
2. Each shard's data file is written under a temporary name, flushed, fsynced and renamed
   to its deterministic name ``shard-NNNNN.<suffix>``; then its sidecar
   ``shard-NNNNN.json`` (rows, id range, SHA-256, bytes) is written the same way. The
   sidecar is the shard's commit record. A retried task rewrites identical bytes.
3. When every shard has a sidecar, the driver re-reads the sidecars, checks them, and
   writes ``manifest.json`` atomically. Readers open only what the manifest lists.

A lease file (``lease.json``, owner and expiry) keeps two jobs from building the same
entry at once; the second waits for the manifest or takes over an expired lease.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheNotFoundError,
    ConfigError,
    LeaseHeldError,
    SampleIdMismatchError,
    SpecMismatchError,
    TeacherOutputError,
)
from kdcache.schema import ShardRecord, TargetSpec
from kdcache.storage import Location, sha256_hex, split_query
from kdcache.stores import (
    ShardColumns,
    bfloat16_bits_to_float32,
    get_backend,
    to_storage_dtype,
)

log = logging.getLogger(__name__)


def _selector(path: str) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, allow_not_found=True, recursive=False)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


# -- targets <-> columns ---------------------------------------------------------------------


def dense_to_columns(
    sample_ids_N: np.ndarray,
    scaled_logits_NV: Any,
    spec: TargetSpec,
    vocab_size: int | None,
    where: str,
) -> tuple[ShardColumns, dict[str, Any]]:
    """Dense rows as :class:`ShardColumns`: ``scaled_logits`` [N, V] in the storage dtype.

    Returns:
        ``(columns, sidecar extras)``; extras hold ``vocab_size``.

    Raises:
        ConfigError: sparse targets given to a dense entry.
        TeacherOutputError: shapes disagree, a value is not finite or does not fit the
            storage dtype.
    """
    if not hasattr(scaled_logits_NV, "shape") or hasattr(scaled_logits_NV, "ids_BS"):
        raise ConfigError(f"{where}: a dense entry takes an [N, V] array of scaled logits")
    if hasattr(scaled_logits_NV, "detach"):  # a torch tensor
        scaled_logits_NV = scaled_logits_NV.detach().float().cpu().numpy()
    values = np.asarray(scaled_logits_NV)
    if values.ndim != 2 or values.shape[0] != len(sample_ids_N):
        raise TeacherOutputError(
            f"{where}: expected sample_ids [N] and values [N, V], got {sample_ids_N.shape} "
            f"and {values.shape}"
        )
    vocab = int(values.shape[1])
    if vocab_size is not None and int(vocab_size) != vocab:
        raise TeacherOutputError(f"{where}: values have V={vocab}, vocab_size={vocab_size}")
    stored = to_storage_dtype(values, spec.storage_dtype, where)
    meta = {"kind": "dense", "storage_dtype": spec.storage_dtype, "vocab_size": vocab}
    cols = ShardColumns(sample_ids_N, rows={schema.COL_SCALED_LOGITS: stored}, meta=meta)
    return cols, {"vocab_size": vocab}


def sparse_to_columns(
    sample_ids_N: np.ndarray,
    sparse: Any,
    spec: TargetSpec,
    vocab_size: int | None,
    where: str,
) -> tuple[ShardColumns, dict[str, Any]]:
    """Sparse rows (a :class:`kdcache.targets.SparseTargets`) as ragged columns.

    Pads are dropped: row n's kept entries (in slot order) become entries
    ``offsets[n]:offsets[n + 1]`` of ``ids`` (int32), ``values`` (storage dtype) and, for
    sampled targets, ``counts`` (int32). Per-row ``log_partition``, ``tail_log_mass`` and
    ``log_partition_grid`` stay float32.

    Returns:
        ``(columns, sidecar extras)``; extras hold ``vocab_size``, ``num_entries`` (E) and
        ``num_slots`` (S).

    Raises:
        ConfigError: not a SparseTargets, another kind or grid than the spec's, or no V.
        TeacherOutputError: row count differs, an id is outside [0, V), a log-partition
            is not finite, or a value does not fit the storage dtype.
    """
    from kdcache.targets import PAD_ID, SparseTargets

    if not isinstance(sparse, SparseTargets):
        raise ConfigError(
            f"{where}: a {spec.kind!r} entry takes kdcache.targets.SparseTargets, got "
            f"{type(sparse).__name__}"
        )
    if sparse.kind != spec.kind:
        raise ConfigError(f"{where}: targets are {sparse.kind!r}, the entry holds {spec.kind!r}")
    grid = spec.grid_temperatures
    if len(grid) != len(sparse.grid_temperatures) or not all(
        abs(a - b) <= 1e-6 * max(abs(a), abs(b))
        for a, b in zip(grid, sparse.grid_temperatures, strict=False)
    ):
        raise ConfigError(
            f"{where}: targets carry grid temperatures {sparse.grid_temperatures}, the "
            f"entry's spec says {grid}"
        )
    if vocab_size is None or int(vocab_size) < 1:
        raise ConfigError(f"{where}: sparse targets need vocab_size=V (got {vocab_size!r})")
    vocab = int(vocab_size)
    if vocab >= 2**31:
        raise ConfigError(f"{where}: V={vocab} does not fit the int32 id column")
    num_rows = len(sample_ids_N)
    if sparse.num_rows != num_rows:
        raise TeacherOutputError(
            f"{where}: {num_rows} sample_ids but {sparse.num_rows} rows of sparse targets"
        )
    ids_NS = sparse.ids_BS.numpy()
    valid = ids_NS != PAD_ID
    if bool(((ids_NS[valid] < 0) | (ids_NS[valid] >= vocab)).any()):
        bad = int(ids_NS[valid][(ids_NS[valid] < 0) | (ids_NS[valid] >= vocab)][0])
        raise TeacherOutputError(f"{where}: id {bad} is outside [0, V={vocab})")
    lengths = valid.sum(axis=1)
    offsets = np.zeros(num_rows + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    values = sparse.values_BS.float().numpy()[valid]
    entries = {
        schema.COL_IDS: ids_NS[valid].astype(np.int32),
        schema.COL_VALUES: to_storage_dtype(values, spec.storage_dtype, where),
    }
    if sparse.counts_BS is not None:
        entries[schema.COL_COUNTS] = sparse.counts_BS.numpy()[valid].astype(np.int32)
    log_z = sparse.log_partition_B.float().numpy()
    if not bool(np.isfinite(log_z).all()):
        raise TeacherOutputError(f"{where}: a log-partition is NaN or infinite")
    rows = {schema.COL_LOG_PARTITION: np.ascontiguousarray(log_z, dtype=np.float32)}
    if sparse.tail_log_mass_B is not None:
        tail = sparse.tail_log_mass_B.float().numpy()
        if bool(np.isnan(tail).any() or (tail > 1e-6).any()):
            raise TeacherOutputError(f"{where}: a tail log-mass is NaN or above 0")
        rows[schema.COL_TAIL_LOG_MASS] = np.ascontiguousarray(tail, dtype=np.float32)
    if sparse.log_partition_grid_BG is not None:
        g = sparse.log_partition_grid_BG.float().numpy()
        if not bool(np.isfinite(g).all()):
            raise TeacherOutputError(f"{where}: a grid log-partition is NaN or infinite")
        rows[schema.COL_LOG_PARTITION_GRID] = np.ascontiguousarray(g, dtype=np.float32)
    meta = {
        "kind": spec.kind,
        "storage_dtype": spec.storage_dtype,
        "vocab_size": vocab,
        "num_slots": sparse.num_slots,
        "grid_temperatures": list(sparse.grid_temperatures),
    }
    cols = ShardColumns(sample_ids_N, rows=rows, entries=entries, offsets_N1=offsets, meta=meta)
    extra = {"vocab_size": vocab, "num_entries": int(offsets[-1]), "num_slots": sparse.num_slots}
    return cols, extra


def columns_to_sparse(cols: ShardColumns, where: str) -> Any:
    """Rebuild :class:`kdcache.targets.SparseTargets` from ragged columns (re-padding).

    Returns:
        SparseTargets with S = ``meta["num_slots"]``: row n's entries in slots
        ``0 .. len_n - 1``, then pads (id -1, value -inf, count 0). Values keep the
        storage dtype (bfloat16 as a torch bfloat16 tensor).

    Raises:
        CacheCorruptError: a row holds more entries than S, or a column is missing.
    """
    from kdcache.targets import PAD_ID, SparseTargets

    meta = cols.meta
    num_rows = cols.num_rows
    try:
        num_slots = int(meta["num_slots"])
        offsets = cols.offsets_N1 if cols.offsets_N1 is not None else np.zeros(1, np.int64)
        flat_ids = cols.entries[schema.COL_IDS]
        flat_values = cols.entries[schema.COL_VALUES]
        log_z = cols.rows[schema.COL_LOG_PARTITION]
    except KeyError as exc:
        raise CacheCorruptError(f"{where}: sparse shard lacks {exc}") from None
    lengths = np.diff(offsets) if num_rows else np.zeros(0, np.int64)
    if len(lengths) and int(lengths.max()) > num_slots:
        raise CacheCorruptError(f"{where}: a row holds {int(lengths.max())} > S={num_slots}")

    def pad(flat: np.ndarray, fill: int, dtype: Any) -> np.ndarray:
        if len(lengths) and bool((lengths == num_slots).all()):
            return np.array(flat, dtype=dtype).reshape(num_rows, num_slots)
        out = np.full((num_rows, num_slots), fill, dtype=dtype)
        out[np.arange(num_slots)[None, :] < lengths[:, None]] = flat
        return out

    columns = {
        "ids": pad(flat_ids, PAD_ID, np.int64),
        "values": pad(flat_values, 0, flat_values.dtype),
        "log_partition": np.array(log_z, dtype=np.float32),
    }
    if schema.COL_COUNTS in cols.entries:
        columns["counts"] = pad(cols.entries[schema.COL_COUNTS], 0, np.int64)
    for src, dst in (
        (schema.COL_TAIL_LOG_MASS, "tail_log_mass"),
        (schema.COL_LOG_PARTITION_GRID, "log_partition_grid"),
    ):
        if src in cols.rows:
            columns[dst] = np.array(cols.rows[src], dtype=np.float32)
    return SparseTargets.from_columns(
        columns,
        kind=str(meta["kind"]),
        grid_temperatures=tuple(meta.get("grid_temperatures", ())),
        bfloat16_values=meta.get("storage_dtype") == "bfloat16",
    )


def _check_token_rows(ids_N: np.ndarray, positions_N: Any, where: str) -> np.ndarray:
    """Check token-level rows: each sample one contiguous run, positions increasing in it.

    Returns:
        The positions as int32 [N].

    Raises:
        SampleIdMismatchError: a sample's rows are split, or positions do not increase.
        TeacherOutputError: positions of the wrong shape or negative.
    """
    pos = np.asarray(positions_N)
    if pos.shape != ids_N.shape or pos.dtype.kind not in "iu" or bool((pos < 0).any()):
        raise TeacherOutputError(
            f"{where}: positions must be non-negative ints of shape {ids_N.shape}, got "
            f"{pos.dtype} {pos.shape}"
        )
    if len(ids_N) > 1:
        new_run = ids_N[1:] != ids_N[:-1]
        starts = ids_N[np.concatenate([[True], new_run])]
        if len(np.unique(starts)) != len(starts):
            raise SampleIdMismatchError(
                f"{where}: a sample's token rows are not contiguous (sample_id "
                f"{int(starts[np.unique(starts, return_counts=True)[1].argmax()])} "
                "appears in two runs); write each sample's tokens together"
            )
        if bool(((np.diff(pos) <= 0) & ~new_run).any()):
            raise SampleIdMismatchError(
                f"{where}: token positions must increase within each sample's rows"
            )
    return np.ascontiguousarray(pos, dtype=np.int32)


class CacheEntry:
    """One teacher's outputs over one dataset at one target spec, at ``<root>/entries/<key>``.

    Picklable (holds only URIs), so it travels to Ray actors that write its shards.

    Args:
        root: The cache root (local path or URI).
        key: The entry's content-addressed key.
    """

    def __init__(self, root: str | Location, key: str) -> None:
        self.root = root if isinstance(root, Location) else Location(root)
        self.key = key
        self.location = self.root.child(schema.ENTRIES_DIR, key)
        self.shards_location = self.location.child(schema.SHARDS_DIR)

    def __repr__(self) -> str:
        return f"CacheEntry({self.location.uri!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"root": self.root, "key": self.key}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["root"], state["key"])  # type: ignore[misc]

    # -- spec and manifest -----------------------------------------------------------
    @cached_property
    def spec(self) -> dict[str, Any]:
        """The key material (``spec.json``)."""
        try:
            spec = json.loads(self.location.read_bytes(schema.SPEC_FILE))
        except FileNotFoundError:
            raise CacheNotFoundError(f"no cache entry at {self.location.uri}") from None
        schema.check_format_version(
            spec.get("format_version"), self.location.display(schema.SPEC_FILE)
        )
        return spec

    @property
    def is_complete(self) -> bool:
        return self.location.exists(schema.MANIFEST_FILE)

    @cached_property
    def manifest(self) -> dict[str, Any]:
        """The manifest; raises when the entry is missing or unfinished.

        Raises:
            CacheNotFoundError: nothing exists at this key.
            CacheIncompleteError: the entry has no manifest (being built or interrupted).
            FormatVersionError: written by a newer kdcache.
        """
        try:
            manifest = json.loads(self.location.read_bytes(schema.MANIFEST_FILE))
        except FileNotFoundError:
            if not self.location.exists(schema.SPEC_FILE):
                raise CacheNotFoundError(f"no cache entry at {self.location.uri}") from None
            raise CacheIncompleteError(
                f"cache entry {self.location.uri} has no manifest: its build was interrupted "
                "or is still running. Rerun the same build (kdcache build, or the pipeline "
                "that made it) to compute only the missing shards."
            ) from None
        where = self.location.display(schema.MANIFEST_FILE)
        schema.check_format_version(manifest.get("format_version"), where)
        if manifest.get("key") != self.key:
            raise CacheCorruptError(
                f"{where} names key {manifest.get('key')!r}, expected {self.key!r}"
            )
        return manifest

    @property
    def shards(self) -> list[ShardRecord]:
        return [ShardRecord.from_json(s) for s in self.manifest["shards"]]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    @property
    def temperature(self) -> float:
        return float(self.spec["targets"]["temperature"])

    @property
    def teacher_name(self) -> str:
        return str(self.manifest.get("teacher_name", self.key))

    @property
    def vocab_size(self) -> int:
        return int(self.manifest["vocab_size"])

    @property
    def num_rows(self) -> int:
        return int(self.manifest["num_rows"])

    @property
    def num_bytes(self) -> int:
        return int(self.manifest["num_bytes"])

    @property
    def dataset_fingerprint(self) -> dict[str, Any]:
        return dict(self.spec["dataset"])

    @cached_property
    def target_spec(self) -> schema.TargetSpec:
        """The entry's :class:`kdcache.schema.TargetSpec` (kind, dtype, backend, params)."""
        return schema.TargetSpec.from_json(self.spec["targets"])

    @property
    def is_sparse(self) -> bool:
        return self.target_spec.is_sparse

    # -- reading -------------------------------------------------------------------------
    def read_columns(self, index: int, *, verify: bool = True) -> ShardColumns:
        """Read committed shard ``index`` as the backend's :class:`ShardColumns`.

        Opens only the file the manifest lists for the shard, checks its size and SHA-256
        (with ``verify``), decodes it, and checks its row count against the manifest.

        Raises:
            CacheIncompleteError / CacheNotFoundError: see :attr:`manifest`.
            CacheCorruptError: the file is missing, its size or SHA-256 differs from the
                manifest, or it does not decode to the rows the manifest records.
        """
        rec = self.manifest_record(index)
        where = self.shards_location.display(rec.file)
        try:
            data = self.shards_location.read_bytes(rec.file)
        except FileNotFoundError:
            raise CacheCorruptError(
                f"{where} is listed in the manifest but missing; run "
                f"'kdcache verify {self.location.uri} --repair', then rerun the build "
                "(it recomputes only the damaged shards)"
            ) from None
        if verify:
            if len(data) != rec.num_bytes or sha256_hex(data) != rec.sha256:
                raise CacheCorruptError(
                    f"{where} is truncated or altered: {len(data)} bytes with SHA-256 "
                    f"{sha256_hex(data)[:12]}..., manifest says {rec.num_bytes} bytes, "
                    f"{rec.sha256[:12]}...; run 'kdcache verify {self.location.uri} "
                    "--repair', then rerun the build (it recomputes only the damaged shards)"
                )
        cols = get_backend(self.target_spec.backend).decode(data, where)
        if cols.num_rows != rec.num_rows:
            raise CacheCorruptError(
                f"{where} holds {cols.num_rows} rows, manifest says {rec.num_rows}"
            )
        kind = cols.meta.get("kind", "dense")
        if kind != self.target_spec.kind:
            raise CacheCorruptError(
                f"{where} holds {kind!r} targets, the entry's spec says {self.target_spec.kind!r}"
            )
        return cols

    def read_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read committed dense shard ``index``.

        Returns:
            ``(sample_ids [N] int64, scaled_logits [N, V])``: scaled logits ``z / tau`` in
            the storage dtype (float32 or float16; bfloat16 comes back as float32, exactly,
            since numpy has no bfloat16). Arrays may be read-only views of the file.

        Raises:
            ConfigError: the entry holds sparse targets (use :meth:`read_sparse_shard`).
            CacheIncompleteError / CacheNotFoundError: see :attr:`manifest`.
            CacheCorruptError: the file's size or SHA-256 differs from the manifest.
        """
        if self.is_sparse:
            raise ConfigError(
                f"entry {self.key} holds sparse {self.target_spec.kind!r} targets; read them "
                "with read_sparse_shard"
            )
        cols = self.read_columns(index, verify=verify)
        values = cols.rows[schema.COL_SCALED_LOGITS]
        if cols.meta.get("storage_dtype") == "bfloat16":
            values = bfloat16_bits_to_float32(values)
        return cols.sample_ids_N, values

    def read_sparse_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, Any]:
        """Read committed sparse shard ``index``.

        Returns:
            ``(sample_ids [N] int64, targets)``: a :class:`kdcache.targets.SparseTargets`
            with S = the slot count recorded at write time; each row's kept entries come
            first, in the order they were written, then pads (id -1, value -inf).

        Raises:
            ConfigError: the entry holds dense targets (use :meth:`read_shard`).
            CacheCorruptError: see :meth:`read_columns`.
        """
        if not self.is_sparse:
            raise ConfigError(f"entry {self.key} holds dense targets; read them with read_shard")
        cols = self.read_columns(index, verify=verify)
        return cols.sample_ids_N, columns_to_sparse(
            cols, self.shards_location.display(self.manifest_record(index).file)
        )

    def manifest_record(self, index: int) -> ShardRecord:
        shards = self.manifest["shards"]
        if not 0 <= index < len(shards):
            raise IndexError(f"shard {index} out of range: entry has {len(shards)} shards")
        return ShardRecord.from_json(shards[index])

    # -- writing (the commit protocol) -----------------------------------------------------
    def write_spec(self, spec: dict[str, Any]) -> None:
        if schema.content_key(spec) != self.key:
            raise ConfigError("spec does not hash to this entry's key")
        self.location.makedirs()
        if not self.location.exists(schema.SPEC_FILE):
            self.location.write_atomic(schema.SPEC_FILE, _dumps(spec))

    def write_shard(
        self,
        index: int,
        sample_ids_N: np.ndarray,
        scaled_logits_NV: Any,
        *,
        vocab_size: int | None = None,
        positions_N: np.ndarray | None = None,
    ) -> ShardRecord:
        """Write and commit one shard: data file (atomic), then its sidecar (atomic).

        Args:
            index: Input shard index.
            sample_ids_N: int64 ids, shape [N], in input order; must be unique, except in
                a token-level shard (``positions_N`` given), where row n is one token of
                sample ``sample_ids_N[n]`` and each sample's rows are one contiguous run.
            scaled_logits_NV: For a dense entry, float ``logits / tau``, shape [N, V], all
                finite (numpy or torch). For a sparse entry, a
                :class:`kdcache.targets.SparseTargets` of the entry's kind with N rows.
            vocab_size: V; required for sparse targets (ids must lie in [0, V)); for dense
                targets it defaults to (and must equal) the width of the values.
            positions_N: Token-level shards only: int [N], the token position t of each
                row within its sample (the row holds the teacher's distribution of token
                t + 1), strictly increasing within each sample's run. Stored as the row
                column ``position`` (int32) with ``meta["token_level"] = true``; see
                ``docs/format.md``, "Token-level entries".

        Returns:
            The shard's commit record (also written as its sidecar).

        Raises:
            TeacherOutputError: wrong shapes, NaN/inf, ids out of range, or a value that
                does not fit the storage dtype (refused, never stored as inf).
            SampleIdMismatchError: duplicate ``sample_id`` values (token-level: a sample
                whose rows are not contiguous, or positions not increasing within it).
            ConfigError: dense values for a sparse entry or the reverse, a sparse kind or
                grid that differs from the spec, or no ``vocab_size`` for sparse targets.
        """
        spec = self.target_spec
        backend = get_backend(spec.backend)
        stem = schema.shard_stem(index)
        where = f"{self.key}/{stem}"
        ids = np.ascontiguousarray(np.asarray(sample_ids_N), dtype=np.int64)
        if ids.ndim != 1:
            raise TeacherOutputError(f"{where}: sample_ids must have shape [N], got {ids.shape}")
        positions = None
        if positions_N is None:
            if len(np.unique(ids)) != len(ids):
                raise SampleIdMismatchError(f"shard {index}: duplicate sample_id values")
        else:
            positions = _check_token_rows(ids, positions_N, f"shard {index}")
        extra: dict[str, Any]
        if spec.is_sparse:
            cols, extra = sparse_to_columns(ids, scaled_logits_NV, spec, vocab_size, where)
        else:
            cols, extra = dense_to_columns(ids, scaled_logits_NV, spec, vocab_size, where)
        if positions is not None:
            cols.rows[schema.COL_POSITION] = positions
            cols.meta["token_level"] = True
            extra["num_samples"] = int(len(ids) and 1 + (ids[1:] != ids[:-1]).sum())
        data = backend.encode(cols)
        file = stem + backend.suffix
        self.shards_location.write_atomic(file, data)
        rec = ShardRecord(
            index=index,
            file=file,
            num_rows=len(ids),
            min_sample_id=int(ids.min()) if len(ids) else 0,
            max_sample_id=int(ids.max()) if len(ids) else -1,
            sha256=sha256_hex(data),
            num_bytes=len(data),
        )
        record = {**rec.to_json(), **extra}
        self.shards_location.write_atomic(stem + ".json", _dumps(record))
        return rec

    def invalidate_shard(self, index: int) -> None:
        """Uncommit shard ``index``: remove its sidecar, then the entry's manifest, so the
        entry reads as incomplete and a rerun of its build recomputes that shard only."""
        self.location.delete(schema.MANIFEST_FILE)
        self.shards_location.delete(schema.shard_stem(index) + ".json")
        self.__dict__.pop("manifest", None)

    def damaged_shards(self) -> list[int]:
        """Listed shards whose data file is missing or has another size than the
        manifest records: a cheap check (no data read) that a build runs on a hit."""
        present = {}
        for info in self.shards_location.fs.get_file_info(_selector(self.shards_location.path)):
            present[info.base_name] = info.size
        return [rec.index for rec in self.shards if present.get(rec.file) != rec.num_bytes]

    def committed_shard(self, index: int) -> tuple[ShardRecord, int] | None:
        """The sidecar of shard ``index`` and its vocabulary size if the shard is committed
        and its data file has the recorded size; else None (to be (re)computed)."""
        stem = schema.shard_stem(index)
        try:
            obj = json.loads(self.shards_location.read_bytes(stem + ".json"))
            rec = ShardRecord.from_json(obj)
            if self.shards_location.size(rec.file) != rec.num_bytes:
                return None
        except (FileNotFoundError, KeyError, ValueError):
            return None
        return rec, int(obj["vocab_size"])

    def commit(self, num_shards: int, info: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest after checking every shard's sidecar; the last step of a build.

        Args:
            num_shards: Number of input shards; each must be committed.
            info: Extra manifest fields (teacher name, versions, build settings).

        Returns:
            The manifest written.

        Raises:
            CacheIncompleteError: a shard has no valid sidecar.
            SampleIdMismatchError: sample_id ranges of two shards overlap.
        """
        records: list[ShardRecord] = []
        vocab_sizes = set()
        for i in range(num_shards):
            found = self.committed_shard(i)
            if found is None:
                raise CacheIncompleteError(f"{self.location.uri}: shard {i} is not committed")
            records.append(found[0])
            vocab_sizes.add(found[1])
        if len(vocab_sizes) > 1:
            raise CacheCorruptError(
                f"{self.location.uri}: shards disagree on V: {sorted(vocab_sizes)}"
            )
        manifest = {
            "format_version": schema.FORMAT_VERSION,
            "key": self.key,
            "spec": self.spec,
            "num_shards": num_shards,
            "num_rows": sum(r.num_rows for r in records),
            "num_bytes": sum(r.num_bytes for r in records),
            "vocab_size": vocab_sizes.pop() if vocab_sizes else 0,
            "shards": [r.to_json() for r in records],
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            **info,
        }
        self.location.write_atomic(schema.MANIFEST_FILE, _dumps(manifest))
        self.__dict__.pop("manifest", None)
        return manifest


def _owner_is_dead(held: dict[str, Any]) -> bool:
    """True when the lease's owner ran on this host and its process no longer exists (a
    crashed job), so the lease can be taken over before it expires."""
    host, _, rest = str(held.get("owner", "")).partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


@dataclass
class Lease:
    """A build lease on an entry: ``lease.json`` with an owner and an expiry.

    Args:
        entry: The entry to build.
        ttl_s: Seconds before an unrenewed lease counts as abandoned.
    """

    entry: CacheEntry
    ttl_s: float = 600.0
    owner: str = ""

    def __post_init__(self) -> None:
        self.owner = self.owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"

    def _body(self) -> bytes:
        return _dumps({"owner": self.owner, "expires_at": time.time() + self.ttl_s})

    def _read(self) -> dict[str, Any] | None:
        try:
            return dict(json.loads(self.entry.location.read_bytes(schema.LEASE_FILE)))
        except (FileNotFoundError, ValueError):
            return None

    def acquire(self, *, wait_s: float = 3600.0, poll_s: float = 2.0) -> bool:
        """Take the lease. Returns False if another job finished the entry meanwhile.

        Raises:
            LeaseHeldError: another live job still holds it after ``wait_s`` seconds.
        """
        self.entry.location.makedirs()
        deadline = time.monotonic() + wait_s
        announced = False
        while True:
            if self.entry.is_complete:
                return False
            if self.entry.location.create_exclusive(schema.LEASE_FILE, self._body()):
                return True
            held = self._read()
            if held is None or held.get("expires_at", 0) < time.time() or _owner_is_dead(held):
                log.warning(
                    "taking over an expired or dead job's lease on %s (held by %s)",
                    self.entry.key,
                    held and held.get("owner"),
                )
                self.entry.location.write_atomic(schema.LEASE_FILE, self._body())
                time.sleep(min(poll_s, 0.2))
                if (self._read() or {}).get("owner") == self.owner:
                    return True
                continue
            if not announced:
                log.warning(
                    "cache entry %s is being built by %s; waiting for it",
                    self.entry.key,
                    held.get("owner"),
                )
                announced = True
            if time.monotonic() > deadline:
                raise LeaseHeldError(
                    f"{self.entry.location.uri} is still being built by {held.get('owner')} "
                    f"after {wait_s:.0f}s; wait longer or stop that job"
                )
            time.sleep(poll_s)

    def renew(self) -> None:
        self.entry.location.write_atomic(schema.LEASE_FILE, self._body())

    def release(self) -> None:
        held = self._read()
        if held is not None and held.get("owner") == self.owner:
            self.entry.location.delete(schema.LEASE_FILE)


class EnsembleView:
    """A read-time view over K entries that share a dataset and a temperature.

    The combination rule is applied by the reader (:class:`kdcache.SoftTargetDataset`) via
    :func:`kdcache.targets.combine_ensemble`; nothing is materialised.

    Args:
        entries: The member entries (complete), in teacher order.
        rule: ``"mean_probs"`` or ``"mean_logprobs"``.
        weights: K non-negative weights, or None for uniform.

    Raises:
        SpecMismatchError: members disagree on dataset, temperature or vocabulary.
    """

    def __init__(
        self,
        entries: Sequence[CacheEntry],
        rule: str = "mean_probs",
        weights: Sequence[float] | None = None,
    ) -> None:
        from kdcache.targets import ENSEMBLE_RULES

        if not entries:
            raise ConfigError("an ensemble view needs at least one entry")
        if rule not in ENSEMBLE_RULES:
            raise ConfigError(f"unknown ensemble rule {rule!r}; expected one of {ENSEMBLE_RULES}")
        if weights is not None and len(weights) != len(entries):
            raise ConfigError(f"{len(weights)} weights for {len(entries)} entries")
        self.entries = list(entries)
        self.rule = rule
        self.weights = None if weights is None else [float(w) for w in weights]
        first = self.entries[0]
        for e in self.entries[1:]:
            if e.dataset_fingerprint != first.dataset_fingerprint:
                raise SpecMismatchError(
                    f"{e.key} and {first.key} were built over different datasets"
                )
            if e.temperature != first.temperature:
                raise SpecMismatchError(
                    f"{e.key} is at temperature {e.temperature}, {first.key} at {first.temperature}"
                )
            if e.vocab_size != first.vocab_size:
                raise SpecMismatchError(
                    f"{e.key} has V={e.vocab_size}, {first.key} V={first.vocab_size}"
                )
            if e.is_sparse != first.is_sparse:
                raise SpecMismatchError(
                    f"{e.key} holds {e.target_spec.kind!r} targets, {first.key} "
                    f"{first.target_spec.kind!r}; an ensemble view is all dense or all sparse"
                )

    @property
    def key(self) -> str:
        return schema.content_key(self.view_json())

    def view_json(self) -> dict[str, Any]:
        return {
            "format_version": schema.FORMAT_VERSION,
            "kind": "ensemble",
            "entries": [e.key for e in self.entries],
            "rule": self.rule,
            "weights": self.weights,
        }

    @property
    def root(self) -> Location:
        return self.entries[0].root

    @property
    def temperature(self) -> float:
        return self.entries[0].temperature

    @property
    def num_shards(self) -> int:
        return self.entries[0].num_shards

    @property
    def vocab_size(self) -> int:
        return self.entries[0].vocab_size

    @property
    def is_sparse(self) -> bool:
        return self.entries[0].is_sparse

    @property
    def num_bytes(self) -> int:
        return sum(e.num_bytes for e in self.entries)

    @property
    def teacher_names(self) -> list[str]:
        return [e.teacher_name for e in self.entries]

    def save(self) -> str:
        """Write ``<root>/ensembles/<key>.json``; returns its URI."""
        loc = self.root.child(schema.ENSEMBLES_DIR)
        name = f"{self.key}.json"
        loc.write_atomic(name, _dumps(self.view_json()))
        return loc.display(name)

    def read_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read shard ``index`` of every member.

        Returns:
            ``(sample_ids [N] int64, scaled_logits [K, N, V] float32)``.

        Raises:
            SampleIdMismatchError: members disagree on the ids of this shard.
        """
        ids0, vals0 = self.entries[0].read_shard(index, verify=verify)
        out = np.empty((len(self.entries), *vals0.shape), dtype=np.float32)
        out[0] = vals0
        for k, e in enumerate(self.entries[1:], start=1):
            ids, vals = e.read_shard(index, verify=verify)
            if not np.array_equal(ids, ids0):
                raise SampleIdMismatchError(
                    f"shard {index}: entries {self.entries[0].key} and {e.key} hold different "
                    "sample_id sequences"
                )
            out[k] = vals
        return ids0, out

    def read_sparse_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, list[Any]]:
        """Read shard ``index`` of every sparse member.

        Returns:
            ``(sample_ids [N] int64, [SparseTargets per teacher])``; combine them with
            :func:`kdcache.targets.combine_sparse_ensemble` or keep them apart for
            :func:`kdcache.losses.multi_teacher_loss`.

        Raises:
            ConfigError: the members are dense.
            SampleIdMismatchError: members disagree on the ids of this shard.
        """
        ids0, first = self.entries[0].read_sparse_shard(index, verify=verify)
        out = [first]
        for e in self.entries[1:]:
            ids, t = e.read_sparse_shard(index, verify=verify)
            if not np.array_equal(ids, ids0):
                raise SampleIdMismatchError(
                    f"shard {index}: entries {self.entries[0].key} and {e.key} hold different "
                    "sample_id sequences"
                )
            out.append(t)
        return ids0, out


def check_reader(
    cache: CacheEntry | EnsembleView,
    *,
    temperature: float | None = None,
    vocab_size: int | None = None,
    teachers: Sequence[str] | None = None,
    retemper: bool = False,
) -> None:
    """Refuse a reader whose expectations disagree with what the cache holds.

    Args:
        cache: An open entry or ensemble view.
        temperature: The tau the reader will use; None accepts the cache's.
        vocab_size: The student's V; None skips the check.
        teachers: The teachers the reader expects, as teacher names or entry keys, in any
            order; None skips the check.
        retemper: Allow another temperature: dense targets re-temper exactly; sparse
            top-k / top-p targets only to a temperature in their log-partition grid;
            sampled and mixture targets never.

    Raises:
        SpecMismatchError: the temperature differs (without ``retemper``, or beyond what
            the targets can re-temper to), V differs, or the teacher set differs; the
            message says what the cache holds and what to do.
    """
    view = as_view(cache)
    if temperature is not None and float(temperature) != view.temperature:
        if not retemper:
            raise SpecMismatchError(
                f"cache holds soft targets at temperature {view.temperature}, {temperature} "
                "was asked; pass retemper=True to re-temper, or build at that temperature"
            )
        for e in view.entries:
            spec = e.target_spec
            if not spec.is_sparse:
                continue
            grid = spec.grid_temperatures
            ok = spec.kind in ("topk", "topp") and any(
                abs(g - float(temperature)) <= 1e-6 * g for g in grid
            )
            if not ok:
                raise SpecMismatchError(
                    f"entry {e.key} holds {spec.kind!r} targets at temperature "
                    f"{view.temperature} with log-partition grid {list(grid)}; they cannot "
                    f"be re-tempered exactly to {temperature}. Rebuild with "
                    "grid_temperatures including it"
                )
    if vocab_size is not None and int(vocab_size) != view.vocab_size:
        raise SpecMismatchError(
            f"cache holds V={view.vocab_size} classes, the reader expects V={vocab_size}; "
            "student and teachers must share one vocabulary"
        )
    if teachers is not None:
        have = {e.teacher_name for e in view.entries} | {e.key for e in view.entries}
        names = [e.teacher_name for e in view.entries]
        want = set(teachers)
        matched = {e.key for e in view.entries if e.teacher_name in want or e.key in want}
        if not want <= have or len(matched) != len(view.entries):
            raise SpecMismatchError(
                f"cache holds teachers {names}, the reader expects {sorted(want)}; open the "
                "ensemble view of those teachers (kdcache ls ROOT) or build the missing ones"
            )


def as_view(cache: CacheEntry | EnsembleView) -> EnsembleView:
    """Treat a single entry as an ensemble of one."""
    return cache if isinstance(cache, EnsembleView) else EnsembleView([cache])


_ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_KEY_LIKE = re.compile(f"[0-9a-f]{{{schema.KEY_HEX_CHARS}}}")


def write_alias(root: str | Location, name: str, key: str, kind: str) -> None:
    """Point the human-readable ``name`` at an entry or ensemble ``key`` (re-pointing an
    existing alias is allowed and logged).

    Raises:
        ConfigError: ``name`` is not a plain name (letters, digits, ``.``, ``_``, ``-``;
            no path separators), or looks like a key (keys always win over aliases).
    """
    if not _ALIAS_NAME.fullmatch(name) or _KEY_LIKE.fullmatch(name):
        raise ConfigError(
            f"alias {name!r} must be a plain name (letters, digits, '.', '_', '-'; at most "
            f"128 characters) that does not look like a {schema.KEY_HEX_CHARS}-hex-digit key"
        )
    loc = (root if isinstance(root, Location) else Location(root)).child(schema.ALIASES_DIR)
    if loc.exists(f"{name}.json"):
        old = json.loads(loc.read_bytes(f"{name}.json")).get("key")
        if old != key:
            log.warning("alias %s now points to %s (was %s)", name, key, old)
    loc.write_atomic(f"{name}.json", _dumps({"key": key, "kind": kind}))


def open_cache(
    uri: str,
    *,
    root: str | None = None,
    temperature: float | None = None,
    vocab_size: int | None = None,
    teachers: Sequence[str] | None = None,
    retemper: bool = False,
) -> CacheEntry | EnsembleView:
    """Open a complete cache entry or ensemble view for reading.

    Args:
        uri: An entry directory (``<root>/entries/<key>``), an ensemble view file
            (``<root>/ensembles/<key>.json``), or, with ``root``, a key or an alias name.
            Remote URIs keep their pyarrow query options
            (``s3://b/p/entries/<key>?endpoint_override=...``).
        root: The cache root, needed only to resolve a bare key or alias.
        temperature, vocab_size, teachers, retemper: What the reader expects; checked by
            :func:`check_reader` when given.

    Returns:
        A :class:`CacheEntry` or an :class:`EnsembleView` whose manifests were checked.

    Raises:
        CacheNotFoundError: nothing at ``uri`` (or no such key or alias under ``root``).
        CacheIncompleteError: the entry exists but was never committed.
        FormatVersionError: written by a newer format version.
        SpecMismatchError: see :func:`check_reader`.
    """
    cache = _open(uri, root)
    check_reader(
        cache,
        temperature=temperature,
        vocab_size=vocab_size,
        teachers=teachers,
        retemper=retemper,
    )
    return cache


def _open(uri: str, root: str | None) -> CacheEntry | EnsembleView:
    if root is not None:
        r = Location(root)
        alias = r.child(schema.ALIASES_DIR)
        # A key is never shadowed by an alias; names with path separators are not aliases.
        if (
            _ALIAS_NAME.fullmatch(uri)
            and not _KEY_LIKE.fullmatch(uri)
            and alias.exists(f"{uri}.json")
        ):
            target = json.loads(alias.read_bytes(f"{uri}.json"))
            uri, kind = target["key"], target["kind"]
        else:
            kind = "ensemble" if r.child(schema.ENSEMBLES_DIR).exists(f"{uri}.json") else "entry"
        if kind == "ensemble":
            return _open_view(r.child(schema.ENSEMBLES_DIR), f"{uri}.json")
        entry = CacheEntry(r, uri)
        if not entry.location.exists(schema.SPEC_FILE):
            raise CacheNotFoundError(
                f"no entry, ensemble view or alias named {uri!r} under {r.display()}; "
                f"list what is there with: kdcache ls {r.display()}"
            )
        _ = entry.manifest
        return entry
    loc = Location(uri)
    base, query = split_query(loc.uri) if not loc.is_local else (loc.uri, "")
    if base.endswith(".json"):
        parent, _, name = base.rpartition("/")
        return _open_view(Location(parent + query), name)
    parent, _, key = base.rstrip("/").rpartition("/")
    if not parent.endswith(schema.ENTRIES_DIR):
        raise CacheNotFoundError(
            f"{loc.display()} is not a cache entry (<root>/{schema.ENTRIES_DIR}/<key>) or an "
            "ensemble view (<root>/ensembles/<key>.json); for a key or alias give the root "
            "(root=... in Python, --root ROOT on the command line)"
        )
    entry = CacheEntry(parent.rsplit("/", 1)[0] + query, key)
    _ = entry.manifest
    return entry


def _open_view(ensembles: Location, name: str) -> EnsembleView:
    try:
        view = json.loads(ensembles.read_bytes(name))
    except FileNotFoundError:
        raise CacheNotFoundError(f"no ensemble view at {ensembles.display(name)}") from None
    schema.check_format_version(view.get("format_version"), ensembles.display(name))
    base, query = split_query(ensembles.uri) if not ensembles.is_local else (ensembles.uri, "")
    cache_root = base.rsplit("/", 1)[0] + query
    entries = [CacheEntry(cache_root, k) for k in view["entries"]]
    return EnsembleView(entries, view["rule"], view["weights"])
