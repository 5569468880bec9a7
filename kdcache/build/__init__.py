"""The teacher stage: the plan and the per-shard task; executors run the tasks."""

from __future__ import annotations

from kdcache.build.stage import BuildReport, build_cache
from kdcache.build.task import check_teacher_vocabularies, compute_shard

__all__ = ["BuildReport", "build_cache", "check_teacher_vocabularies", "compute_shard"]
