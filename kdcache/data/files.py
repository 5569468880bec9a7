"""File-backed input datasets: Parquet, Arrow IPC files, and Hugging Face ``save_to_disk``.

Each dataset here is a small picklable *plan* (the files, their sizes and versions, and
which row groups or record batches make each shard), made on the driver from file
metadata only (Parquet footers, Arrow IPC footers and message headers), never from the
data. A shard is read only where it is used (a Ray actor, a DataLoader worker), batch by
batch, with memory bounded by one row group or record batch plus the batch
(:meth:`open_shard`), and the reader reports an XXH3-128 digest of what it read
(:attr:`kdcache.data.base.ShardBatches.digest`), which the teacher stage records with
each output shard.

Sharding: a shard is a run of consecutive row groups (Parquet) or record batches (Arrow)
of *one* file, never more. With ``rows_per_shard=None`` runs are grouped to about
:data:`DEFAULT_SHARD_BYTES` of data (Parquet: the uncompressed bytes of the columns read;
Arrow: the record batches' body bytes); with ``rows_per_shard=n`` to about ``n`` rows.
A row group or record batch is never split, so a shard holds at least one.

Ids: ``id_column`` names an integer column of ids, unique within each file (checked where
each shard is read). ``id_column=None`` derives ids from the position of the row:
``file_index * 2**40 + row_index`` (file index in the dataset's file list, row index in
the file). Derived ids suit a source that never changes: inserting, removing or
re-ordering files changes every later file's ids, and so the cache key.

Fingerprint (:meth:`fingerprint`, what the teacher cache key is made of): format,
columns, transform, the files' names, sizes and versions (local: ``mtime_ns``; object
stores: the ETag, else the modification time) and the shards. It is computed from the
plan, so it is cheap and trusts sizes and versions; the content digest of each shard is
computed where the shard is read and recorded with the output shard. ``docs/datasets.md``
has the whole story.

Shape legend: B rows in a batch, C input columns, N rows in a shard.
"""

from __future__ import annotations

import copy
import json
import os
import re
import struct
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import xxhash

from kdcache.data.base import ShardBatches, read_shard_checked
from kdcache.data.transforms import Transform, TransformLike, apply_chain, as_chain
from kdcache.data.transforms import chain_fingerprint as _chain_fingerprint
from kdcache.errors import (
    ConfigError,
    DataError,
    DataFileNotFoundError,
    InputChangedError,
    KDCacheError,
    RetriableError,
)
from kdcache.schema import canonical_json
from kdcache.stores.fs import Location, _without_credentials, split_query

#: Default amount of data per shard when ``rows_per_shard`` is None (bytes).
DEFAULT_SHARD_BYTES = 128 << 20
#: Derived ids are ``file_index * ID_FILE_STRIDE + row_index`` (``id_column=None``).
ID_FILE_STRIDE = 1 << 40
#: About how much is read from a file at once, before it is cut into batches (bytes).
_READ_BYTES = 4 << 20
#: Most rows read at once by the duplicate-id check (the id column alone).
_READ_ROWS = 1 << 20
#: The content digest hashes each column's bytes in chunks of this size, in parallel.
#: The algorithm of a shard's content digest: XXH3-128, a checksum (not a cryptographic
#: hash): it detects any accidental change of what was read, at memory speed; the cache's
#: own shard files keep SHA-256 (docs/datasets.md, "Fingerprints and digests").
DIGEST_ALGORITHM = "xxh3_128"
_DIGEST_VERSION = "kdcache-shard-digest-2"
_FORMATS = ("auto", "parquet", "arrow", "hf")


# -- errors ------------------------------------------------------------------------------
_AUTH = re.compile(
    r"ACCESS_DENIED|AccessDenied|INVALID_ACCESS_KEY_ID|InvalidAccessKeyId|"
    r"SIGNATURE_DOES_NOT_MATCH|SignatureDoesNotMatch|EXPIRED_TOKEN|ExpiredToken|"
    r"HTTP status 40[13]|No credentials|InvalidToken"
)

#: An object-store error worth retrying (network, throttling, the server's own failure).
_NETWORK = re.compile(
    r"AWS Error (NETWORK_CONNECTION|SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|"
    r"THROTTLING|REQUEST_TIMEOUT)|curl|Curl|[Cc]onnection|[Tt]imed? ?out|"
    r"HTTP status 5\d\d|[Ss]ocket|[Tt]emporar"
)


def _clean(text: str) -> str:
    """An exception text for messages: no URI credentials, no AWS secrets from the env."""
    text = " ".join(_without_credentials(text).split())
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        value = os.environ.get(var)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@contextmanager
def _translate(display: str, doing: str, *, remote: bool, kind: str) -> Iterator[None]:
    """Turn pyarrow's exceptions while ``doing`` something to ``display`` into kdcache's.

    Raises:
        DataFileNotFoundError: the file does not exist.
        ConfigError: the object store refused the credentials (no credentials shown).
        RetriableError: a remote file could not be reached (network, throttling).
        DataError: the file is not a readable ``kind`` file (bad magic, bad footer,
            truncated, corrupt pages).
    """
    try:
        yield
    except KDCacheError:
        raise
    except FileNotFoundError:
        raise DataFileNotFoundError(
            f"{display} does not exist (while {doing}); check the path, or re-plan the "
            "dataset if files were moved"
        ) from None
    except (pa.ArrowException, OSError, ValueError, struct.error, IndexError) as exc:
        msg = _clean(str(exc))
        if _AUTH.search(msg):
            raise ConfigError(
                f"access to {display} was refused while {doing} ({msg}); check the "
                "object-store credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                "AWS_SESSION_TOKEN (or AWS_PROFILE) and the bucket policy"
            ) from None
        if remote and isinstance(exc, OSError) and _NETWORK.search(msg):
            raise RetriableError(
                f"could not read {display} while {doing}: {msg}; check the address and "
                "the network (safe to retry)"
            ) from None
        raise DataError(
            f"{display} is not a readable {kind} file ({type(exc).__name__}: {msg}) while "
            f"{doing}; it may be truncated or corrupt: rewrite it, or remove it from the "
            "dataset"
        ) from None


# -- files and their plans ---------------------------------------------------------------
@dataclass(frozen=True)
class _FilePlan:
    """What planning learnt about one file (driver only; not kept in the pickle)."""

    size: int
    version: int | str | None
    schema: pa.Schema
    unit_rows: list[int]
    unit_bytes: list[int]
    unit_id_ranges: list[tuple[int, int] | None]
    unit_offsets: list[int] | None = None


@dataclass(frozen=True, slots=True)
class _Shard:
    """One shard: units ``[lo, hi)`` of file ``file`` (what travels in the pickle)."""

    file: int
    lo: int
    hi: int
    row_start: int
    num_records: int
    id_range: tuple[int, int] | None
    byte_offset: int | None
    num_bytes: int


def _local_fs() -> pafs.FileSystem:
    return pafs.LocalFileSystem(use_mmap=True)


