"""The student-side stream: batches of inputs joined to cached soft targets by sample_id."""

from __future__ import annotations

from kdcache.stream.dataset import ShardedStream, SoftTargetDataset
from kdcache.stream.tokens import (
    TokenShard,
    TokenSoftTargetDataset,
    check_student_vocabulary,
    read_token_shard,
)

__all__ = [
    "ShardedStream",
    "SoftTargetDataset",
    "TokenShard",
    "TokenSoftTargetDataset",
    "check_student_vocabulary",
    "read_token_shard",
]
