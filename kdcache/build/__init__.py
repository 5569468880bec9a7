"""The teacher stage: the per-shard task (:mod:`~kdcache.build.task`), its report, and
:func:`build_cache` (:mod:`~kdcache.build.stage`), which plans the entries and hands the
tasks to an executor (:mod:`kdcache.executors`).

``build_cache`` and ``BuildReport`` are loaded on first use, so that the executors, which
sit between the task and the stage, can import :mod:`kdcache.build.task` without loading
the stage above them.
"""

from __future__ import annotations

from typing import Any

__all__ = ["BuildReport", "build_cache"]


def __getattr__(name: str) -> Any:
    if name == "build_cache":
        from kdcache.build.stage import build_cache

        return build_cache
    if name == "BuildReport":
        from kdcache.build.report import BuildReport

        return BuildReport
    raise AttributeError(f"module 'kdcache.build' has no attribute {name!r}")
