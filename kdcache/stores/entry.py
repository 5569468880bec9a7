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
import time
from functools import cached_property
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.errors import (
    CacheCorruptError,
    CacheIncompleteError,
    CacheNotFoundError,
    ConfigError,
    SampleIdMismatchError,
    TeacherOutputError,
)
from kdcache.schema import ShardRecord
from kdcache.stores.backends import ShardColumns, get_backend
from kdcache.stores.codec import (
    _check_token_rows,
    columns_to_dense,
    columns_to_sparse,
    dense_to_columns,
    sparse_to_columns,
)
from kdcache.stores.fs import Location, sha256_hex
from kdcache.stores.sequence import compact_token_columns, expand_token_columns, is_sequence_layout

log = logging.getLogger(__name__)

#: Shard files whose bytes matched their record's SHA-256 in this process, by (location,
#: file, sha256, size, mtime_ns) as seen before and after the read that checked them.
_VERIFIED: set[tuple[Any, ...]] = set()


def _selector(path: str) -> Any:
    import pyarrow.fs as pafs

    return pafs.FileSelector(path, allow_not_found=True, recursive=False)


def _dumps(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()


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
        """The key material (``spec.json``), checked: it must hash to the entry's key.

        Raises:
            CacheNotFoundError: no entry at this key.
            CacheCorruptError: the file is torn, or does not hash to the key (it was edited
                after the build: its values, say the temperature, are not what the shards
                hold).
            FormatVersionError: written by a newer kdcache.
        """
        where = self.location.display(schema.SPEC_FILE)
        try:
            data = self.location.read_bytes(schema.SPEC_FILE)
        except FileNotFoundError:
            raise CacheNotFoundError(f"no cache entry at {self.location.uri}") from None
        spec = schema.read_json(data, where, "entry spec")
        schema.check_format_version(spec.get("format_version"), where)
        found = schema.content_key(spec)
        if found != self.key:
            raise CacheCorruptError(
                f"{where} does not hash to its key {self.key} (it hashes to {found}): it was "
                "edited after the build, so it no longer describes the shards. Restore it, or "
                "delete the entry and rebuild"
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
        where = self.location.display(schema.MANIFEST_FILE)
        try:
            data = self.location.read_bytes(schema.MANIFEST_FILE)
        except FileNotFoundError:
            if not self.location.exists(schema.SPEC_FILE):
                raise CacheNotFoundError(f"no cache entry at {self.location.uri}") from None
            raise CacheIncompleteError(
                f"cache entry {self.location.uri} has no manifest: its build was interrupted "
                "or is still running. Rerun the same build (kdcache build, or the pipeline "
                "that made it) to compute only the missing shards."
            ) from None
        manifest = schema.read_json(data, where, "manifest")
        schema.check_format_version(manifest.get("format_version"), where)
        if manifest.get("key") != self.key:
            raise CacheCorruptError(
                f"{where} names key {manifest.get('key')!r}, expected {self.key!r}"
            )
        if manifest.get("spec") != self.spec:
            raise CacheCorruptError(
                f"{where} records another spec than the entry's spec.json; the manifest was "
                f"edited: run 'kdcache verify {self.location.uri} --repair' and rebuild"
            )
        shards = manifest.get("shards")
        if not isinstance(shards, list) or manifest.get("num_shards") != len(shards):
            raise CacheCorruptError(f"{where}: the shard list is missing or miscounted")
        for i, s in enumerate(shards):
            rec = ShardRecord.from_json(s, f"{where} (shard {i})")
            if rec.index != i:
                raise CacheCorruptError(f"{where}: shard {i} is recorded as shard {rec.index}")
        return manifest

    @property
    def shards(self) -> list[ShardRecord]:
        return list(self._records())

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

    def shard_samples(self, index: int) -> int:
        """Samples (input records) of committed shard ``index``: its rows, or for a
        token-level shard its sequences (``num_samples`` of its commit record).

        Raises:
            CacheCorruptError: the commit record lacks the count or disagrees with the
                manifest.
        """
        rec = self.manifest_record(index)
        if not self.spec.get("dataset", {}).get("preprocessing", {}).get("token_level"):
            return rec.num_rows
        where, side = self._commit_record(index)
        n = side.get("num_samples")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= rec.num_rows:
            raise CacheCorruptError(
                f"{where}: its commit record holds no valid num_samples; run "
                "'kdcache verify --repair' and rebuild"
            )
        return n

    def _commit_record(self, index: int) -> tuple[str, dict[str, Any]]:
        """``(where, sidecar JSON)`` of committed shard ``index``, checked to be the record
        of the file the manifest lists (its SHA-256).

        Raises:
            CacheCorruptError: the sidecar is missing, torn or of another file.
        """
        rec = self.manifest_record(index)
        stem = schema.shard_stem(index)
        where = self.shards_location.display(stem + ".json")
        try:
            side = schema.read_json(self.shards_location.read_bytes(stem + ".json"), where)
        except FileNotFoundError:
            raise CacheCorruptError(f"{where} is missing; run 'kdcache verify --repair'") from None
        if side.get("sha256") != rec.sha256:
            raise CacheCorruptError(
                f"{where} is not the commit record of the manifest's {rec.file}; run "
                "'kdcache verify --repair' and rebuild"
            )
        return where, side

    def quantization_error(self) -> dict[str, float]:
        """The error of quantised values (``params.value_bits``), over every row.

        Each shard's commit record holds, measured when it was written, the per-row
        ``KL(p || p')`` in nats between the teacher's distribution over the kept ids from
        the float32 values (p) and from the stored codes (p'), both renormalised over the
        kept ids (an upper bound on the KL of the full distributions, whose exact tails
        agree); see :func:`kdcache.stores.codec.quantize_values`.

        Returns:
            ``{"kl_nats_mean": mean over rows, "kl_nats_max": largest row, "num_rows": N}``.

        Raises:
            ConfigError: the entry's values are not quantised.
            CacheCorruptError: a commit record lacks the figures.
        """
        if self.target_spec.param("value_bits") is None:
            raise ConfigError(f"entry {self.key} stores unquantised values (no value_bits)")
        total = worst = 0.0
        rows = 0
        for rec in self.shards:
            where, side = self._commit_record(rec.index)
            q: Any = side.get("quantization")
            try:
                n = int(q["num_rows"])
                total += float(q["kl_nats_mean"]) * n
                worst = max(worst, float(q["kl_nats_max"]))
                rows += n
            except (TypeError, KeyError, ValueError):
                raise CacheCorruptError(
                    f"{where}: its commit record has no quantisation error"
                ) from None
        return {"kl_nats_mean": total / max(rows, 1), "kl_nats_max": worst, "num_rows": float(rows)}

    @cached_property
    def target_spec(self) -> schema.TargetSpec:
        """The entry's :class:`kdcache.schema.TargetSpec` (kind, dtype, backend, params)."""
        return schema.TargetSpec.from_json(self.spec["targets"])

    @property
    def is_sparse(self) -> bool:
        return self.target_spec.is_sparse

    @property
    def is_combined(self) -> bool:
        """Whether the entry holds an ensemble view's combined log-probabilities
        (:mod:`kdcache.stores.combined`) rather than one teacher's scaled logits."""
        teacher = self.spec.get("teacher")
        return isinstance(teacher, dict) and teacher.get("kind") == schema.COMBINED_TEACHER_KIND

    def _rerun(self) -> str:
        """What recomputes this entry's uncommitted shards, for error messages."""
        if self.is_combined:
            return (
                "rerun 'kdcache combine' on its view, or EnsembleView.materialize (it "
                "recomputes only the damaged shards)"
            )
        return "rerun the build (it recomputes only the damaged shards)"

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
        before = self.shards_location.stat(rec.file) if verify else None
        try:
            data = self.shards_location.read_buffer(rec.file)
        except FileNotFoundError:
            raise CacheCorruptError(
                f"{where} is listed in the manifest but missing; run "
                f"'kdcache verify {self.location.uri} --repair', then {self._rerun()}"
            ) from None
        if verify:
            # Checked once per file version per process: a file whose size and
            # modification time are those it had when its bytes last matched the record
            # (seen before and after the read that checked them) is not hashed again.
            memo = None
            if before is not None and before[1] is not None and before[0] == len(data):
                memo = (self.shards_location.uri, rec.file, rec.sha256, *before)
            checked = memo in _VERIFIED and self.shards_location.stat(rec.file) == before
            if not checked:
                if len(data) != rec.num_bytes or sha256_hex(data) != rec.sha256:
                    raise CacheCorruptError(
                        f"{where} is truncated or altered: {len(data)} bytes with SHA-256 "
                        f"{sha256_hex(data)[:12]}..., manifest says {rec.num_bytes} bytes, "
                        f"{rec.sha256[:12]}...; run 'kdcache verify {self.location.uri} "
                        f"--repair', then {self._rerun()}"
                    )
                if memo is not None and self.shards_location.stat(rec.file) == before:
                    _VERIFIED.add(memo)
        cols = get_backend(self.target_spec.backend).decode(data, where)
        if is_sequence_layout(cols):
            cols = expand_token_columns(cols, where)
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
        return cols.sample_ids_N, columns_to_dense(cols)

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
        """The manifest's commit record of shard ``index`` (only that one is parsed).

        Raises:
            IndexError: no such shard.
            CacheCorruptError: the record is malformed (names the entry and shard).
        """
        records = self._records()
        if not 0 <= index < len(records):
            raise IndexError(f"shard {index} out of range: entry has {len(records)} shards")
        return records[index]

    def _records(self) -> list[ShardRecord]:
        """The manifest's commit records, parsed once per manifest read (a shard read
        asks for its record on every epoch)."""
        manifest = self.manifest
        cached = self.__dict__.get("_parsed_records")
        if cached is None or cached[0] is not manifest:
            records = [
                ShardRecord.from_json(s, f"{self.key} manifest, shard {i}")
                for i, s in enumerate(manifest["shards"])
            ]
            cached = (manifest, records)
            self.__dict__["_parsed_records"] = cached
        return cached[1]

    # -- writing (the commit protocol) -----------------------------------------------------
    def write_spec(self, spec: dict[str, Any]) -> None:
        """Write ``spec.json`` unless it exists (nothing is written then: a cache hit
        works on a read-only root).

        Raises:
            ConfigError: ``spec`` does not hash to this entry's key.
        """
        if schema.content_key(spec) != self.key:
            raise ConfigError("spec does not hash to this entry's key")
        if self.location.exists(schema.SPEC_FILE):
            return
        self.location.makedirs()
        self.location.write_atomic(schema.SPEC_FILE, _dumps(spec))

    def write_shard(
        self,
        index: int,
        sample_ids_N: np.ndarray,
        scaled_logits_NV: Any,
        *,
        vocab_size: int | None = None,
        positions_N: np.ndarray | None = None,
        input_digest: str | None = None,
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
                column ``position`` (int32) with ``meta["token_level"] = true`` and, in an
                entry of format 2, written in the sequence-major layout
                (:mod:`kdcache.stores.sequence`); see ``docs/format.md``, "Token-level
                entries".
            input_digest: The digest of the input shard the values were computed from
                (:class:`kdcache.data.ShardBatches`), recorded in the sidecar as
                ``input_digest`` so that a reader can check that the inputs it joins are
                the ones the teacher saw. None: not recorded.

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
        if input_digest is not None and not schema.is_input_digest(input_digest):
            raise ConfigError(
                f"{where}: input_digest must be '<algorithm>:<hex digits>' (e.g. "
                f"'xxh3_128:' and 32 hex digits), got {input_digest!r}"
            )
        ids = np.ascontiguousarray(np.asarray(sample_ids_N), dtype=np.int64)
        if ids.ndim != 1:
            raise TeacherOutputError(f"{where}: sample_ids must have shape [N], got {ids.shape}")
        positions = None
        if positions_N is None:
            # strictly increasing ids (the common case) are unique without a sort
            if not bool(np.all(ids[1:] > ids[:-1])) and len(np.unique(ids)) != len(ids):
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
            if int(self.spec.get("format_version", 1)) >= schema.TOKEN_FORMAT_VERSION:
                cols = compact_token_columns(cols, where)
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
            input_digest=input_digest,
        )
        record = {**rec.to_json(), **extra}
        self.shards_location.write_atomic(stem + ".json", _dumps(record))
        return rec

    def _check_ids_across_shards(self, records: list[ShardRecord]) -> None:
        """Refuse a sample_id held by two shards, before the manifest is written.

        Shards whose id ranges (``min_sample_id``..``max_sample_id``) overlap no other are
        cleared from their records alone (the common case: sequential ids); only shards
        whose ranges overlap are read (their id columns), and checked exactly.

        Raises:
            SampleIdMismatchError: names the id and the two shards.
        """
        spans = sorted((r.min_sample_id, r.max_sample_id, r.index) for r in records if r.num_rows)
        suspects: set[int] = set()
        reach, reach_index = None, -1
        for lo, hi, index in spans:
            if reach is not None and lo <= reach:
                suspects.update((index, reach_index))
            if reach is None or hi > reach:
                reach, reach_index = hi, index
        if not suspects:
            return
        by_index = {r.index: r for r in records}
        backend = get_backend(self.target_spec.backend)
        ids, owner = [], []
        for index in sorted(suspects):
            rec = by_index[index]
            where = self.shards_location.display(rec.file)
            cols = backend.decode(self.shards_location.read_buffer(rec.file), where)
            shard_ids = np.unique(np.asarray(cols.sample_ids_N, dtype=np.int64))
            ids.append(shard_ids)
            owner.append(np.full(len(shard_ids), index, dtype=np.int64))
        all_ids, all_owner = np.concatenate(ids), np.concatenate(owner)
        order = np.argsort(all_ids, kind="stable")
        sorted_ids = all_ids[order]
        dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
        if len(dup):
            d = int(dup[0])
            a, b = sorted(int(all_owner[order[j]]) for j in (d, d + 1))
            raise SampleIdMismatchError(
                f"{self.location.uri}: sample_id {int(sorted_ids[d])} is in shard {a} and in "
                f"shard {b} ({len(dup)} id(s) in more than one shard): the dataset's shards "
                "overlap, so a join by sample_id would be ambiguous. Nothing was committed; "
                "give every record a unique id (see docs/datasets.md) and rebuild"
            )

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

    def uncommit_damaged(self) -> list[int]:
        """Uncommit the shards :meth:`damaged_shards` finds (logged as a warning), so that
        rerunning what made the entry (its build, or for a combined entry its
        combination) recomputes exactly those; returns their indices (empty: sound)."""
        damaged = self.damaged_shards()
        if damaged:
            log.warning(
                "cache entry %s lists %d shard file(s) that are missing or of the wrong "
                "size (%s); recomputing them",
                self.key,
                len(damaged),
                ", ".join(schema.shard_stem(i) for i in damaged),
            )
            for i in damaged:
                self.invalidate_shard(i)
        return damaged

    def committed_shard(
        self, index: int, *, check_bytes: bool = False
    ) -> tuple[ShardRecord, int] | None:
        """The sidecar of shard ``index`` and its vocabulary size if the shard is committed
        and its data file has the recorded size (and, with ``check_bytes``, the recorded
        SHA-256: what a resumed build reuses is checked, not believed); else None, and the
        shard is to be (re)computed."""
        stem = schema.shard_stem(index)
        try:
            where = self.shards_location.display(stem + ".json")
            obj = schema.read_json(self.shards_location.read_bytes(stem + ".json"), where)
            rec = ShardRecord.from_json(obj, where)
            if rec.index != index:
                return None
            if self.shards_location.size(rec.file) != rec.num_bytes:
                return None
            if check_bytes and sha256_hex(self.shards_location.read_buffer(rec.file)) != rec.sha256:
                log.warning(
                    "%s does not match its commit record (altered since it was written); "
                    "recomputing it",
                    self.shards_location.display(rec.file),
                )
                return None
            return rec, int(obj["vocab_size"])
        except (FileNotFoundError, KeyError, TypeError, ValueError, CacheCorruptError):
            return None  # a missing or damaged commit record: the shard is recomputed

    def commit(self, num_shards: int, info: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest after checking every shard's sidecar; the last step of a build.

        Args:
            num_shards: Number of input shards; each must be committed.
            info: Extra manifest fields (teacher name, versions, build settings).

        Returns:
            The manifest written.

        Raises:
            CacheIncompleteError: a shard has no valid sidecar.
            SampleIdMismatchError: a sample_id is in two shards (the dataset's shards
                overlap); nothing is committed, and the message names both shards.
            CacheCorruptError: the shards disagree on V.
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
        self._check_ids_across_shards(records)
        manifest = {
            "format_version": self.spec["format_version"],
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
