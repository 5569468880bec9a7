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
)
from kdcache.schema import ShardRecord
from kdcache.storage import Location, sha256_hex
from kdcache.stores import get_backend, to_storage_dtype

log = logging.getLogger(__name__)


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

    # -- reading -------------------------------------------------------------------------
    def read_shard(self, index: int, *, verify: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Read committed shard ``index``.

        Returns:
            ``(sample_ids [N] int64, scaled_logits [N, V] in the storage dtype)``.

        Raises:
            CacheIncompleteError / CacheNotFoundError: see :attr:`manifest`.
            CacheCorruptError: the file's size or SHA-256 differs from the manifest.
        """
        rec = self.manifest_record(index)
        where = self.shards_location.display(rec.file)
        try:
            data = self.shards_location.read_bytes(rec.file)
        except FileNotFoundError:
            raise CacheCorruptError(f"{where} is listed in the manifest but missing") from None
        if verify:
            if len(data) != rec.num_bytes or sha256_hex(data) != rec.sha256:
                raise CacheCorruptError(
                    f"{where} is truncated or altered: {len(data)} bytes with SHA-256 "
                    f"{sha256_hex(data)[:12]}..., manifest says {rec.num_bytes} bytes, "
                    f"{rec.sha256[:12]}...; rebuild the entry (delete the shard and its "
                    "sidecar, then rerun the build)"
                )
        ids, values = get_backend(self.spec["targets"]["backend"]).decode(data, where)
        if len(ids) != rec.num_rows:
            raise CacheCorruptError(f"{where} holds {len(ids)} rows, manifest says {rec.num_rows}")
        return ids, values

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
        self, index: int, sample_ids_N: np.ndarray, scaled_logits_NV: np.ndarray
    ) -> ShardRecord:
        """Write and commit one shard: data file (atomic), then its sidecar (atomic).

        Args:
            index: Input shard index.
            sample_ids_N: int64 ids, shape [N], in input order; must be unique.
            scaled_logits_NV: float32 ``logits / tau``, shape [N, V], all finite.

        Returns:
            The shard's commit record (also written as its sidecar).

        Raises:
            TeacherOutputError: a value does not fit the storage dtype.
            SampleIdMismatchError: duplicate ``sample_id`` values.
        """
        targets = self.spec["targets"]
        backend = get_backend(targets["backend"])
        stem = schema.shard_stem(index)
        if len(np.unique(sample_ids_N)) != len(sample_ids_N):
            raise SampleIdMismatchError(f"shard {index}: duplicate sample_id values")
        stored = to_storage_dtype(scaled_logits_NV, targets["storage_dtype"], f"{self.key}/{stem}")
        data = backend.encode(sample_ids_N, stored, targets["storage_dtype"])
        file = stem + backend.suffix
        self.shards_location.write_atomic(file, data)
        rec = ShardRecord(
            index=index,
            file=file,
            num_rows=len(sample_ids_N),
            min_sample_id=int(sample_ids_N.min()) if len(sample_ids_N) else 0,
            max_sample_id=int(sample_ids_N.max()) if len(sample_ids_N) else -1,
            sha256=sha256_hex(data),
            num_bytes=len(data),
        )
        record = {**rec.to_json(), "vocab_size": int(scaled_logits_NV.shape[1])}
        self.shards_location.write_atomic(stem + ".json", _dumps(record))
        return rec

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
            if held is None or held.get("expires_at", 0) < time.time():
                log.warning(
                    "taking over expired lease on %s (held by %s)",
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


def as_view(cache: CacheEntry | EnsembleView) -> EnsembleView:
    """Treat a single entry as an ensemble of one."""
    return cache if isinstance(cache, EnsembleView) else EnsembleView([cache])


def write_alias(root: str | Location, name: str, key: str, kind: str) -> None:
    """Point the human-readable ``name`` at an entry or ensemble ``key``."""
    loc = (root if isinstance(root, Location) else Location(root)).child(schema.ALIASES_DIR)
    loc.write_atomic(f"{name}.json", _dumps({"key": key, "kind": kind}))


def open_cache(uri: str, *, root: str | None = None) -> CacheEntry | EnsembleView:
    """Open a complete cache entry or ensemble view for reading.

    Args:
        uri: An entry directory (``<root>/entries/<key>``), an ensemble view file
            (``<root>/ensembles/<key>.json``), or, with ``root``, a key or an alias name.
        root: The cache root, needed only to resolve a bare key or alias.

    Returns:
        A :class:`CacheEntry` or an :class:`EnsembleView` whose manifests were checked.

    Raises:
        CacheNotFoundError: nothing at ``uri`` (or no such key or alias under ``root``).
        CacheIncompleteError: the entry exists but was never committed.
        FormatVersionError: written by a newer format version.
    """
    if root is not None:
        r = Location(root)
        alias = r.child(schema.ALIASES_DIR)
        if alias.exists(f"{uri}.json"):
            target = json.loads(alias.read_bytes(f"{uri}.json"))
            uri, kind = target["key"], target["kind"]
        else:
            kind = "ensemble" if r.child(schema.ENSEMBLES_DIR).exists(f"{uri}.json") else "entry"
        if kind == "ensemble":
            return open_cache(r.child(schema.ENSEMBLES_DIR).display(f"{uri}.json"))
        entry = CacheEntry(r, uri)
        if not entry.location.exists(schema.SPEC_FILE):
            raise CacheNotFoundError(
                f"no entry, ensemble view or alias named {uri!r} under {r.uri}; "
                f"list what is there with: kdcache ls {r.uri}"
            )
        _ = entry.manifest
        return entry
    loc = Location(uri)
    if loc.uri.endswith(".json"):
        parent, _, name = loc.uri.rpartition("/")
        ploc = Location(parent)
        try:
            view = json.loads(ploc.read_bytes(name))
        except FileNotFoundError:
            raise CacheNotFoundError(f"no ensemble view at {loc.uri}") from None
        schema.check_format_version(view.get("format_version"), loc.uri)
        cache_root = ploc.uri.rsplit("/", 1)[0]
        entries = [CacheEntry(cache_root, k) for k in view["entries"]]
        return EnsembleView(entries, view["rule"], view["weights"])
    parent, _, key = loc.uri.rstrip("/").rpartition("/")
    if not parent.endswith(schema.ENTRIES_DIR):
        raise CacheNotFoundError(
            f"{uri} is not a cache entry (<root>/{schema.ENTRIES_DIR}/<key>) or an ensemble "
            "view (<root>/ensembles/<key>.json); for a key or alias pass root=..."
        )
    entry = CacheEntry(parent.rsplit("/", 1)[0], key)
    _ = entry.manifest
    return entry
