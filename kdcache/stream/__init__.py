"""The student-side stream: one dataset class for every layout (dense, sparse, ensemble views,
features, token sequences); only collation differs (:mod:`kdcache.stream.collate`)."""

from __future__ import annotations

from kdcache.stream.dataset import ShardedStream, SoftTargetDataset
from kdcache.stream.join import (
    TokenShard,
    check_same_dataset,
    check_student_vocabulary,
    input_order,
    read_token_shard,
)
from kdcache.stream.order import EpochOrder

__all__ = [
    "EpochOrder",
    "ShardedStream",
    "SoftTargetDataset",
    "TokenShard",
    "check_same_dataset",
    "check_student_vocabulary",
    "input_order",
    "read_token_shard",
]
