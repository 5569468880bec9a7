"""Storage backends: how one shard's rows become bytes and back.

A backend is stateless and picklable; the commit protocol (temporary name, rename,
sidecar, manifest) lives in :mod:`kdcache.cache` and is the same for every backend.

Shape legend: N rows (samples) in a shard, V classes or vocabulary.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pyarrow as pa

from kdcache.errors import CacheCorruptError, ConfigError, TeacherOutputError
from kdcache.schema import COL_SAMPLE_ID, COL_SCALED_LOGITS

_FLOAT16_MAX = float(np.finfo(np.float16).max)


class ShardBackend(Protocol):
    """One extension point: encode/decode a shard of dense rows."""

    name: str
    suffix: str

    def encode(
        self, sample_ids_N: np.ndarray, values_NV: np.ndarray, storage_dtype: str
    ) -> bytes: ...

    def decode(self, data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]: ...


def to_storage_dtype(values_NV: np.ndarray, storage_dtype: str, where: str) -> np.ndarray:
    """Cast float32 values to the storage dtype, refusing values the dtype cannot hold.

    Raises:
        TeacherOutputError: a value is outside the storage dtype's finite range (it would
            become inf); the message says to store float32 or raise the temperature.
    """
    if storage_dtype == "float32":
        return np.ascontiguousarray(values_NV, dtype=np.float32)
    if storage_dtype == "float16":
        peak = float(np.abs(values_NV).max()) if values_NV.size else 0.0
        if peak > _FLOAT16_MAX:
            raise TeacherOutputError(
                f"{where}: a scaled logit of magnitude {peak:.4g} exceeds float16's range "
                f"({_FLOAT16_MAX:.0f}); use storage_dtype='float32' or a higher temperature"
            )
        return np.ascontiguousarray(values_NV, dtype=np.float16)
    raise ConfigError(f"unknown storage dtype {storage_dtype!r}")


class ArrowIPCBackend:
    """Arrow IPC file (uncompressed) with columns ``sample_id`` (int64) and
    ``scaled_logits`` (FixedSizeList<float32|float16>[V]).

    FixedSizeList decodes to a contiguous [N, V] buffer without copies, which is why it
    is used instead of a variable list column. Writes are byte-for-byte deterministic,
    so a retried task produces an identical file.
    """

    name = "arrow"
    suffix = ".arrow"

    def encode(self, sample_ids_N: np.ndarray, values_NV: np.ndarray, storage_dtype: str) -> bytes:
        if values_NV.ndim != 2 or sample_ids_N.shape != (values_NV.shape[0],):
            raise TeacherOutputError(
                f"expected sample_ids [N] and values [N, V], got {sample_ids_N.shape} "
                f"and {values_NV.shape}"
            )
        vocab = values_NV.shape[1]
        flat = pa.array(values_NV.reshape(-1))
        table = pa.table(
            {
                COL_SAMPLE_ID: pa.array(np.ascontiguousarray(sample_ids_N, dtype=np.int64)),
                COL_SCALED_LOGITS: pa.FixedSizeListArray.from_arrays(flat, vocab),
            }
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        return sink.getvalue().to_pybytes()

    def decode(self, data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
        try:
            table = pa.ipc.open_file(pa.BufferReader(data)).read_all()
            col = table.column(COL_SCALED_LOGITS).combine_chunks()
            ids = table.column(COL_SAMPLE_ID).to_numpy()
        except (pa.ArrowInvalid, KeyError) as exc:
            raise CacheCorruptError(f"{where}: not a readable kdcache Arrow shard ({exc})") from exc
        vocab = col.type.list_size
        values = col.flatten().to_numpy(zero_copy_only=False).reshape(len(ids), vocab)
        return ids, values


BACKENDS: dict[str, ShardBackend] = {"arrow": ArrowIPCBackend()}


def get_backend(name: str) -> ShardBackend:
    try:
        return BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; expected one of {sorted(BACKENDS)}") from None
