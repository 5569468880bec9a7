"""The in-process executor: every shard task runs in this process, one after the other.

For debugging, tests and small jobs without Ray; it writes the same bytes as the Ray
executor (the task is the same).
"""

from __future__ import annotations

import logging
from typing import Any

from kdcache.build.report import BuildReport
from kdcache.executors.base import (
    Executor,
    LoadedTeachers,
    ShardTask,
    TaskContext,
    account,
    progress_bar,
)
from kdcache.executors.config import ExecutorConfig

log = logging.getLogger(__name__)


class LocalExecutor(Executor):
    """Runs the tasks in this process (``ExecutorConfig.kind == "local"``).

    The config's Ray settings (address, actors, CPUs, GPUs, retries) and the teachers'
    :class:`~kdcache.teachers.TeacherResources` do not apply: every pool's teachers run
    here, and each shard is read once for all of a task's teachers. Teacher specs are
    loaded here on first use and kept for the next builds through this executor while
    they are still used (:class:`~kdcache.executors.base.LoadedTeachers`); :meth:`close`
    lets go of them. Workers are reported as ``"local"``.

    Example:
        >>> from kdcache.executors import ExecutorConfig, LocalExecutor
        >>> LocalExecutor(ExecutorConfig(kind="local", batch_size=64)).config.batch_size
        64
    """

    name = "local"

    def __init__(self, config: ExecutorConfig | None = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self.loaded = LoadedTeachers()

    def _run(
        self, context: TaskContext, tasks: list[ShardTask], report: BuildReport, *, progress: bool
    ) -> None:
        self.loaded.retain(context.spec_keys())
        placed = [
            t.name
            for t in context.teachers
            if (r := getattr(t, "resources", None)) is not None and not r.is_default
        ]
        if placed:
            log.info(
                "the local executor runs every teacher in this process: the resources of "
                "%s apply on Ray only",
                ", ".join(repr(n) for n in placed),
            )
        bar = progress_bar(len(tasks), progress)
        try:
            for task in tasks:
                account(report, "local", context.compute(task, self.loaded), bar)
        finally:
            bar.close()

    def close(self) -> None:
        """Let go of the teachers loaded from specs."""
        self.loaded.clear()
