"""Input datasets (sharded, with stable sample ids and per-shard fingerprints): in memory
(:class:`ArrayDataset`, :class:`TokenDataset`) and file-backed plans read shard by shard
(:class:`ParquetDataset`, :class:`ArrowDataset`, :class:`HFDiskDataset`, :func:`open_dataset`;
:class:`TextDataset`, token sequences tokenised from text files where each shard is read),
with batch :class:`Transform` s named by import path; K augmented views per record
(:class:`AugmentedViews`, an :class:`Augmentation` named by import path) for soft targets
per view."""

from __future__ import annotations

from kdcache.data.base import (
    ArrayDataset,
    ShardBatches,
    ShardedDataset,
    StreamingDataset,
    open_shard,
    prefetch,
    read_shard_checked,
)
from kdcache.data.files import (
    DEFAULT_SHARD_BYTES,
    ArrowDataset,
    FileDataset,
    HFDiskDataset,
    ParquetDataset,
    open_dataset,
)
from kdcache.data.text import TextDataset
from kdcache.data.tokens import (
    TokenDataset,
    encode_texts,
    pad_batch,
    target_positions,
    tokenizer_files_sha256,
)
from kdcache.data.transforms import Transform
from kdcache.data.views import Augmentation, AugmentedViews, ViewRandom, epoch_views
from kdcache.errors import InputChangedError

__all__ = [
    "DEFAULT_SHARD_BYTES",
    "ArrayDataset",
    "ArrowDataset",
    "Augmentation",
    "AugmentedViews",
    "FileDataset",
    "HFDiskDataset",
    "InputChangedError",
    "ParquetDataset",
    "ShardBatches",
    "ShardedDataset",
    "StreamingDataset",
    "TextDataset",
    "TokenDataset",
    "Transform",
    "ViewRandom",
    "encode_texts",
    "epoch_views",
    "open_dataset",
    "open_shard",
    "pad_batch",
    "prefetch",
    "read_shard_checked",
    "target_positions",
    "tokenizer_files_sha256",
]
