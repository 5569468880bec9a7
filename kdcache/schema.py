"""The on-disk contract: format version, spec (key material), sidecars and manifests.

Everything here is plain data; ``docs/format.md`` is the prose version of this module.

Layout of one cache entry (one teacher, one dataset, one target spec) under a root::

    <root>/entries/<key>/spec.json                 the key material, canonical JSON
    <root>/entries/<key>/lease.json                present only while a job builds it
    <root>/entries/<key>/shards/<shard><suffix>    data, one per input shard
                                                   (.arrow, .parquet or .zarr.zip)
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

from kdcache.errors import CacheCorruptError, ConfigError, FormatVersionError

#: The newest format this kdcache writes and reads (it reads every older one too).
#: Version 2 added the sequence-major layout of token-level entries (bit-packed ids and
#: counts, one row per sequence) and quantised values; it changed nothing for entries with
#: one row per sample, which keep ``format_version`` 1 in their key material, so their
#: keys and files stay valid (:func:`entry_format_version`).
FORMAT_VERSION = 2
#: The format of entries with one row per sample (classifiers): unchanged since version 1.
SAMPLE_FORMAT_VERSION = 1
#: The format of token-level entries: the sequence-major layout (docs/format.md).
TOKEN_FORMAT_VERSION = 2
#: The format of an ensemble view's JSON: unchanged since version 1.
VIEW_FORMAT_VERSION = 1

#: int64, the stable id of an input record; unique within a dataset.
COL_SAMPLE_ID = "sample_id"
#: Dense: [N, V] of the storage dtype, the teacher's logits divided by the temperature.
COL_SCALED_LOGITS = "scaled_logits"

# Sparse entries (kinds topk, topp, sampled, mixture); see docs/format.md.
#: int64 [N + 1]: row n owns ragged entries offsets[n]:offsets[n + 1] (CSR row pointers).
COL_OFFSETS = "offsets"
#: Ragged int32 [E]: kept token or class ids, in [0, V).
COL_IDS = "ids"
#: Ragged [E] of the storage dtype: scaled logits z / tau at the kept ids.
COL_VALUES = "values"
#: Ragged int32 [E]: draw counts (kinds "sampled" and "sampled_counts").
COL_COUNTS = "counts"
#: Quantised values (``params.value_bits``): ragged uint8 or uint16 [E] codes, the value
#: being ``value_max[n] - code * value_step[n]`` (float32 arithmetic).
COL_VALUE_CODES = "value_codes"
#: float32 [N]: the largest kept value of a quantised row, shifted so that the kept
#: mass of the dequantised values is the exact one.
COL_VALUE_MAX = "value_max"
#: float32 [N]: the step between two codes of a quantised row.
COL_VALUE_STEP = "value_step"

# The sequence-major layout of token-level entries (format version 2): one row per
# sequence; per-token and per-entry columns are ragged, each with its own offsets.
#: int32 [M]: the first target position of the sequence (its rows' positions are
#: ``first_position .. first_position + num_positions - 1``).
COL_FIRST_POSITION = "first_position"
#: int32 [M]: the sequence's target positions (token rows).
COL_NUM_POSITIONS = "num_positions"
#: Bit-packed [per sequence]: kept entries per token row (absent when every row keeps
#: the same number, recorded as ``meta["row_length"]``).
COL_ROW_LENGTH = "row_length"
#: float32 [N]: logsumexp over the full vocabulary of z / tau.
COL_LOG_PARTITION = "log_partition"
#: float32 [N]: log of the mass outside the kept ids at tau (-inf: nothing left out).
COL_TAIL_LOG_MASS = "tail_log_mass"
#: float32 [N, G]: logsumexp of z / tau_g for the grid temperatures tau_g.
COL_LOG_PARTITION_GRID = "log_partition_grid"
#: int32 [N], token-level entries only: row n holds the teacher's distribution of token
#: position[n] + 1 of its sample (rows of one sample are contiguous; see docs/format.md).
COL_POSITION = "position"

#: File-level metadata key (Arrow schema, Parquet key-value, Zarr group attributes).
META_KEY = "kdcache"

STORAGE_DTYPES = ("float32", "float16", "bfloat16")
SPARSE_KINDS = ("topk", "topp", "sampled", "sampled_counts", "mixture")
#: Kinds that store draw counts.
COUNT_KINDS = ("sampled", "sampled_counts")
TARGET_KINDS = ("dense", *SPARSE_KINDS)
#: Names of the storage backends a spec may name. The built-in ones; a user's backend is
#: added by :func:`kdcache.stores.backends.register_backend` (which calls
#: :func:`add_backend_name`), the one registration step.
BACKENDS: tuple[str, ...] = ("arrow", "parquet", "zarr")
#: Sparse kinds whose kept set stays exact under another temperature, so they can be
#: re-tempered from a stored log-partition grid (sampled draws depend on tau).
RETEMPER_KINDS = ("topk", "topp")

#: The sparsification parameters each sparse kind requires, and those it may add.
_REQUIRED_PARAMS = {
    "topk": ("k",),
    "topp": ("top_p", "max_k"),
    "sampled": ("num_samples",),
    "sampled_counts": ("num_samples",),
    "mixture": (),
}
_OPTIONAL_PARAMS = (
    "min_k",
    "seed",
    "labels",
    "grid_temperatures",
    "members",
    "value_bits",
    "compression",
    "sampling",
)
#: How each sampled kind draws its ids by default (``params.sampling``): independent
#: draws for ``sampled`` (as it always has, so its keys stand); systematic sampling for
#: ``sampled_counts``, whose only information is the counts, which systematic sampling
#: estimates with far less variance (``docs/losses.md``).
DEFAULT_SAMPLING = {"sampled": "multinomial", "sampled_counts": "systematic"}
#: Lossless compressions a sparse entry's files may use (``params.compression``).
COMPRESSIONS = ("zstd",)
#: Bits a quantised value may take (``params.value_bits``).
VALUE_BITS = range(2, 17)

ENTRIES_DIR = "entries"
ENSEMBLES_DIR = "ensembles"
ALIASES_DIR = "aliases"
SHARDS_DIR = "shards"
SPEC_FILE = "spec.json"
MANIFEST_FILE = "manifest.json"
LEASE_FILE = "lease.json"

#: ``spec.teacher.kind`` of an entry that holds an ensemble view's combination
#: (:mod:`kdcache.stores.combined`).
COMBINED_TEACHER_KIND = "ensemble_combination"

#: Length of the hex key (128 bits of SHA-256): short enough to type, far from collisions.
KEY_HEX_CHARS = 32
_HEX = frozenset("0123456789abcdef")


def is_sha256(value: Any) -> bool:
    """Whether ``value`` is a hex SHA-256 digest: a str of 64 lowercase hex digits."""
    return isinstance(value, str) and len(value) == 64 and all(c in _HEX for c in value)


#: Algorithms of an input shard's digest (``ShardRecord.input_digest``), by the number of
#: hex digits they give.
INPUT_DIGEST_ALGORITHMS = {"xxh3_128": 32, "sha256": 64}


def is_input_digest(value: Any) -> bool:
    """Whether ``value`` is an input digest, ``"<algorithm>:<hex>"`` with an algorithm of
    :data:`INPUT_DIGEST_ALGORITHMS` and its number of lowercase hex digits."""
    if not isinstance(value, str):
        return False
    algorithm, sep, digits = value.partition(":")
    width = INPUT_DIGEST_ALGORITHMS.get(algorithm)
    return bool(sep) and width == len(digits) and all(c in _HEX for c in digits)


def add_backend_name(name: str) -> None:
    """Accept ``name`` as a backend in target specs (see :data:`BACKENDS`).

    Raises:
        ConfigError: the name is not a plain lowercase identifier.
    """
    global BACKENDS
    if not name.isidentifier() or name != name.lower():
        raise ConfigError(f"a backend name is a lowercase identifier, got {name!r}")
    if name not in BACKENDS:
        BACKENDS = (*BACKENDS, name)


def read_json(data: bytes, where: str, what: str = "record") -> dict[str, Any]:
    """Parse one of kdcache's JSON records (spec, manifest, sidecar, alias, view).

    Nothing read is trusted: a torn or edited file is a clear error, never a raw
    ``JSONDecodeError``.

    Args:
        data: The file's bytes.
        where: The file, for messages.
        what: What the file is, for messages ("manifest", "alias", ...).

    Returns:
        The JSON object.

    Raises:
        CacheCorruptError: the bytes are not a UTF-8 JSON object; the message names the
            file and says how to recover.
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CacheCorruptError(
            f"{where} is not a readable {what} ({type(exc).__name__}: {exc}); it was torn by "
            "a crash or edited. Run 'kdcache verify ... --repair' on its entry, or delete the "
            "file and rerun the build that wrote it"
        ) from None
    if not isinstance(obj, dict):
        raise CacheCorruptError(f"{where} holds a JSON {type(obj).__name__}, expected an object")
    return obj


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
        kind: ``"dense"`` (all V scaled logits per row), or a sparse kind: ``"topk"``,
            ``"topp"``, ``"sampled"``, ``"sampled_counts"`` (draw counts only, no values:
            see :class:`kdcache.targets.SparseTargets`) or ``"mixture"`` (a materialised
            sparse ensemble).
        storage_dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` for the stored scaled
            logits; log-partitions are always float32 and math is always float32.
        backend: ``"arrow"`` (Arrow IPC, default), ``"parquet"`` or ``"zarr"`` (Zarr v3).
        params: Sparsification parameters, part of the key (they change the bytes); must
            be None for ``"dense"``. ``topk``: ``k``; ``topp``: ``top_p`` and ``max_k``
            (optional ``min_k``); ``sampled`` and ``sampled_counts``: ``num_samples``
            (optional ``seed``); any sparse kind with values: optional ``value_bits``
            (values quantised to that many bits per kept id, relative to the row's
            largest; ``docs/format.md``), ``compression`` (``"zstd"``: the files' buffers
            compressed losslessly), ``labels`` (True when each row also keeps its label),
            ``grid_temperatures`` (log-partitions stored at these tau too) and, for a
            mixture, ``members``. Held as a sorted tuple of pairs; :meth:`param` reads one.

    Raises:
        ConfigError: a value is out of range, a parameter is missing or unknown.
    """

    temperature: float
    kind: str = "dense"
    storage_dtype: str = "float32"
    backend: str = "arrow"
    params: Any = None

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
        object.__setattr__(self, "params", _normalise_params(self.kind, self.params))
        if self.kind == "sampled_counts" and self.storage_dtype != "float32":
            raise ConfigError(
                f"sampled_counts targets store no values, so no storage_dtype; leave it at "
                f"'float32' (got {self.storage_dtype!r})"
            )
        if self.param("value_bits") is not None and self.storage_dtype != "float32":
            raise ConfigError(
                f"params.value_bits quantises the stored values itself; leave storage_dtype "
                f"at 'float32' (got {self.storage_dtype!r})"
            )

    def param(self, name: str, default: Any = None) -> Any:
        """One sparsification parameter (lists come back as tuples)."""
        return dict(self.params or ()).get(name, default)

    @property
    def is_sparse(self) -> bool:
        return self.kind != "dense"

    @property
    def grid_temperatures(self) -> tuple[float, ...]:
        return tuple(self.param("grid_temperatures", ()))

    def to_json(self) -> dict[str, Any]:
        """The spec's ``targets`` object. Dense specs have no ``params`` key, so dense keys
        are the same as before sparse kinds existed."""
        out: dict[str, Any] = {
            "temperature": self.temperature,
            "kind": self.kind,
            "storage_dtype": self.storage_dtype,
            "backend": self.backend,
        }
        if self.params is not None:
            out["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params}
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TargetSpec:
        """Inverse of :meth:`to_json` (reads a spec's ``targets`` object)."""
        return cls(
            temperature=obj["temperature"],
            kind=obj.get("kind", "dense"),
            storage_dtype=obj.get("storage_dtype", "float32"),
            backend=obj.get("backend", "arrow"),
            params=obj.get("params"),
        )


def _positive_int(kind: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{kind} parameter {name!r} must be an int >= 1, got {value!r}")
    return value


def _normalise_params(kind: str, params: Any) -> tuple[tuple[str, Any], ...] | None:
    """Validate sparsification parameters; returns them as a sorted tuple of pairs."""
    if kind == "dense":
        if params:
            raise ConfigError(f"dense targets take no params, got {params!r}")
        return None
    items = dict(params or ())
    missing = [p for p in _REQUIRED_PARAMS[kind] if p not in items]
    if missing:
        raise ConfigError(
            f"{kind} targets need params {list(_REQUIRED_PARAMS[kind])}; missing {missing}"
        )
    unknown = sorted(set(items) - set(_REQUIRED_PARAMS[kind]) - set(_OPTIONAL_PARAMS))
    if unknown:
        raise ConfigError(
            f"unknown {kind} params {unknown}; expected {list(_REQUIRED_PARAMS[kind])} and "
            f"optionally {list(_OPTIONAL_PARAMS)}"
        )
    out: dict[str, Any] = {}
    for name, value in items.items():
        if name in ("k", "max_k", "min_k", "num_samples"):
            out[name] = _positive_int(kind, name, value)
        elif name == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"seed must be an int, got {value!r}")
            out[name] = value
        elif name == "labels":
            if not isinstance(value, bool):
                raise ConfigError(f"labels must be True or False, got {value!r}")
            out[name] = value
        elif name == "top_p":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"top_p must be a number in (0, 1], got {value!r}")
            if not 0.0 < float(value) <= 1.0:
                raise ConfigError(f"top_p must be in (0, 1], got {value!r}")
            out[name] = float(value)
        elif name == "grid_temperatures":
            temps = tuple(float(t) for t in value)
            if not all(math.isfinite(t) and t > 0 for t in temps):
                raise ConfigError(f"grid temperatures must be finite and > 0, got {value!r}")
            out[name] = temps
        elif name == "members":
            out[name] = tuple(str(m) for m in value)
        elif name == "sampling":
            if kind not in COUNT_KINDS or value not in ("multinomial", "systematic"):
                raise ConfigError(
                    f"sampling is a parameter of the sampled kinds, one of 'multinomial' "
                    f"(independent draws) or 'systematic'; got {value!r} for kind {kind!r}"
                )
            if value != DEFAULT_SAMPLING[kind]:  # the kind's default is left out of the key
                out[name] = value
        elif name == "compression":
            if value not in COMPRESSIONS:
                raise ConfigError(
                    f"compression must be one of {COMPRESSIONS} (or left out), got {value!r}"
                )
            out[name] = value
        elif name == "value_bits":
            if isinstance(value, bool) or not isinstance(value, int) or value not in VALUE_BITS:
                raise ConfigError(
                    f"value_bits must be an int in {VALUE_BITS.start}..{VALUE_BITS.stop - 1} "
                    f"(8 is the usual choice), got {value!r}"
                )
            out[name] = value
    if kind == "sampled_counts":
        refused = {
            "value_bits": "it stores no values",
            "labels": "a label never drawn has count 0 and adds nothing to p_hat",
            "grid_temperatures": "draws made at one temperature are no sample at another",
        }
        for name, why in refused.items():
            if name in out:
                raise ConfigError(
                    f"sampled_counts targets take no {name!r}: {why}; use kind 'sampled' "
                    "(which keeps the drawn ids' exact values) or 'topk'"
                )
    if "min_k" in out and out["min_k"] > out.get("max_k", out["min_k"]):
        raise ConfigError(f"min_k {out['min_k']} exceeds max_k {out['max_k']}")
    return tuple(sorted(out.items()))


def entry_format_version(token_level: bool) -> int:
    """The format version an entry is written in: :data:`TOKEN_FORMAT_VERSION` for
    token-level entries (the sequence-major layout), :data:`SAMPLE_FORMAT_VERSION` for
    entries with one row per sample (whose bytes no later version changed)."""
    return TOKEN_FORMAT_VERSION if token_level else SAMPLE_FORMAT_VERSION


def entry_spec(
    dataset_fingerprint: dict[str, Any],
    teacher_fingerprint: dict[str, Any],
    targets: TargetSpec,
    *,
    token_level: bool = False,
) -> dict[str, Any]:
    """The key material of one cache entry: everything that changes its bytes.

    Nothing run-specific (cluster size, batch size, paths) belongs here. The format
    version is part of it (:func:`entry_format_version`): a token-level entry of format 2
    and one of format 1 hold different bytes, so they have different keys.
    """
    return {
        "format_version": entry_format_version(token_level),
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
        input_digest: Digest of the input shard the rows were computed from, as the
            dataset read it (file-backed datasets: ids and input columns), as
            ``"<algorithm>:<hex>"`` (:func:`is_input_digest`); None when the dataset
            computes none. A reader that joins inputs checks it.

    The sidecar JSON also holds ``vocab_size`` (V) and, for sparse entries,
    ``num_entries`` (E, kept ids stored) and ``num_slots`` (S); readers ignore keys they
    do not know.
    """

    index: int
    file: str
    num_rows: int
    min_sample_id: int
    max_sample_id: int
    sha256: str
    num_bytes: int
    input_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if out["input_digest"] is None:
            del out["input_digest"]  # records of datasets without a digest stay as before
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "sidecar") -> ShardRecord:
        """Read a record, checking every field: counts are non-negative ints, the SHA-256 is
        64 hex digits, and ``file`` is a plain file name (no directory part, so a record
        can never point outside its entry's ``shards/`` folder).

        Raises:
            CacheCorruptError: a field is missing or wrong (names the file and the field).
        """
        try:
            values: dict[str, Any] = {
                f.name: obj[f.name] if f.default is dataclasses.MISSING else obj.get(f.name)
                for f in dataclasses.fields(cls)
            }
        except (KeyError, TypeError, AttributeError) as exc:
            raise CacheCorruptError(f"{where}: shard record lacks {exc}") from None
        for name in ("index", "num_rows", "num_bytes", "min_sample_id", "max_sample_id"):
            v = values[name]
            if isinstance(v, bool) or not isinstance(v, int):
                raise CacheCorruptError(f"{where}: {name} must be an integer, got {v!r}")
        for name in ("index", "num_rows", "num_bytes"):
            if values[name] < 0:
                raise CacheCorruptError(f"{where}: {name} must be >= 0, got {values[name]}")
        sha = values["sha256"]
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in _HEX for c in sha):
            raise CacheCorruptError(f"{where}: sha256 must be 64 hex digits, got {sha!r}")
        if values["input_digest"] is not None and not is_input_digest(values["input_digest"]):
            raise CacheCorruptError(
                f"{where}: input_digest must be '<algorithm>:<hex digits>', got "
                f"{values['input_digest']!r}"
            )
        name = values["file"]
        if (
            not isinstance(name, str)
            or name in ("", ".", "..")
            or "/" in name
            or "\\" in name
            or "\x00" in name
        ):
            raise CacheCorruptError(
                f"{where}: shard file {name!r} is not a plain file name inside the entry's "
                f"{SHARDS_DIR}/ folder; the record was edited: rebuild the shard"
            )
        return cls(**values)


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
