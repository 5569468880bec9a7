"""The in-process executor: every shard task runs in this process, one after the other.

For debugging, tests and small jobs without Ray; it writes the same bytes as the Ray
executor (the task is the same).
"""

from __future__ import annotations

from kdcache.build.report import BuildReport
from kdcache.executors.base import Executor, ShardTask, TaskContext, account, progress_bar


class LocalExecutor(Executor):
    """Runs the tasks in this process (``ExecutorConfig.kind == "local"``).

    The config's Ray settings (address, actors, CPUs, GPUs, retries) do not apply.

    Example:
        >>> from kdcache.executors import ExecutorConfig, LocalExecutor
        >>> LocalExecutor(ExecutorConfig(kind="local", batch_size=64)).config.batch_size
        64
    """

    name = "local"

    def _run(
        self, context: TaskContext, tasks: list[ShardTask], report: BuildReport, *, progress: bool
    ) -> None:
        bar = progress_bar(len(tasks), progress)
        try:
            for task in tasks:
                account(report, "local", context.compute(task), bar)
        finally:
            bar.close()
