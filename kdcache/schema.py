"""The on-disk contract: format version, spec (key material), sidecars and manifests.

Everything here is plain data; ``docs/format.md`` is the prose version of this module.

Layout of one cache entry (one teacher, one dataset, one target spec) under a root::

    <root>/entries/<key>/spec.json                 the key material, canonical JSON
    <root>/entries/<key>/lease.json                present only while a job builds it
    <root>/entries/<key>/shards/<shard>.arrow      data, one per input shard
    <root>/entries/<key>/shards/<shard>.json       sidecar: the shard's commit record
    <root>/entries/<key>/manifest.json             written last; readers trust only it
    <root>/ensembles/<key>.json                    an ensemble view over entry keys
    <root>/aliases/<name>.json                     a human-readable name for a key
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any

from kdcache.errors import ConfigError, FormatVersionError

FORMAT_VERSION = 1

#: int64, the stable id of an input record; unique within a dataset.
COL_SAMPLE_ID = "sample_id"
#: FixedSizeList<storage dtype>[V]: the teacher's logits divided by the temperature.
COL_SCALED_LOGITS = "scaled_logits"

STORAGE_DTYPES = ("float32", "float16")
TARGET_KINDS = ("dense",)
BACKENDS = ("arrow",)

ENTRIES_DIR = "entries"
ENSEMBLES_DIR = "ensembles"
ALIASES_DIR = "aliases"
SHARDS_DIR = "shards"
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
LEASE_FILE = "lease.json"

#: Length of the hex key (128 bits of SHA-256): short enough to type, far from collisions.
KEY_HEX_CHARS = 32


def canonical_json(obj: Any) -> str:
    """Serialise ``obj`` to the one canonical JSON text that keys are hashed from.

    Sorted keys, no whitespace, ASCII only, no NaN. Floats are written by Python's
    shortest round-trip repr, so 4.0 and 4 differ: callers normalise numbers first.

    Raises:
        ValueError: ``obj`` holds NaN or infinity.
    """
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def content_key(material: dict[str, Any]) -> str:
    """The content-addressed key of a spec: the first 32 hex chars of SHA-256 of its JSON."""
    return hashlib.sha256(canonical_json(material).encode()).hexdigest()[:KEY_HEX_CHARS]


@dataclasses.dataclass(frozen=True)
class TargetSpec:
    """What a cache entry stores for each sample: the part of the key that is not data
    or teacher.

    Attributes:
        temperature: tau > 0; stored values are ``logits / tau``.
        kind: ``"dense"`` (all V scaled logits per row).
        storage_dtype: ``"float32"`` or ``"float16"``; math is always float32.
        backend: Storage backend (``"arrow"``: Arrow IPC files).
    """

    temperature: float
    kind: str = "dense"
    storage_dtype: str = "float32"
    backend: str = "arrow"

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise ConfigError(f"temperature must be a finite number > 0, got {t!r}")
        object.__setattr__(self, "temperature", float(t))
        if self.kind not in TARGET_KINDS:
            raise ConfigError(f"target kind must be one of {TARGET_KINDS}, got {self.kind!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(
                f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype!r}"
            )
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def entry_spec(
    dataset_fingerprint: dict[str, Any],
    teacher_fingerprint: dict[str, Any],
    targets: TargetSpec,
) -> dict[str, Any]:
    """The key material of one cache entry: everything that changes its bytes.

    Nothing run-specific (cluster size, batch size, paths) belongs here.
    """
    return {
        "format_version": FORMAT_VERSION,
        "dataset": dataset_fingerprint,
        "teacher": teacher_fingerprint,
        "targets": targets.to_json(),
    }


@dataclasses.dataclass(frozen=True)
class ShardRecord:
    """The commit record of one data shard, written as its sidecar after the data file.

    Attributes:
        index: Input shard index (0-based); output shard ``index`` covers input shard ``index``.
        file: Data file name relative to the entry's ``shards/`` directory.
        num_rows: Rows in the file.
        min_sample_id: Smallest ``sample_id`` in the file.
        max_sample_id: Largest ``sample_id`` in the file.
        sha256: Hex SHA-256 of the whole data file.
        num_bytes: Size of the data file in bytes.
    """

    index: int
    file: str
    num_rows: int
    min_sample_id: int
    max_sample_id: int
    sha256: str
    num_bytes: int

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ShardRecord:
        return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls)})


def shard_stem(index: int) -> str:
    """Deterministic name of shard ``index`` (no extension): ``shard-00042``."""
    return f"shard-{index:05d}"


def check_format_version(found: Any, where: str) -> None:
    """Refuse a manifest or spec written by a newer (or unknown) format version.

    Raises:
        FormatVersionError: ``found`` is not an int <= FORMAT_VERSION.
    """
    if not isinstance(found, int) or found > FORMAT_VERSION or found < 1:
        raise FormatVersionError(
            f"{where} has format_version {found!r}, but this kdcache reads versions "
            f"1..{FORMAT_VERSION}; upgrade kdcache to read it"
        )
