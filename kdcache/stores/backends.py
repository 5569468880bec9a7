"""Storage backends: how one shard's columns become the bytes of one file, and back.

A backend is stateless and picklable (it travels to Ray actors); the commit protocol
(temporary name, rename, sidecar, manifest) lives in :mod:`kdcache.stores.entry` and is the same
for every backend. Every backend stores the same logical shard, :class:`ShardColumns`:

* ``sample_id``: int64 [N], the stable id of each row.
* *row columns*: one value or one fixed-width vector per row, shape [N] or [N, W]
  (``scaled_logits`` [N, V] for dense targets; ``log_partition`` [N] for sparse ones).
* *ragged columns* (sparse targets only): per-row variable-length runs, stored CSR-style
  as one flat array [E] per column plus shared ``offsets`` int64 [N + 1]; row ``n`` owns
  entries ``offsets[n]:offsets[n + 1]``. Offsets, never padding: a row keeping 3 ids
  costs 3 entries whatever the slot count S.
  A ragged column may instead have *its own* offsets [N + 1] (``entry_offsets``): the
  sequence-major layout of token-level entries keeps per-token, per-entry and bit-packed
  columns in one row per sequence, each with its own run lengths.
* ``meta``: a small JSON object (kind, storage dtype, V, slots, grid temperatures).

Backends (``docs/format.md`` lists every column, file by file):

* ``arrow`` (:class:`ArrowIPCBackend`, default): one uncompressed Arrow IPC file.
* ``parquet`` (:class:`ParquetBackend`): one uncompressed Parquet file; fixed-width
  vectors as ``fixed_size_binary`` and ragged runs as ``binary``, because Parquet's
  ``list<float>`` and ``fixed_size_list`` columns decode through repetition levels:
  measured 25x slower to read (4,000 x 1,000 float32: 118 ms against 4.7 ms).
* ``zarr`` (:class:`ZarrBackend`): one Zarr v3 group per shard, packed into one
  uncompressed zip file (zarr-python's ``ZipStore`` layout), so that a shard is still one
  file, written whole by one writer and checked by one SHA-256.

bfloat16 has no Arrow, Parquet, Zarr or numpy type: its values are stored as their raw
uint16 bit patterns (the upper half of the float32 bits) and ``meta["storage_dtype"]``
says ``"bfloat16"``.

Shape legend: N rows (samples or flattened tokens) in a shard, V classes or vocabulary,
W width of a fixed-width row column, E stored sparse entries in a shard (sum of row
lengths).
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from kdcache import schema
from kdcache.errors import CacheCorruptError, ConfigError, require
from kdcache.schema import BACKENDS as BACKEND_NAMES
from kdcache.schema import COL_OFFSETS, COL_SAMPLE_ID, META_KEY

_ZARR_RAGGED_ATTR = "kdcache_ragged_columns"
_ZARR_OWN_OFFSETS_ATTR = "kdcache_own_offsets"
#: Field metadata (Arrow, Parquet) marking a ragged column with offsets of its own.
_OWN_OFFSETS = "kdcache.own_offsets"


@dataclass
class ShardColumns:
    """The logical content of one shard file, the same for every backend.

    Attributes:
        sample_ids_N: int64 [N] stable ids, in input order.
        rows: Row columns by name: numpy arrays of shape [N] or [N, W] (int64, int32,
            float32, float16, or uint16 holding bfloat16 bits). Names are the column names.
        entries: Ragged columns by name: flat numpy arrays [E]; empty for dense targets.
        offsets_N1: int64 [N + 1] row starts into every ragged column (``offsets[0] = 0``,
            non-decreasing, ``offsets[N] = E``) that has no offsets of its own; None when
            no ragged column uses them.
        entry_offsets: Own offsets (int64 [N + 1], same rules) of the ragged columns that
            have them, by column name.
        meta: JSON-able facts needed to decode (kind, storage dtype, V, ...).
    """

    sample_ids_N: np.ndarray  # noqa: N815 (shape suffix, house style)
    rows: dict[str, np.ndarray] = field(default_factory=dict)
    entries: dict[str, np.ndarray] = field(default_factory=dict)
    offsets_N1: np.ndarray | None = None  # noqa: N815 (shape suffix, house style)
    meta: dict[str, Any] = field(default_factory=dict)
    entry_offsets: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return int(self.sample_ids_N.shape[0])

    def offsets_of(self, name: str) -> np.ndarray:
        """int64 [N + 1]: the offsets of ragged column ``name`` (its own, or the shared)."""
        own = self.entry_offsets.get(name)
        if own is not None:
            return own
        if self.offsets_N1 is None:
            raise CacheCorruptError(f"ragged column {name!r} has no offsets")
        return self.offsets_N1

    def check(self, where: str) -> None:
        """Raise :class:`CacheCorruptError` when shapes disagree (a decoded file is bad)."""
        n = self.num_rows
        for name, col in self.rows.items():
            if col.ndim not in (1, 2) or col.shape[0] != n:
                raise CacheCorruptError(f"{where}: column {name!r} has shape {col.shape}, N={n}")
        unknown = sorted(set(self.entry_offsets) - set(self.entries))
        if unknown:
            raise CacheCorruptError(f"{where}: offsets for no ragged column: {unknown}")
        checked: set[int] = set()
        for name, col in self.entries.items():
            off = self.entry_offsets.get(name, self.offsets_N1)
            if off is None or off.shape != (n + 1,) or int(off[0]) != 0:
                raise CacheCorruptError(f"{where}: bad offsets of {name!r} for {n} rows")
            if id(off) not in checked:  # shared offsets are checked once
                if len(off) > 1 and bool((np.diff(off) < 0).any()):
                    raise CacheCorruptError(f"{where}: offsets of {name!r} decrease")
                checked.add(id(off))
            if col.shape != (int(off[-1]),):
                raise CacheCorruptError(
                    f"{where}: ragged column {name!r} holds {col.shape} entries, "
                    f"offsets say {int(off[-1])}"
                )


class ShardBackend(Protocol):
    """One extension point: encode a :class:`ShardColumns` to one file's bytes and back.

    Contract (tested for every backend by :class:`kdcache.testing.store_suite.StoreSuite`):
    ``decode(encode(c))`` equals ``c`` column by column and dtype by dtype; ``encode`` is
    byte-for-byte deterministic (a retried task writes an identical file); the backend
    pickles; ``decode`` raises :class:`CacheCorruptError` (naming ``where``) on bytes it
    cannot read. ``decode`` is given a bytes-like object: ``bytes``, or the
    ``pyarrow.Buffer`` the reader reads a shard into (no copy; ``memoryview(data)`` or
    ``pa.BufferReader(data)`` read either).
    """

    name: str
    suffix: str

    def encode(self, shard: ShardColumns) -> bytes: ...

    def decode(self, data: bytes | pa.Buffer, where: str) -> ShardColumns: ...


def _meta_bytes(meta: dict[str, Any]) -> bytes:
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


# --------------------------------------------------------------------------------------
# Arrow IPC
# --------------------------------------------------------------------------------------


def _arrow_row_column(col: np.ndarray) -> pa.Array:
    if col.ndim == 1:
        return pa.array(np.ascontiguousarray(col))
    flat = pa.array(np.ascontiguousarray(col).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, col.shape[1])


def _one_chunk(col: pa.ChunkedArray) -> pa.Array:
    """The column as one array: its only chunk as it is (``combine_chunks`` copies even a
    single chunk, measured with pyarrow 26: 0.35 ms per 5 MB shard), else concatenated."""
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _numpy_row_column(col: pa.Array) -> np.ndarray:
    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(len(col), width)
    return col.to_numpy(zero_copy_only=False)


class ArrowIPCBackend:
    """Arrow IPC file (uncompressed), one record batch, one row per sample.

    Columns: ``sample_id`` int64; each 1-D row column as its primitive type; each 2-D row
    column as ``fixed_size_list<T>[W]`` (decodes to a contiguous [N, W] buffer without
    copies, which is why it is used instead of a variable list); each ragged column as
    ``list<T>`` whose int32 offsets are the shard's ``offsets``. ``meta`` is the schema
    metadata ``kdcache`` (compact JSON). Writes are byte-for-byte deterministic.
    """

    name = "arrow"
    suffix = ".arrow"

    def encode(self, shard: ShardColumns) -> bytes:
        cols: dict[str, pa.Array] = {
            COL_SAMPLE_ID: pa.array(np.ascontiguousarray(shard.sample_ids_N, dtype=np.int64))
        }
        for name, col in shard.rows.items():
            cols[name] = _arrow_row_column(col)
        shared: pa.Array | None = None
        fields: list[pa.Field] = []
        for name, col in shard.entries.items():
            own = name in shard.entry_offsets
            offsets = shard.offsets_of(name)
            if int(offsets[-1]) >= 2**31:
                raise ConfigError(f"ragged column {name!r} exceeds 2^31 entries; use more shards")
            if own:
                off = pa.array(offsets.astype(np.int32))
            else:
                if shared is None:
                    shared = pa.array(offsets.astype(np.int32))
                off = shared
            cols[name] = pa.ListArray.from_arrays(off, pa.array(np.ascontiguousarray(col)))
            if own:
                fields.append(pa.field(name, cols[name].type, metadata={_OWN_OFFSETS: b"1"}))
        table = pa.table(cols)
        if fields:  # mark the columns with offsets of their own
            marked = {f.name: f for f in fields}
            table = table.cast(pa.schema([marked.get(f.name, f) for f in table.schema]), safe=False)
        table = table.replace_schema_metadata({META_KEY: _meta_bytes(shard.meta)})
        sink = pa.BufferOutputStream()
        options = pa.ipc.IpcWriteOptions(compression=shard.meta.get("compression"))
        with pa.ipc.new_file(sink, table.schema, options=options) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, data: bytes | pa.Buffer, where: str) -> ShardColumns:
        try:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
            meta = json.loads((table.schema.metadata or {}).get(META_KEY.encode(), b"{}"))
            out = ShardColumns(table.column(COL_SAMPLE_ID).to_numpy(), meta=meta)
            for fld in table.schema:
                name = fld.name
                if name == COL_SAMPLE_ID:
                    continue
                col = _one_chunk(table.column(name))
                if pa.types.is_list(col.type):
                    offsets = col.offsets.to_numpy().astype(np.int64)
                    if _OWN_OFFSETS.encode() in (fld.metadata or {}):
                        out.entry_offsets[name] = offsets
                    elif out.offsets_N1 is None:
                        out.offsets_N1 = offsets
                    out.entries[name] = col.values.to_numpy(zero_copy_only=False)
                else:
                    out.rows[name] = _numpy_row_column(col)
        except (pa.ArrowInvalid, KeyError, ValueError) as exc:
            raise CacheCorruptError(f"{where}: not a readable kdcache Arrow shard ({exc})") from exc
        out.check(where)
        return out


# --------------------------------------------------------------------------------------
# Parquet
# --------------------------------------------------------------------------------------


_PARQUET_DTYPE = "kdcache.dtype"


class ParquetBackend:
    """Parquet file (uncompressed, no dictionary, no statistics), one row group.

    Columns: ``sample_id`` int64; each 1-D row column as its primitive type; each 2-D row
    column [N, W] as ``fixed_size_binary[W * itemsize]`` holding the row's little-endian
    values; each ragged column as ``binary`` holding the row's entries back to back (its
    length / itemsize is the row's length, so the binary offsets are the shard's offsets
    times the itemsize). The numpy dtype of every binary column is the field metadata
    ``kdcache.dtype``; ``meta`` is the file's key-value metadata ``kdcache``.

    Why binary: Parquet stores ``list<float>`` (and Arrow's ``fixed_size_list``) through
    repetition and definition levels, which decode about 25x slower than one binary
    column whose data buffer is already the [N, W] array (measured with pyarrow 26).
    """

    name = "parquet"
    suffix = ".parquet"

    def encode(self, shard: ShardColumns) -> bytes:
        import pyarrow.parquet as pq

        n = shard.num_rows
        fields = [pa.field(COL_SAMPLE_ID, pa.int64())]
        arrays = [pa.array(np.ascontiguousarray(shard.sample_ids_N, dtype=np.int64))]
        for name, col in shard.rows.items():
            col = np.ascontiguousarray(col)
            if col.ndim == 1:
                arrays.append(pa.array(col))
                fields.append(pa.field(name, arrays[-1].type))
                continue
            width = col.shape[1] * col.dtype.itemsize
            typ = pa.binary(width) if width > 0 else pa.binary()
            if width > 0:
                arr = pa.FixedSizeBinaryArray.from_buffers(typ, n, [None, pa.py_buffer(col)])
            else:
                arr = pa.array([b""] * n, pa.binary())
            arrays.append(arr)
            meta = {_PARQUET_DTYPE: col.dtype.str, "kdcache.width": str(col.shape[1])}
            fields.append(pa.field(name, typ, metadata=meta))
        if shard.entries:
            for name, col in shard.entries.items():
                col = np.ascontiguousarray(col)
                byte_off = shard.offsets_of(name) * col.dtype.itemsize
                if int(byte_off[-1]) >= 2**31:
                    raise ConfigError(f"ragged column {name!r} exceeds 2 GiB; use more shards")
                arr = pa.BinaryArray.from_buffers(
                    pa.binary(),
                    n,
                    [None, pa.py_buffer(byte_off.astype(np.int32)), pa.py_buffer(col)],
                )
                arrays.append(arr)
                fmeta = {_PARQUET_DTYPE: col.dtype.str}
                if name in shard.entry_offsets:
                    fmeta[_OWN_OFFSETS] = "1"
                fields.append(pa.field(name, pa.binary(), metadata=fmeta))
        schema = pa.schema(fields, metadata={META_KEY: _meta_bytes(shard.meta)})
        table = pa.Table.from_arrays(arrays, schema=schema)
        sink = pa.BufferOutputStream()
        pq.write_table(
            table,
            sink,
            compression=shard.meta.get("compression") or "none",
            use_dictionary=False,
            write_statistics=False,
            row_group_size=max(n, 1),
        )
        return sink.getvalue().to_pybytes()

    def decode(self, data: bytes | pa.Buffer, where: str) -> ShardColumns:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
            meta = json.loads((table.schema.metadata or {}).get(META_KEY.encode(), b"{}"))
            out = ShardColumns(table.column(COL_SAMPLE_ID).to_numpy(), meta=meta)
            n = out.num_rows
            for fld in table.schema:
                if fld.name == COL_SAMPLE_ID:
                    continue
                col = _one_chunk(table.column(fld.name))
                fmeta = fld.metadata or {}
                if _PARQUET_DTYPE.encode() not in fmeta:
                    out.rows[fld.name] = col.to_numpy(zero_copy_only=False)
                    continue
                dtype = np.dtype(fmeta[_PARQUET_DTYPE.encode()].decode())
                if b"kdcache.width" in fmeta:
                    width = int(fmeta[b"kdcache.width"])
                    buf = col.buffers()[1] if width else None
                    start = col.offset * width * dtype.itemsize
                    flat = (
                        np.frombuffer(buf, dtype, count=n * width, offset=start)
                        if buf is not None and n
                        else np.zeros(0, dtype)
                    )
                    out.rows[fld.name] = flat.reshape(n, width)
                else:
                    offs = np.frombuffer(col.buffers()[1], np.int32, count=n + 1, offset=0)
                    offs = offs[col.offset : col.offset + n + 1].astype(np.int64)
                    buf = col.buffers()[2]
                    lo, hi = int(offs[0]), int(offs[-1])
                    flat = (
                        np.frombuffer(buf, np.uint8)[lo:hi].view(dtype)
                        if buf is not None
                        else np.zeros(0, dtype)
                    )
                    out.entries[fld.name] = flat
                    if _OWN_OFFSETS.encode() in fmeta:
                        out.entry_offsets[fld.name] = (offs - lo) // dtype.itemsize
                    elif out.offsets_N1 is None:
                        out.offsets_N1 = (offs - lo) // dtype.itemsize
        except (pa.ArrowInvalid, KeyError, ValueError, OSError) as exc:
            raise CacheCorruptError(
                f"{where}: not a readable kdcache Parquet shard ({exc})"
            ) from exc
        out.check(where)
        return out


# --------------------------------------------------------------------------------------
# Zarr v3
# --------------------------------------------------------------------------------------

#: Bytes per chunk a reader fetches; rows per chunk = max(1, this // bytes per row).


ZARR_CHUNK_BYTES = 4 << 20


_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _chunk_rows(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk shape: whole rows, about :data:`ZARR_CHUNK_BYTES`, split evenly so the last
    chunk is not mostly padding (zarr stores every chunk at full size)."""
    row_bytes = itemsize * (shape[1] if len(shape) == 2 else 1)
    num_rows = max(shape[0], 1)
    per_chunk = max(1, min(num_rows, ZARR_CHUNK_BYTES // max(row_bytes, 1)))
    num_chunks = -(-num_rows // per_chunk)
    return (-(-num_rows // num_chunks), *[max(s, 1) for s in shape[1:]])


def _zarr_offsets_name(column: str) -> str:
    """The Zarr array holding the own offsets of ragged column ``column``."""
    return f"{column}__offsets"


class ZarrBackend:
    """Zarr v3: one group per shard, packed into one uncompressed zip (``.zarr.zip``).

    Group attributes ``kdcache`` hold ``meta``. Arrays: ``sample_id`` int64 [N]; each row
    column [N] or [N, W]; for sparse targets ``offsets`` int64 [N + 1] and each ragged
    column [E]. Chunks hold whole rows, about :data:`ZARR_CHUNK_BYTES` each (sized for
    reading); no compressor (scaled logits do not compress). The zip lists members in
    sorted order with a fixed timestamp, so a rewrite is byte-identical; the file opens
    with ``zarr.open_group(zarr.storage.ZipStore(path, mode="r"))``. Zarr is optional:
    this backend imports it lazily and names the ``zarr`` extra when it is missing.
    """

    name = "zarr"
    suffix = ".zarr.zip"

    def encode(self, shard: ShardColumns) -> bytes:
        zarr = require("zarr", "zarr")
        from zarr.storage import MemoryStore

        store_dict: dict[str, Any] = {}
        group = zarr.open_group(
            MemoryStore(store_dict),
            mode="w",
            zarr_format=3,
            attributes={
                META_KEY: shard.meta,
                _ZARR_RAGGED_ATTR: sorted(shard.entries),
                **(
                    {_ZARR_OWN_OFFSETS_ATTR: sorted(shard.entry_offsets)}
                    if shard.entry_offsets
                    else {}
                ),
            },
        )
        arrays = {COL_SAMPLE_ID: np.ascontiguousarray(shard.sample_ids_N, dtype=np.int64)}
        arrays.update(shard.rows)
        if shard.entries:
            if shard.offsets_N1 is not None:
                arrays[COL_OFFSETS] = np.ascontiguousarray(shard.offsets_N1, dtype=np.int64)
            arrays.update(shard.entries)
            for name, own in shard.entry_offsets.items():
                arrays[_zarr_offsets_name(name)] = np.ascontiguousarray(own, dtype=np.int64)
        compressors: Any = None
        if shard.meta.get("compression") == "zstd":
            from zarr.codecs import ZstdCodec

            compressors = [ZstdCodec(level=3)]
        for name, col in arrays.items():
            col = np.ascontiguousarray(col)
            arr = group.create_array(
                name,
                shape=col.shape,
                dtype=col.dtype,
                chunks=_chunk_rows(col.shape, col.dtype.itemsize),
                compressors=compressors,
                fill_value=0,
            )
            if col.size:
                arr[...] = col
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for key in sorted(store_dict):
                info = zipfile.ZipInfo(key, date_time=_ZIP_DATE)
                info.external_attr = 0o644 << 16
                zf.writestr(info, store_dict[key].to_bytes())
        return buf.getvalue()

    def decode(self, data: bytes | pa.Buffer, where: str) -> ShardColumns:
        zarr = require("zarr", "zarr")
        from zarr.core.buffer import cpu
        from zarr.storage import MemoryStore

        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                store_dict: dict[str, Any] = {
                    n: cpu.Buffer.from_bytes(zf.read(n)) for n in zf.namelist()
                }
            group = zarr.open_group(MemoryStore(store_dict), mode="r", zarr_format=3)
            meta = dict(group.attrs.get(META_KEY, {}))
            names = sorted(name for name, _ in group.arrays())
            if COL_SAMPLE_ID not in names:
                raise KeyError(COL_SAMPLE_ID)
            out = ShardColumns(np.asarray(group[COL_SAMPLE_ID][...]), meta=meta)
            ragged = set(group.attrs.get(_ZARR_RAGGED_ATTR, ()))
            own = {_zarr_offsets_name(n): n for n in group.attrs.get(_ZARR_OWN_OFFSETS_ATTR, ())}
            for name in names:
                if name == COL_SAMPLE_ID:
                    continue
                values = np.asarray(group[name][...])
                if name == COL_OFFSETS:
                    out.offsets_N1 = values.astype(np.int64)
                elif name in own:
                    out.entry_offsets[own[name]] = values.astype(np.int64)
                elif name in ragged:
                    out.entries[name] = values
                else:
                    out.rows[name] = values
        except (zipfile.BadZipFile, KeyError, ValueError, OSError) as exc:
            raise CacheCorruptError(f"{where}: not a readable kdcache Zarr shard ({exc})") from exc
        out.check(where)
        return out


_IMPLEMENTATIONS: dict[str, ShardBackend] = {
    "arrow": ArrowIPCBackend(),
    "parquet": ParquetBackend(),
    "zarr": ZarrBackend(),
}
#: The registry, keyed by the names that :data:`kdcache.schema.BACKENDS` lists (the one
#: list of backend names, which target specs are checked against).
BACKENDS: dict[str, ShardBackend] = {name: _IMPLEMENTATIONS[name] for name in BACKEND_NAMES}


def register_backend(backend: ShardBackend) -> None:
    """Register a user's backend under ``backend.name``: specs may then name it.

    Args:
        backend: An object with ``name``, ``suffix``, ``encode`` and ``decode`` (the
            :class:`ShardBackend` protocol); picklable, since stores travel to Ray actors.
            It must pass :class:`kdcache.testing.store_suite.StoreSuite`.

    Raises:
        ConfigError: it lacks part of the protocol, or its name is taken by another
            backend.
    """
    missing = [a for a in ("name", "suffix", "encode", "decode") if not hasattr(backend, a)]
    if missing:
        raise ConfigError(
            f"{type(backend).__name__} is not a ShardBackend: it lacks {', '.join(missing)}"
        )
    name = str(backend.name)
    if name in BACKENDS and BACKENDS[name] is not backend:
        raise ConfigError(f"a backend named {name!r} is already registered")
    schema.add_backend_name(name)
    BACKENDS[name] = backend


def get_backend(name: str) -> ShardBackend:
    """The backend registered under ``name``.

    Raises:
        ConfigError: no such backend.
    """
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