def _fs_of(root: Location) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of ``root``; local files are memory-mapped."""
    if root.is_local:
        return _local_fs(), root.uri
    with _translate(root.display(), "resolving the filesystem", remote=True, kind="input"):
        return root.fs, root.path


def _file_state(fs: pafs.FileSystem, path: str, f: pa.NativeFile) -> tuple[int, int | str | None]:
    """``(size, version)`` of an open file: version is the ETag when the store gives one,
    else the modification time in ns (None when unknown)."""
    size = int(f.size())
    try:
        meta = f.metadata() or {}
    except (OSError, pa.ArrowNotImplementedError):
        meta = {}
    etag = meta.get(b"ETag") or meta.get("ETag")
    if etag:
        return size, (etag.decode() if isinstance(etag, bytes) else str(etag)).strip('"')
    info = fs.get_file_info(path)
    return size, None if info.mtime_ns is None else int(info.mtime_ns)


def _hidden(rel: str) -> bool:
    return any(part.startswith((".", "_")) for part in rel.split("/"))


def _fs_path(loc: Location, prefix: str) -> str:
    """The path of ``loc`` on its filesystem (``prefix``: what the URI has before it)."""
    return loc.uri if loc.is_local else loc.base[len(prefix) :]


def _find_files(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], suffixes: tuple[str, ...]
) -> tuple[Location, list[str]]:
    """The dataset root and its files' names relative to it, in dataset order.

    A directory contributes every file under it whose name ends in one of ``suffixes``
    (recursively, sorted, skipping names starting with ``.`` or ``_``); a file
    contributes itself. The root is the deepest directory holding them all.

    Raises:
        ConfigError: no path, or paths on different filesystems.
        DataFileNotFoundError: a path does not exist.
        DataError: a directory holds no such file.
    """
    items = [path] if isinstance(path, str | os.PathLike) else list(path)
    if not items:
        raise ConfigError("path is an empty list; pass a file, a directory or a list of files")
    locs = [Location(os.fspath(p)) for p in items]
    first = locs[0]
    fs, first_path = _fs_of(first)
    query = "" if first.is_local else split_query(first.uri)[1]
    prefix = ""
    if not first.is_local:
        base = first.base
        if not base.endswith(first_path.rstrip("/")):
            raise ConfigError(f"cannot map {first.display()} to a path on its filesystem")
        prefix = base[: len(base) - len(first_path.rstrip("/"))]
    files: list[str] = []
    for loc in locs:
        if loc.is_local != first.is_local or (
            not loc.is_local
            and (split_query(loc.uri)[1] != query or not loc.base.startswith(prefix))
        ):
            raise ConfigError(
                f"all files of a dataset must be on one filesystem with the same options: "
                f"{first.display()} and {loc.display()} differ; make one dataset per store"
            )
        fs_path = _fs_path(loc, prefix)
        with _translate(loc.display(), "listing", remote=not loc.is_local, kind="input"):
            info = fs.get_file_info(fs_path)
            if info.type == pafs.FileType.NotFound:
                raise DataFileNotFoundError(
                    f"{loc.display()} does not exist; pass an existing file or directory"
                )
            if info.type == pafs.FileType.Directory:
                sel = pafs.FileSelector(fs_path, recursive=True)
                found = sorted(
                    i.path
                    for i in fs.get_file_info(sel)
                    if i.type == pafs.FileType.File
                    and i.path.endswith(suffixes)
                    and not _hidden(i.path[len(fs_path.rstrip("/")) + 1 :])
                )
                if not found:
                    raise DataError(
                        f"{loc.display()} holds no {' / '.join('*' + s for s in suffixes)} "
                        "files (names starting with '.' or '_' are skipped): the dataset "
                        "would be empty; check the path and the format"
                    )
                files.extend(found)
            else:
                files.append(fs_path)
    if len(locs) == 1 and (len(files) != 1 or files[0] != _fs_path(locs[0], prefix)):
        root_path = _fs_path(locs[0], prefix).rstrip("/") or "/"  # the directory given
    else:
        root_path = os.path.commonpath([os.path.dirname(p) for p in files])
    if not root_path:
        raise ConfigError(
            f"the files given ({first.display()}, ...) share no directory (different buckets?); "
            "make one dataset per bucket"
        )
    names = [p[len(root_path.rstrip("/")) + 1 :] for p in files]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"file {dup!r} is listed twice; list each file once")
    root = Location(root_path) if first.is_local else Location(prefix + root_path + query)
    return root, names


def _group_units(
    unit_rows: list[int], unit_bytes: list[int], rows_per_shard: int | None
) -> list[tuple[int, int]]:
    """Runs ``[lo, hi)`` of units of about ``rows_per_shard`` rows (else about
    :data:`DEFAULT_SHARD_BYTES`); a unit joins a run when that brings the run nearer the
    target."""
    weights = unit_rows if rows_per_shard else unit_bytes
    target = rows_per_shard or DEFAULT_SHARD_BYTES
    runs: list[tuple[int, int]] = []
    lo, cur = 0, 0
    for k, w in enumerate(weights):
        if k > lo and w > 0 and cur + w / 2 > target:  # never a run of empty units
            runs.append((lo, k))
            lo, cur = k, 0
        cur += w
    runs.append((lo, len(weights)))
    return runs


# -- columns -----------------------------------------------------------------------------
def _is_numeric(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)


def _is_var_binary(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_string(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_large_string(t)
    )


def _input_kind(t: pa.DataType) -> tuple[str, tuple[int, ...]] | None:
    """``("scalar", ())``, ``("fixed", row_shape)``, ``("variable", ())`` or None."""
    if _is_numeric(t):
        return "scalar", ()
    if pa.types.is_fixed_size_binary(t):
        return "fixed", (t.byte_width,)
    if pa.types.is_fixed_size_list(t):
        inner = _input_kind(t.value_type)
        if inner is None:
            return None
        if inner[0] == "variable":
            return "variable", ()
        return "fixed", (t.list_size, *inner[1])
    if _is_var_binary(t):
        return "variable", ()
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return ("variable", ()) if _input_kind(t.value_type) is not None else None
    return None


_SUPPORTED = (
    "fixed_size_binary(n), fixed_size_list<T>[n] (nested too), integer/float/bool scalars, "
    "binary/string and list<...> of those"
)


def _fixed_values(arr: pa.Array) -> np.ndarray:
    """The flat values of a fixed-width column, zero-copy where the type allows."""
    t = arr.type
    if pa.types.is_fixed_size_binary(t):
        w = t.byte_width
        buf = arr.buffers()[1]
        if buf is None:
            return np.zeros(0, dtype=np.uint8)
        return np.frombuffer(buf, dtype=np.uint8, count=len(arr) * w, offset=arr.offset * w)
    if pa.types.is_fixed_size_list(t):
        return _fixed_values(arr.flatten())
    return arr.to_numpy(zero_copy_only=False)


def _var_offsets(arr: pa.Array) -> np.ndarray:
    dtype = (
        np.int64
        if (
            pa.types.is_large_binary(arr.type)
            or pa.types.is_large_string(arr.type)
            or pa.types.is_large_list(arr.type)
        )
        else np.int32
    )
    return np.frombuffer(
        arr.buffers()[1],
        dtype=dtype,
        count=len(arr) + 1,
        offset=arr.offset * np.dtype(dtype).itemsize,
    )


def _streams(arr: pa.Array, prefix: str, out: list[tuple[str, Any]]) -> None:
    """The byte streams that identify a column's values, independent of how it is cut
    into batches: flat values for fixed widths; lengths and values for variable ones."""
    t = arr.type
    if arr.null_count:
        raise _NullError(prefix)
    if _is_numeric(t) or pa.types.is_fixed_size_binary(t) or pa.types.is_fixed_size_list(t):
        if pa.types.is_fixed_size_list(t) and _input_kind(t)[0] == "variable":  # type: ignore[index]
            _streams(arr.flatten(), prefix + "item/", out)
            return
        child = arr
        while pa.types.is_fixed_size_list(child.type):
            child = child.flatten()
            if child.null_count:
                raise _NullError(prefix + "item")
        out.append((prefix + "values", _fixed_values(arr)))
        return
    offsets = _var_offsets(arr)
    out.append((prefix + "lengths", np.diff(offsets).astype(np.int64)))
    if _is_var_binary(t):
        data = arr.buffers()[2]
        if data is not None and len(arr):
            out.append((prefix + "data", memoryview(data)[int(offsets[0]) : int(offsets[-1])]))
        return
    _streams(arr.flatten(), prefix + "item/", out)


class _NullError(Exception):
    """Internal: a null in a column that must have none (turned into a DataError)."""


# -- the content digest ------------------------------------------------------------------
class _StreamDigest:
    """XXH3-128 over a byte stream, updated in the reading thread (about 10 GB/s a core,
    so hashing every byte costs a tenth of reading it); the digest depends on the bytes
    only, never on how they arrived in batches."""

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128()
        self._total = 0

    def update(self, data: Any) -> None:
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
        mv = memoryview(data).cast("B")
        self._total += len(mv)
        self._h.update(mv)

    def hexdigest(self) -> str:
        return f"{self._total}:{self._h.hexdigest()}"


class _ShardDigest:
    """Named :class:`_StreamDigest` s (ids, each input column's streams), one digest."""

    def __init__(self, header: dict[str, Any]) -> None:
        self._header = header
        self._streams: dict[str, _StreamDigest] = {}

    def update(self, name: str, data: Any) -> None:
        s = self._streams.get(name)
        if s is None:
            s = self._streams[name] = _StreamDigest()
        s.update(data)

    def hexdigest(self, num_records: int) -> str:
        """``"xxh3_128:<32 hex digits>"`` over the header and every stream's digest."""
        h = xxhash.xxh3_128(canonical_json({**self._header, "num_records": num_records}).encode())
        for name in sorted(self._streams):
            h.update(f"\n{name}:{self._streams[name].hexdigest()}".encode())
        return f"{DIGEST_ALGORITHM}:{h.hexdigest()}"


# -- stream-format message headers (Arrow IPC) -------------------------------------------
def _u32(b: Any, p: int) -> int:
    return int(struct.unpack_from("<I", b, p)[0])


def _i64(b: Any, p: int) -> int:
    return int(struct.unpack_from("<q", b, p)[0])


def _fb_field(b: Any, table: int, index: int) -> int | None:
    """Position of field ``index`` of the flatbuffer table at ``table`` (None if absent)."""
    vtable = table - int(struct.unpack_from("<i", b, table)[0])
    if 4 + 2 * index >= struct.unpack_from("<H", b, vtable)[0]:
        return None
    off = int(struct.unpack_from("<H", b, vtable + 4 + 2 * index)[0])
    return table + off if off else None


def _message_header(meta: Any) -> tuple[int, int, int]:
    """``(header_type, body_length, num_rows)`` of an Arrow ``Message`` flatbuffer
    (header_type 1 = schema, 2 = dictionary batch, 3 = record batch)."""
    root = _u32(meta, 0)
    p = _fb_field(meta, root, 1)
    header_type = int(meta[p]) if p is not None else 0
    p = _fb_field(meta, root, 3)
    body = _i64(meta, p) if p is not None else 0
    rows = 0
    if header_type == 3:
        p = _fb_field(meta, root, 2)
        if p is not None:
            header = p + _u32(meta, p)
            q = _fb_field(meta, header, 0)
            rows = _i64(meta, q) if q is not None else 0
    return header_type, body, rows


def _ipc_file_blocks(f: pa.NativeFile) -> list[tuple[int, int, int, int]]:
    """``(offset, rows, body_bytes)`` of each record batch of an Arrow IPC file, from its
    footer and the batches' message headers (no data read)."""
    size = f.size()
    tail = f.read_at(10, size - 10)
    footer_len = int(struct.unpack_from("<i", tail, 0)[0])
    footer = f.read_at(footer_len, size - 10 - footer_len)
    p = _fb_field(footer, _u32(footer, 0), 3)
    if p is None:
        return []
    vec = p + _u32(footer, p)
    out = []
    for k in range(_u32(footer, vec)):
        at = vec + 4 + 24 * k
        offset, meta_len = _i64(footer, at), int(struct.unpack_from("<i", footer, at + 8)[0])
        meta = f.read_at(meta_len, offset)
        start = 8 if _u32(meta, 0) == 0xFFFFFFFF else 4
        _, body, rows = _message_header(memoryview(meta)[start:])
        out.append((offset, rows, body, meta_len))
    return out


def _ipc_stream_blocks(f: pa.NativeFile, display: str) -> list[tuple[int, int, int]]:
    """``(offset, rows, body_bytes)`` of each record batch of an Arrow IPC stream, by
    walking the message headers (bodies are skipped, not read)."""
    size, pos, out = f.size(), 0, []
    while pos + 8 <= size:
        head = f.read_at(min(4096, size - pos), pos)
        if _u32(head, 0) == 0xFFFFFFFF:
            meta_len, start = int(struct.unpack_from("<i", head, 4)[0]), 8
        else:
            meta_len, start = int(struct.unpack_from("<i", head, 0)[0]), 4
        if meta_len == 0:
            break
        meta = head[start : start + meta_len]
        if len(meta) < meta_len:
            meta = f.read_at(meta_len, pos + start)
        header_type, body, rows = _message_header(meta)
        if header_type == 2:
            raise DataError(
                f"{display} holds dictionary-encoded columns, which kdcache does not read "
                "from Arrow streams; rewrite it without dictionaries (cast the columns to "
                "their value type) or as Parquet"
            )
        if header_type == 3:
            out.append((pos, rows, body))
        pos += start + meta_len + body
    return out


# -- the datasets ------------------------------------------------------------------------
def _as_names(value: Any, what: str) -> tuple[str, ...]:
    names = [value] if isinstance(value, str) else list(value) if value is not None else []
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ConfigError(
            f"{what} must be a column name or a non-empty list of names, got {value!r}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{what} names a column twice: {names}")
    return tuple(names)


class FileDataset:
    """Base of the file-backed datasets: a plan of shards over files, read lazily.

    Implements :class:`kdcache.data.base.StreamingDataset`. Subclasses say how to find,
    plan and read their files (:meth:`_plan_file`, :meth:`_read_units`).

    Args:
        path: One file, a list of files, or a directory (every file of the format under
            it, recursively, sorted; names starting with ``.`` or ``_`` are skipped).
            Local paths, ``file://`` URIs and the object-store URIs of
            :class:`kdcache.stores.fs.Location` (``s3://bucket/prefix?endpoint_override=
            host:port&scheme=http``; credentials from the ``AWS_*`` environment variables).
        id_column: Integer column of sample ids, unique within each file (cast to int64),
            or None to derive ids ``file_index * 2**40 + row_index`` (see the module
            docstring for the cost).
        input_columns: The column (or list of numeric scalar columns) the teachers read.
            Decoded per batch as: ``fixed_size_binary(n)`` -> uint8 [B, n];
            ``fixed_size_list<T>[n]`` -> T [B, n] (nested lists add dimensions); a numeric
            scalar -> [B]; several numeric scalars -> [B, C] (numpy's promoted dtype);
            binary, string and variable lists -> object [B] (a transform decodes them).
        label_column: Integer class-id column -> int64 [B] (a null becomes -100, "no
            label"), or None. Not part of the fingerprint or digest.
        input_shape: Shape of one row of inputs, e.g. ``(28, 28)``: a fixed-width row is
            reshaped to it (its size must match); None keeps the decoded shape.
        transform: A :class:`~kdcache.data.transforms.Transform`, its import path, or a
            list of them (a chain), applied to the decoded inputs of each batch.
        label_transform: A :class:`~kdcache.data.transforms.Transform` (or its import
            path) called as ``fn(labels_B, sample_ids_B, **kwargs) -> labels_B`` (int64
            [B], -100 = no label) on each batch's labels, e.g. to keep a labelled subset.
            Labels are in no fingerprint, so it never changes a cache key or a join.
        rows_per_shard: About this many rows per shard (whole row groups / record
            batches; one file per shard at most); None for about
            :data:`DEFAULT_SHARD_BYTES` of data per shard.

    Raises:
        ConfigError: an argument is malformed, ``input_shape`` does not fit the rows,
            or the credentials are refused.
        DataFileNotFoundError: a path does not exist.
        DataError: no file found, an empty file, an unreadable file, a missing column
            (the message lists the columns there are), a column of the wrong type, or
            files whose columns disagree.
        RetriableError: an object store could not be reached.
    """

    #: One sample is one row (see :data:`kdcache.data.base.LAYOUTS`).
    layout = "records"
    #: The ``format`` of the fingerprint.
    format: ClassVar[str] = ""
    #: What a shard is made of, as named in the fingerprint.
    _unit: ClassVar[str] = "row_groups"
    _suffixes: ClassVar[tuple[str, ...]] = ()
    _kind: ClassVar[str] = ""

    def __init__(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        id_column: str | None,
        input_columns: str | Sequence[str],
        label_column: str | None = None,
        input_shape: Sequence[int] | None = None,
        transform: TransformLike = None,
        rows_per_shard: int | None = None,
        label_transform: Transform | str | None = None,
    ) -> None:
        if id_column is not None and (not isinstance(id_column, str) or not id_column):
            raise ConfigError(f"id_column must be a column name or None, got {id_column!r}")
        if label_column is not None and (not isinstance(label_column, str) or not label_column):
            raise ConfigError(f"label_column must be a column name or None, got {label_column!r}")
        if rows_per_shard is not None and (
            isinstance(rows_per_shard, bool)
            or not isinstance(rows_per_shard, int)
            or rows_per_shard < 1
        ):
            raise ConfigError(f"rows_per_shard must be an int >= 1 or None, got {rows_per_shard!r}")
        self.id_column = id_column
        self.input_columns = _as_names(input_columns, "input_columns")
        self.label_column = label_column
        self.input_shape = None if input_shape is None else tuple(int(d) for d in input_shape)
        if self.input_shape is not None and (
            not self.input_shape or any(d < 1 for d in self.input_shape)
        ):
            raise ConfigError(f"input_shape must be positive dimensions, got {input_shape!r}")
        self.rows_per_shard = rows_per_shard
        self._chain = as_chain(transform)
        labels_chain = as_chain(label_transform)
        if labels_chain and label_column is None:
            raise ConfigError("label_transform needs a label_column to transform")
        if len(labels_chain) > 1:
            raise ConfigError("label_transform takes one transform, not a chain")
        self.label_transform = labels_chain[0] if labels_chain else None
        self._root, self._names = self._find(path)
        self._plan()

    # -- planning (driver) -------------------------------------------------------------
    def _find(self, path: Any) -> tuple[Location, list[str]]:
        return _find_files(path, self._suffixes)

    def _columns_read(self) -> list[str]:
        cols = [*([self.id_column] if self.id_column else []), *self.input_columns]
        return cols + ([self.label_column] if self.label_column else [])

    def _plan_file(self, fs: pafs.FileSystem, path: str, display: str) -> _FilePlan:
        raise NotImplementedError

    def _plan(self) -> None:
        fs, root = _fs_of(self._root)
        paths = [f"{root.rstrip('/')}/{n}" for n in self._names]

        def plan_one(i: int) -> _FilePlan:
            display = self._root.display(self._names[i])
            with _translate(
                display, "reading its metadata", remote=not self._root.is_local, kind=self._kind
            ):
                plan = self._plan_file(fs, paths[i], display)
            if sum(plan.unit_rows) == 0:
                raise DataError(
                    f"{display} has no rows; remove the empty file from the dataset (or "
                    "list the files to read)"
                )
            self._check_schema(plan.schema, display)
            return plan

        if len(paths) == 1:
            plans = [plan_one(0)]
        else:
            with ThreadPoolExecutor(min(16, len(paths)), "kdcache-plan") as pool:
                plans = list(pool.map(plan_one, range(len(paths))))
        self._set_input_types(plans)
        shards: list[_Shard] = []
        for i, plan in enumerate(plans):
            starts = np.concatenate([[0], np.cumsum(plan.unit_rows)]).astype(np.int64)
            for lo, hi in _group_units(plan.unit_rows, plan.unit_bytes, self.rows_per_shard):
                ranges = plan.unit_id_ranges[lo:hi]
                id_range = (
                    (min(r[0] for r in ranges), max(r[1] for r in ranges))  # type: ignore[index]
                    if ranges and all(r is not None for r in ranges)
                    else None
                )
                shards.append(
                    _Shard(
                        file=i,
                        lo=lo,
                        hi=hi,
                        row_start=int(starts[lo]),
                        num_records=int(starts[hi] - starts[lo]),
                        id_range=id_range,
                        byte_offset=None if plan.unit_offsets is None else plan.unit_offsets[lo],
                        num_bytes=int(sum(plan.unit_bytes[lo:hi])),
                    )
                )
        self._shards = tuple(shards)
        self._files = tuple(
            (p.size, p.version, int(sum(p.unit_rows)), len(p.unit_rows)) for p in plans
        )

    def _check_schema(self, schema: pa.Schema, display: str) -> None:
        """Every column exists and has a usable type (raises naming the file)."""
        have = schema.names
        for role, name in (
            ("id_column", self.id_column),
            *(("input_columns", c) for c in self.input_columns),
            ("label_column", self.label_column),
        ):
            if name is None:
                continue
            if name not in have:
                raise DataError(
                    f"{display} has no column {name!r} (given as {role}); its columns are: "
                    f"{', '.join(have)}; pass {role} as one of them"
                )
            t = schema.field(name).type
            if role in ("id_column", "label_column") and not pa.types.is_integer(t):
                what = "sample ids" if role == "id_column" else "class ids"
                fix = (
                    "cast the ids to integers when writing the file, or pass id_column=None "
                    "to derive ids from row positions"
                    if role == "id_column"
                    else "map the labels to integer class ids when writing the file"
                )
                raise DataError(
                    f"column {name!r} ({role}) of {display} is {t}; expected integer {what} "
                    f"(int64); {fix}"
                )
            if role == "input_columns" and _input_kind(t) is None:
                raise DataError(
                    f"input column {name!r} of {display} is {t}, which kdcache cannot decode; "
                    f"supported: {_SUPPORTED}"
                )

    def _set_input_types(self, plans: list[_FilePlan]) -> None:
        """The input columns' types (equal across files) and decoded row shape."""
        types = [plans[0].schema.field(c).type for c in self.input_columns]
        for i, plan in enumerate(plans[1:], start=1):
            for c, t in zip(self.input_columns, types, strict=True):
                if plan.schema.field(c).type != t:
                    raise DataError(
                        f"input column {c!r} is {plan.schema.field(c).type} in "
                        f"{self._root.display(self._names[i])} but {t} in "
                        f"{self._root.display(self._names[0])}; every file must store the "
                        "inputs with one type: rewrite the odd file"
                    )
        kinds = [_input_kind(t) for t in types]
        if len(types) > 1 and any(k is None or k[0] != "scalar" for k in kinds):
            raise ConfigError(
                f"several input_columns {list(self.input_columns)} must all be numeric "
                f"scalars (they are stacked into [B, C]); got "
                f"{', '.join(str(t) for t in types)}; read one column and decode it with a "
                "transform instead"
            )
        kind, row = kinds[0]  # type: ignore[misc]
        row_shape = (len(types),) if len(types) > 1 else row
        if self.input_shape is not None:
            if kind == "variable":
                raise ConfigError(
                    f"input_shape={self.input_shape} cannot apply to input column "
                    f"{self.input_columns[0]!r} ({types[0]}): its rows vary in length; "
                    "reshape in a transform instead"
                )
            if int(np.prod(self.input_shape)) != int(np.prod(row_shape, dtype=np.int64)):
                raise ConfigError(
                    f"input_shape={self.input_shape} holds {int(np.prod(self.input_shape))} "
                    f"values per row, but {list(self.input_columns)} ({types[0]}) give "
                    f"{int(np.prod(row_shape, dtype=np.int64))}; pass a shape with that many"
                )
        self._input_types = tuple(str(t) for t in types)
        self._input_kind = kind if len(types) == 1 else "stacked"
        self._row_shape = self.input_shape if self.input_shape is not None else row_shape

    # -- the ShardedDataset interface ----------------------------------------------------
    @property
    def num_shards(self) -> int:
        return len(self._shards)

    @property
    def num_records(self) -> int:
        return sum(f[2] for f in self._files)

    def __len__(self) -> int:
        return self.num_records

    @property
    def files(self) -> list[str]:
        """The files' names relative to the dataset root, in dataset order."""
        return list(self._names)

    @property
    def transform(self) -> tuple[Transform, ...]:
        """The transform chain (empty for none)."""
        return self._chain

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self._root.display()!r}, {len(self._names)} files, "
            f"{self.num_shards} shards, {self.num_records} records)"
        )

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the inputs, from the plan only (memoised).

        Returns:
            ``{"format", "columns": {"id", "inputs", "input_types", "input_shape"},
            "transform": [Transform.fingerprint(), ...] or None, "num_records",
            "files": [{"name", "size", "version", "num_records", "num_<units>"}],
            "shards": [{"num_records", "file", "<units>": [lo, hi], "size", "version"}]}``
            where ``<units>`` is ``row_groups`` (Parquet) or ``record_batches`` (Arrow);
            ``hi`` is exclusive. Shards hold neither the transform nor the columns (the
            student joins on ``shards`` and may read with another transform); labels are
            nowhere (a relabelled dataset reuses the teacher cache).

        Raises:
            ConfigError: a transform cannot be imported.
        """
        fp = self.__dict__.get("_fingerprint")
        if fp is None:
            files = [
                {
                    "name": name,
                    "size": size,
                    "version": version,
                    "num_records": rows,
                    f"num_{self._unit}": units,
                }
                for name, (size, version, rows, units) in zip(self._names, self._files, strict=True)
            ]
            fp = {
                "format": self.format,
                "columns": {
                    "id": self.id_column,
                    "inputs": list(self.input_columns),
                    "input_types": list(self._input_types),
                    "input_shape": None if self.input_shape is None else list(self.input_shape),
                },
                "transform": _chain_fingerprint(self._chain),
                "num_records": self.num_records,
                "files": files,
                "shards": [
                    {
                        "num_records": s.num_records,
                        "file": self._names[s.file],
                        self._unit: [s.lo, s.hi],
                        "size": self._files[s.file][0],
                        "version": self._files[s.file][1],
                    }
                    for s in self._shards
                ],
            }
            self.__dict__["_fingerprint"] = fp
        return fp

    def with_transform(self, transform: TransformLike) -> FileDataset:
        """A copy of this plan with another transform chain (None for none); same shards."""
        new = copy.copy(self)
        new._chain = as_chain(transform)
        new.__dict__.pop("_fingerprint", None)
        return new

    def without_transform(self) -> FileDataset:
        """A copy of this plan with no transform."""
        return self.with_transform(None)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_fingerprint", None)
        return state

    def read_shard(self, index: int) -> dict[str, Any]:
        """The whole shard ``index``: ``{"sample_id": int64 [N], "inputs": [N, ...],
        "labels": int64 [N]}`` (``labels`` when there is a label column).

        Raises:
            IndexError: ``index`` out of range.
            InputChangedError, DataError: as :meth:`open_shard`.
        """
        return read_shard_checked(self, index)[0]

    def open_shard(self, index: int, batch_size: int) -> ShardBatches:
        """The batches of shard ``index``, read lazily when iterated.

        Each batch is ``{"sample_id": int64 [B], "inputs": [B, ...] (read-only when not
        transformed), "labels": int64 [B]}`` with ``B = batch_size`` except the last.
        After the last batch, ``digest`` is the XXH3-128 (``"xxh3_128:<hex>"``) of the
        ids and the inputs' values as stored (before the transform; labels excluded),
        independent of ``batch_size``. Memory: one row group / record batch plus one
        batch.

        Raises (while iterating):
            ConfigError: ``batch_size`` < 1.
            IndexError: ``index`` out of range.
            InputChangedError: the file's size, version, rows or column types differ from
                the plan (re-plan the dataset: rerun the build).
            DataError: a null id or input, a duplicate id in the file (names the file and
                the id), an unreadable file, or a transform that failed.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not 0 <= index < len(self._shards):
            raise IndexError(f"shard {index} out of range 0..{len(self._shards) - 1}")
        shard = self._shards[index]
        holder: list[ShardBatches] = []
        reader = ShardBatches(index, shard.num_records, self._iter_shard(index, batch_size, holder))
        holder.append(reader)
        return reader

    # -- reading (workers) ---------------------------------------------------------------
    def _where(self, index: int) -> str:
        s = self._shards[index]
        return (
            f"shard {index} ({self._root.display(self._names[s.file])}, "
            f"{self._unit.replace('_', ' ')} {s.lo}..{s.hi - 1})"
        )

    def _open_checked(self, fs: pafs.FileSystem, path: str, file: int) -> pa.NativeFile:
        """Open file ``file`` and check it against the plan.

        Raises:
            InputChangedError: its size or version differs from the plan.
        """
        display = self._root.display(self._names[file])
        f = fs.open_input_file(path)
        size, version = _file_state(fs, path, f)
        want_size, want_version = self._files[file][:2]
        if size != want_size or (want_version is not None and version != want_version):
            f.close()
            raise InputChangedError(
                f"{display} changed after the dataset was planned: the plan has size "
                f"{want_size} and version {want_version!r}, the file now has size {size} and "
                f"version {version!r}; re-plan the dataset (rerun the build) so that the "
                "cache key covers the new content"
            )
        return f

    def _read_units(
        self, f: pa.NativeFile, shard: _Shard, columns: list[str], read_rows: int
    ) -> Iterator[pa.RecordBatch]:
        raise NotImplementedError

    def _read_rows(self, shard: _Shard, batch_size: int) -> int:
        """Rows to ask the file for at once: ``batch_size`` when that is one to four times
        the power of two nearest below :data:`_READ_BYTES` worth of rows, else that power
        of two (pyarrow reads power-of-two batches fastest); the reads are then cut or
        joined into batches."""
        row_bytes = max(1, shard.num_bytes // max(1, shard.num_records))
        per = 1 << max(0, (max(1, _READ_BYTES // row_bytes)).bit_length() - 1)
        return batch_size if per <= batch_size <= 4 * per else per

    def _iter_shard(
        self, index: int, batch_size: int, holder: list[ShardBatches]
    ) -> Iterator[dict[str, Any]]:
        shard = self._shards[index]
        where = self._where(index)
        display = self._root.display(self._names[shard.file])
        remote = not self._root.is_local
        fs, root = _fs_of(self._root)
        path = f"{root.rstrip('/')}/{self._names[shard.file]}"
        columns = list(dict.fromkeys(self._columns_read()))
        digest = _ShardDigest(
            {
                "version": _DIGEST_VERSION,
                "ids": "int64",
                "inputs": dict(zip(self.input_columns, self._input_types, strict=True)),
            }
        )
        ids_seen: list[np.ndarray] = []
        num_read = 0
        with _translate(display, f"reading {where}", remote=remote, kind=self._kind):
            f = self._open_checked(fs, path, shard.file)
        try:
            raw = self._read_units(f, shard, columns, self._read_rows(shard, batch_size))
            raw = self._digested(
                _translated(raw, display, where, remote, self._kind), shard, digest, where
            )
            for batch in _rebatch(raw, batch_size):
                out = self._decode(batch, shard, num_read, where)
                num_read += batch.num_rows
                if self.id_column is not None:
                    ids_seen.append(out["sample_id"])
                if self._chain:
                    out["inputs"] = apply_chain(self._chain, out["inputs"], where=where)
                yield out
        finally:
            f.close()
        if num_read != shard.num_records:
            raise InputChangedError(
                f"{where} has {num_read} rows, the plan {shard.num_records}: the file changed "
                "after the dataset was planned; re-plan the dataset (rerun the build)"
            )
        if self.id_column is not None:
            self._check_ids(
                index, np.concatenate(ids_seen) if ids_seen else np.zeros(0, np.int64), fs, path
            )
        holder[0].digest = digest.hexdigest(num_read)

    def _digested(
        self, batches: Iterator[pa.RecordBatch], shard: _Shard, digest: _ShardDigest, where: str
    ) -> Iterator[pa.RecordBatch]:
        """``batches`` as read, checked (types as planned, no null ids or inputs) and fed
        to ``digest`` (ids as int64, then each input column's streams) on the way."""
        row = 0
        for batch in batches:
            n = batch.num_rows
            for c, t in zip(self.input_columns, self._input_types, strict=True):
                if str(batch.column(c).type) != t:
                    raise InputChangedError(
                        f"input column {c!r} is {batch.column(c).type} in {where}, the plan "
                        f"has {t}: the file changed after planning; re-plan the dataset"
                    )
            if self.id_column is None:
                start = shard.file * ID_FILE_STRIDE + shard.row_start + row
                digest.update("sample_id", np.arange(start, start + n, dtype=np.int64))
            else:
                col = batch.column(self.id_column)
                if col.null_count:
                    raise DataError(
                        f"id column {self.id_column!r} has {col.null_count} null ids in "
                        f"{where}; every row needs an id: fill them, or pass id_column=None "
                        "to derive ids"
                    )
                digest.update("sample_id", self._ids(col, where))
            for c in self.input_columns:
                pieces: list[tuple[str, Any]] = []
                try:
                    _streams(batch.column(c), "", pieces)
                except _NullError as exc:
                    level = str(exc) or "the top level"
                    raise DataError(
                        f"input column {c!r} has null values in {where} (at {level}); "
                        "inputs must have no nulls: fill or drop those rows"
                    ) from None
                for name, data in pieces:
                    digest.update(f"{c}/{name}", data)
            row += n
            yield batch

    def _ids(self, col: pa.Array, where: str) -> np.ndarray:
        try:
            return col.cast(pa.int64()).to_numpy()
        except pa.ArrowInvalid as exc:
            raise DataError(
                f"id column {self.id_column!r} in {where} holds ids that do not fit int64 "
                f"({exc}); store ids below 2**63"
            ) from None

    def _decode(self, batch: pa.RecordBatch, shard: _Shard, row: int, where: str) -> dict[str, Any]:
        """One Arrow batch (checked by :meth:`_digested`) -> ``{"sample_id", "inputs",
        "labels"}``; ``row`` is the batch's first row within the shard."""
        n = batch.num_rows
        if self.id_column is None:
            start = shard.file * ID_FILE_STRIDE + shard.row_start + row
            ids = np.arange(start, start + n, dtype=np.int64)
        else:
            ids = self._ids(batch.column(self.id_column), where)
        arrays = [batch.column(c) for c in self.input_columns]
        if self._input_kind == "stacked":
            inputs = np.stack([a.to_numpy(zero_copy_only=False) for a in arrays], axis=1)
        elif self._input_kind == "fixed":
            inputs = _fixed_values(arrays[0])
        else:
            inputs = arrays[0].to_numpy(zero_copy_only=False)
        if self._input_kind != "variable":
            inputs = inputs.reshape(n, *self._row_shape)
        for view in (ids, inputs):
            if view.base is not None:  # shares memory with what the digest threads hash
                view.flags.writeable = False
        out: dict[str, Any] = {"sample_id": ids, "inputs": inputs}
        if self.label_column is not None:
            labels = batch.column(self.label_column)
            if labels.null_count:
                labels = labels.fill_null(-100)
            try:
                out["labels"] = labels.cast(pa.int64()).to_numpy()
            except pa.ArrowInvalid as exc:
                raise DataError(
                    f"label column {self.label_column!r} in {where} holds values that do not "
                    f"fit int64 ({exc})"
                ) from None
            if self.label_transform is not None:
                out["labels"] = self._transform_labels(out["labels"], ids, where)
        return out

    def _transform_labels(self, labels_B: np.ndarray, ids_B: np.ndarray, where: str) -> Any:
        """Apply :attr:`label_transform` to one batch's labels (int64 [B] in and out).

        Raises:
            DataError: the transform raised, or did not return B integer labels.
        """
        t = self.label_transform
        assert t is not None
        fn = t.resolve()
        try:
            out = np.asarray(fn(labels_B, ids_B, **t.kwargs))
        except Exception as exc:
            raise DataError(
                f"label transform {t.fn!r} (kwargs {t.kwargs!r}) failed on {where}: "
                f"{type(exc).__name__}: {exc}; it is called as fn(labels_B, sample_ids_B, "
                "**kwargs)"
            ) from exc
        if out.shape != labels_B.shape or not np.issubdtype(out.dtype, np.integer):
            raise DataError(
                f"label transform {t.fn!r} returned {out.dtype} {out.shape} on {where}; "
                f"expected int labels of shape {labels_B.shape}"
            )
        return out.astype(np.int64, copy=False)

    def _check_ids(self, index: int, ids: np.ndarray, fs: pafs.FileSystem, path: str) -> None:
        """Ids of shard ``index`` repeat neither within it nor in its file's other shards.

        The other shards' ids are read (the id column alone) only where their id ranges
        may overlap this shard's: Parquet row-group statistics usually rule that out for
        sorted ids; Arrow files have none, so there every other shard of the file is read.

        Raises:
            DataError: an id repeats; names the file, the id and the shards.
        """
        shard = self._shards[index]
        display = self._root.display(self._names[shard.file])
        if not len(ids):
            return
        # Sorted ids (the common case) are checked in one pass, without a sort.
        ordered = ids if bool(np.all(ids[1:] > ids[:-1])) else np.sort(ids)
        dup = ordered[1:][ordered[1:] == ordered[:-1]]
        if len(dup):
            raise DataError(
                f"sample id {int(dup[0])} appears more than once in {display} (in "
                f"{self._where(index)}); ids must be unique within each file: deduplicate the "
                "file, or pass id_column=None to derive ids from row positions"
            )
        lo, hi = int(ordered[0]), int(ordered[-1])
        for j, other in enumerate(self._shards):
            if j == index or other.file != shard.file:
                continue
            if other.id_range is not None and (other.id_range[1] < lo or other.id_range[0] > hi):
                continue
            with _translate(
                display,
                f"checking ids against {self._where(j)}",
                remote=not self._root.is_local,
                kind=self._kind,
            ):
                f = self._open_checked(fs, path, other.file)
                try:
                    theirs = [
                        b.column(0).cast(pa.int64()).to_numpy(zero_copy_only=False)
                        for b in self._read_units(f, other, [self.id_column], _READ_ROWS)  # type: ignore[list-item]
                    ]
                finally:
                    f.close()
            both = np.intersect1d(ordered, np.concatenate(theirs), assume_unique=False)
            if len(both):
                raise DataError(
                    f"sample id {int(both[0])} appears more than once in {display} (in "
                    f"{self._where(index)} and {self._where(j)}); ids must be unique within "
                    "each file: deduplicate the file, or pass id_column=None to derive ids"
                )


def _translated(
    batches: Iterator[pa.RecordBatch], display: str, where: str, remote: bool, kind: str
) -> Iterator[pa.RecordBatch]:
    """``batches`` with pyarrow's read errors turned into kdcache's (see :func:`_translate`)."""
    while True:
        with _translate(display, f"reading {where}", remote=remote, kind=kind):
            batch = next(batches, None)
        if batch is None:
            return
        yield batch


def _rebatch(batches: Iterator[pa.RecordBatch], size: int) -> Iterator[pa.RecordBatch]:
    """Cut or join ``batches`` into batches of exactly ``size`` rows (the last may be
    shorter); a batch that already fits passes through uncopied."""
    pending: list[pa.RecordBatch] = []
    filled = 0
    for batch in batches:
        offset = 0
        while offset < batch.num_rows:
            take = min(size - filled, batch.num_rows - offset)
            piece = batch if take == batch.num_rows else batch.slice(offset, take)
            pending.append(piece)
            filled += take
            offset += take
            if filled == size:
                yield _concat(pending)
                pending, filled = [], 0
    if pending:
        yield _concat(pending)


def _concat(parts: list[pa.RecordBatch]) -> pa.RecordBatch:
    if len(parts) == 1:
        return parts[0]
    return pa.Table.from_batches(parts).combine_chunks().to_batches()[0]


class ParquetDataset(FileDataset):
    """Parquet files as a :class:`~kdcache.data.base.StreamingDataset`.

    A shard is a run of consecutive row groups of one file; the plan reads only the
    footers (in a thread pool for many files); a shard is streamed with
    ``ParquetFile.iter_batches`` over its row groups and the columns used. Ids are checked
    unique within each file (row-group statistics of the id column spare reading other
    shards' ids when ranges do not overlap). See :class:`FileDataset` for the arguments.

    Example:
        >>> import numpy as np, pyarrow as pa, pyarrow.parquet as pq, tempfile, os
        >>> d = tempfile.mkdtemp()
        >>> pq.write_table(pa.table({"id": np.arange(4), "x": np.arange(4.0)}),
        ...                os.path.join(d, "a.parquet"))
        >>> ds = ParquetDataset(d, id_column="id", input_columns="x")
        >>> ds.read_shard(0)["inputs"].tolist()
        [0.0, 1.0, 2.0, 3.0]
    """

    format = "parquet"
    _unit = "row_groups"
    _suffixes = (".parquet", ".pq")
    _kind = "Parquet"

    def _plan_file(self, fs: pafs.FileSystem, path: str, display: str) -> _FilePlan:
        with fs.open_input_file(path) as f:
            size, version = _file_state(fs, path, f)
            pf = pq.ParquetFile(f)
            md = pf.metadata
            schema = pf.schema_arrow
            used = set(self._columns_read()) - {self.label_column}
            rows, nbytes, id_ranges = [], [], []
            for g in range(md.num_row_groups):
                rg = md.row_group(g)
                rows.append(int(rg.num_rows))
                total, id_range = 0, None
                for k in range(rg.num_columns):
                    col = rg.column(k)
                    top = col.path_in_schema.split(".")[0]
                    if top in used:
                        total += int(col.total_uncompressed_size)
                    if top == self.id_column and col.path_in_schema == top:
                        st = col.statistics
                        if st is not None and st.has_min_max and isinstance(st.min, int):
                            id_range = (int(st.min), int(st.max))
                nbytes.append(total)
                id_ranges.append(id_range)
        return _FilePlan(size, version, schema, rows, nbytes, id_ranges)

    def _read_units(
        self, f: pa.NativeFile, shard: _Shard, columns: list[str], read_rows: int
    ) -> Iterator[pa.RecordBatch]:
        pf = pq.ParquetFile(f)
        yield from pf.iter_batches(
            batch_size=read_rows, row_groups=list(range(shard.lo, shard.hi)), columns=columns
        )


class ArrowDataset(FileDataset):
    """Arrow IPC *file* format (``.arrow``, ``.feather`` v2, ``.ipc``) as a
    :class:`~kdcache.data.base.StreamingDataset`; local files are memory-mapped.

    A shard is a run of consecutive record batches of one file; the plan reads the footer
    and the batches' message headers only. Arrow files have no statistics, so the
    duplicate-id check of a shard reads the id column of its file's other shards. See
    :class:`FileDataset` for the arguments. Arrow IPC *stream* files (what Hugging Face
    ``save_to_disk`` writes) are read by :class:`HFDiskDataset`.
    """

    format = "arrow"
    _unit = "record_batches"
    _suffixes = (".arrow", ".feather", ".ipc")
    _kind = "Arrow IPC"

    def _plan_file(self, fs: pafs.FileSystem, path: str, display: str) -> _FilePlan:
        with fs.open_input_file(path) as f:
            size, version = _file_state(fs, path, f)
            head = f.read_at(min(8, size), 0)
            if head[:6] != b"ARROW1":
                hint = (
                    "it is an Arrow IPC stream (Hugging Face save_to_disk writes those: read "
                    "the directory with HFDiskDataset)"
                    if head[:4] == b"\xff\xff\xff\xff"
                    else "rewrite it with pyarrow.ipc.new_file (or pyarrow.feather, v2)"
                )
                raise DataError(f"{display} is not an Arrow IPC file (no ARROW1 magic); {hint}")
            schema = ipc.open_file(f).schema
            blocks = _ipc_file_blocks(f)
        return _FilePlan(
            size,
            version,
            schema,
            [b[1] for b in blocks],
            [b[2] for b in blocks],
            [None] * len(blocks),
        )

    def _read_units(
        self, f: pa.NativeFile, shard: _Shard, columns: list[str], read_rows: int
    ) -> Iterator[pa.RecordBatch]:
        names = ipc.open_file(f).schema.names
        options = ipc.IpcReadOptions(included_fields=[names.index(c) for c in columns])
        reader = ipc.open_file(f, options=options)
        for k in range(shard.lo, shard.hi):
            yield reader.get_batch(k)


class HFDiskDataset(FileDataset):
    """A Hugging Face ``datasets.Dataset`` written by ``save_to_disk``, read with pyarrow
    (the ``datasets`` package is not needed), memory-mapped for local directories.

    ``path`` is the directory holding ``state.json``, ``dataset_info.json`` and the
    ``data-*.arrow`` files (Arrow IPC stream format), read in the order ``state.json``
    lists them. A ``DatasetDict`` directory is refused with its splits named. A shard is
    a run of record batches of one file; the plan walks the message headers only
    (bodies are skipped). On object stores a shard read fetches whole record batches
    (all columns). Hugging Face datasets rarely have an id column; ``id_column=None``
    derives ids from positions. See :class:`FileDataset` for the other arguments.
    """

    format = "hf"
    _unit = "record_batches"
    _suffixes = (".arrow",)
    _kind = "Arrow IPC stream"

    def _find(self, path: Any) -> tuple[Location, list[str]]:
        if not isinstance(path, str | os.PathLike):
            raise ConfigError(
                f"HFDiskDataset takes one save_to_disk directory, got {type(path).__name__}"
            )
        root = Location(os.fspath(path))
        with _translate(root.display(), "listing", remote=not root.is_local, kind="input"):
            if not root.exists():
                raise DataFileNotFoundError(
                    f"{root.display()} does not exist; pass the directory save_to_disk wrote"
                )
            if root.exists("dataset_dict.json"):
                splits = json.loads(root.read_bytes("dataset_dict.json")).get("splits", [])
                raise DataError(
                    f"{root.display()} is a Hugging Face DatasetDict with splits "
                    f"{', '.join(map(str, splits)) or '(none listed)'}; pass one split's "
                    f"directory, e.g. {root.display(str(splits[0]) if splits else 'train')}"
                )
            if not root.exists("state.json"):
                raise DataError(
                    f"{root.display()} is not a Hugging Face save_to_disk directory (no "
                    f"state.json; it holds: {', '.join(root.listdir()[:20]) or 'nothing'}); "
                    "pass the directory Dataset.save_to_disk wrote, or use open_dataset"
                )
            state = json.loads(root.read_bytes("state.json"))
        try:
            names = [str(d["filename"]) for d in state["_data_files"]]
        except (KeyError, TypeError) as exc:
            raise DataError(
                f"{root.display('state.json')} lists no _data_files ({exc!r}); it was not "
                "written by Dataset.save_to_disk"
            ) from None
        if not names:
            raise DataError(f"{root.display()} holds no data files: the dataset is empty")
        return root, names

    def _plan_file(self, fs: pafs.FileSystem, path: str, display: str) -> _FilePlan:
        with fs.open_input_file(path) as f:
            size, version = _file_state(fs, path, f)
            schema = ipc.open_stream(f).schema
            if any(pa.types.is_dictionary(field.type) for field in schema):
                raise DataError(
                    f"{display} holds dictionary-encoded columns, which kdcache does not read "
                    "from Arrow streams; cast them to their value type before save_to_disk"
                )
            blocks = _ipc_stream_blocks(f, display)
        return _FilePlan(
            size,
            version,
            schema,
            [b[1] for b in blocks],
            [b[2] for b in blocks],
            [None] * len(blocks),
            [b[0] for b in blocks],
        )

    def _read_units(
        self, f: pa.NativeFile, shard: _Shard, columns: list[str], read_rows: int
    ) -> Iterator[pa.RecordBatch]:
        schema = ipc.open_stream(f).schema
        indices = [schema.names.index(c) for c in columns]
        assert shard.byte_offset is not None
        f.seek(shard.byte_offset)
        for _ in range(shard.hi - shard.lo):
            batch = ipc.read_record_batch(ipc.read_message(f), schema)
            yield batch.select(indices)


#: The dataset class of each ``format`` of :func:`open_dataset`.
DATASET_TYPES: dict[str, type[FileDataset]] = {
    "parquet": ParquetDataset,
    "arrow": ArrowDataset,
    "hf": HFDiskDataset,
}


def _detect_format(path: Any) -> str:
    first = path if isinstance(path, str | os.PathLike) else next(iter(path), None)
    if first is None:
        raise ConfigError("path is an empty list; pass a file, a directory or a list of files")
    loc = Location(os.fspath(first))
    base = loc.base.lower()
    for fmt, cls in (("parquet", ParquetDataset), ("arrow", ArrowDataset)):
        if base.endswith(cls._suffixes):
            return fmt
    with _translate(loc.display(), "detecting the format", remote=not loc.is_local, kind="input"):
        if not loc.exists():
            raise DataFileNotFoundError(f"{loc.display()} does not exist")
        if not loc.is_dir():
            raise ConfigError(
                f"cannot tell the format of {loc.display()} from its name; expected "
                "*.parquet, *.arrow / *.feather, or a directory; pass format='parquet', "
                "'arrow' or 'hf'"
            )
        if loc.exists("state.json") or loc.exists("dataset_dict.json"):
            return "hf"
        fs, root = _fs_of(loc)
        sel = pafs.FileSelector(root, recursive=True)
        names = [i.path for i in fs.get_file_info(sel) if i.type == pafs.FileType.File]
    for fmt, cls in (("parquet", ParquetDataset), ("arrow", ArrowDataset)):
        if any(n.lower().endswith(cls._suffixes) for n in names):
            return fmt
    raise DataError(
        f"{loc.display()} holds no *.parquet, *.arrow or *.feather files and no "
        "state.json: nothing to read; check the path"
    )


def open_dataset(
    path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    format: str = "auto",
    **kwargs: Any,
) -> FileDataset:
    """The file-backed dataset for ``path``.

    Args:
        path: As :class:`FileDataset` (a directory, a file or a list of files).
        format: ``"auto"`` (by extension: ``.parquet``/``.pq``, ``.arrow``/``.feather``/
            ``.ipc``; a directory with ``state.json`` or ``dataset_dict.json`` is ``"hf"``,
            else by the files under it, Parquet first), ``"parquet"``, ``"arrow"`` or
            ``"hf"``.
        **kwargs: The dataset's keyword arguments (``id_column``, ``input_columns``, ...).

    Returns:
        A :class:`ParquetDataset`, :class:`ArrowDataset` or :class:`HFDiskDataset`.

    Raises:
        ConfigError: an unknown ``format``, or one that cannot be told from the path.
        DataError, DataFileNotFoundError: as the dataset's constructor.
    """
    if format not in _FORMATS:
        raise ConfigError(f"format must be one of {_FORMATS}, got {format!r}")
    fmt = _detect_format(path) if format == "auto" else format
    return DATASET_TYPES[fmt](path, **kwargs)
