"""Input datasets (sharded, with stable sample ids and per-shard fingerprints)."""

from __future__ import annotations

from kdcache.data.base import ArrayDataset, ShardedDataset
from kdcache.data.tokens import (
    TokenDataset,
    encode_texts,
    pad_batch,
    target_positions,
    tokenizer_files_sha256,
)

__all__ = [
    "ArrayDataset",
    "ShardedDataset",
    "TokenDataset",
    "encode_texts",
    "pad_batch",
    "target_positions",
    "tokenizer_files_sha256",
]
