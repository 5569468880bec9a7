"""The cache on disk: filesystems, the one codec between targets and columns, backends behind
one interface, entries and their commit protocol, leases, ensemble views, aliases, admin."""

from __future__ import annotations

from kdcache.stores.backends import (
    BACKENDS,
    ZARR_CHUNK_BYTES,
    ArrowIPCBackend,
    ParquetBackend,
    ShardBackend,
    ShardColumns,
    ZarrBackend,
    get_backend,
    register_backend,
)
from kdcache.stores.catalog import list_root, open_cache, resolve_entries, write_alias
from kdcache.stores.codec import (
    bfloat16_bits_to_float32,
    columns_to_dense,
    columns_to_sparse,
    dense_to_columns,
    float32_to_bfloat16_bits,
    sparse_to_columns,
    to_storage_dtype,
)
from kdcache.stores.entry import CacheEntry
from kdcache.stores.fs import STAGING_PREFIX, Location, sha256_hex, split_query
from kdcache.stores.lease import Lease
from kdcache.stores.view import EnsembleView, as_view, check_reader

__all__ = [
    "BACKENDS",
    "STAGING_PREFIX",
    "ZARR_CHUNK_BYTES",
    "ArrowIPCBackend",
    "CacheEntry",
    "EnsembleView",
    "Lease",
    "Location",
    "ParquetBackend",
    "ShardBackend",
    "ShardColumns",
    "ZarrBackend",
    "as_view",
    "bfloat16_bits_to_float32",
    "check_reader",
    "columns_to_dense",
    "columns_to_sparse",
    "dense_to_columns",
    "float32_to_bfloat16_bits",
    "get_backend",
    "list_root",
    "open_cache",
    "register_backend",
    "resolve_entries",
    "sha256_hex",
    "sparse_to_columns",
    "split_query",
    "to_storage_dtype",
    "write_alias",
]
