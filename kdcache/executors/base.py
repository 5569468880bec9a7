"""The executor interface of the teacher stage: the base skips what is done, subclasses run
the rest.

As in huggingface/datatrove's ``executor/base.py``, the base class owns "skip what is
done": :meth:`Executor.run` takes the candidate (shard, teachers) tasks, drops every
(teacher, shard) pair whose output shard already has a commit record, counts those as
reused, and hands only the rest to the concrete executor's :meth:`Executor._run`, which
just runs tasks (in this process, on Ray actors, ...).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, NamedTuple

from kdcache.build.report import BuildReport
from kdcache.build.task import compute_shard
from kdcache.data.base import ShardedDataset
from kdcache.errors import ConfigError
from kdcache.executors.config import ExecutorConfig
from kdcache.progress import Progress
from kdcache.stores.entry import CacheEntry
from kdcache.teachers.teacher import Teacher

log = logging.getLogger(__name__)


class ShardTask(NamedTuple):
    """One unit of work: run some teachers over one input shard.

    Attributes:
        shard_index: Index of the input shard (and of the output shard of each entry).
        teachers: Indices into :attr:`TaskContext.teachers` / :attr:`TaskContext.entries`
            of the teachers to run on this shard.
    """

    shard_index: int
    teachers: tuple[int, ...]


@dataclass(frozen=True)
class TaskContext:
    """What every worker needs to run any task of one build (shipped once per worker).

    Attributes:
        dataset: The sharded input dataset (picklable; a worker reads only its shards).
        teachers: The teachers, one per entry, in ensemble order.
        entries: The cache entry each teacher writes to, aligned with ``teachers``.
        batch_size: Rows per teacher forward pass (does not change keys or bytes).
    """

    dataset: ShardedDataset
    teachers: Sequence[Teacher]
    entries: Sequence[CacheEntry]
    batch_size: int

    def __post_init__(self) -> None:
        if len(self.teachers) != len(self.entries):
            raise ConfigError(
                f"a task context needs one entry per teacher, got {len(self.teachers)} "
                f"teacher(s) and {len(self.entries)} entries"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def compute(self, task: ShardTask) -> dict[str, float]:
        """Run one task (see :func:`kdcache.build.task.compute_shard`).

        Returns:
            ``{"samples": rows x teachers, "seconds": wall time, ...}``.

        Raises:
            TeacherOutputError: NaN/inf or a wrong shape (fatal).
        """
        return compute_shard(
            self.dataset,
            [self.teachers[k] for k in task.teachers],
            [self.entries[k] for k in task.teachers],
            task.shard_index,
            self.batch_size,
        )


class Executor(abc.ABC):
    """Runs the teacher stage's shard tasks; skipping committed work is done here, once.

    Subclasses set :attr:`name` (the ``ExecutorConfig.kind`` they run) and implement
    :meth:`_run`; they may hold resources between :meth:`run` calls (a Ray executor keeps
    its actors) and release them in :meth:`close`. Executors are context managers.

    Args:
        config: The execution settings; None builds one from ``settings`` (e.g.
            ``RayExecutor(num_actors=2)``), with ``kind`` set to this executor's name.
        **settings: Fields of :class:`ExecutorConfig`, when ``config`` is None.

    Raises:
        ConfigError: ``config.kind`` is not this executor's name, or both ``config`` and
            ``settings`` are given.
    """

    #: The ``ExecutorConfig.kind`` this executor runs.
    name: ClassVar[str]

    def __init__(self, config: ExecutorConfig | None = None, **settings: Any) -> None:
        if config is None:
            config = ExecutorConfig(**{"kind": self.name, **settings})
        elif settings:
            raise ConfigError(
                f"{type(self).__name__}: pass either an ExecutorConfig or its fields "
                f"({', '.join(sorted(settings))}), not both"
            )
        if config.kind != self.name:
            raise ConfigError(
                f"{type(self).__name__} runs executor kind {self.name!r}, got a config with "
                f"kind={config.kind!r}; use kdcache.executors.get_executor(config) to pick "
                "the executor from the config's kind"
            )
        self.config = config

    def run(
        self,
        context: TaskContext,
        tasks: Iterable[tuple[int, Sequence[int]]],
        report: BuildReport,
        *,
        progress: bool = True,
    ) -> list[ShardTask]:
        """Run the candidate tasks, skipping (teacher, shard) pairs already committed.

        A pair counts as done when its entry has the shard's commit record and the data
        file's bytes match it (``entry.committed_shard(i, check_bytes=True)``: what is
        reused is checked, not believed); it is added to ``report.reused`` and not run.
        The remaining pairs are added to ``report.computed`` and handed, grouped
        by shard in the given order, to :meth:`_run`; nothing is started when none
        remain.

        Args:
            context: The dataset, teachers, entries and batch size of this build.
            tasks: Candidate ``(shard_index, teacher indices)`` pairs (or
                :class:`ShardTask`), e.g. every shard for every teacher still building.
            report: The build's report; updated in place (reused, computed, per worker).
            progress: Show a progress bar.

        Returns:
            The tasks that were run (committed pairs removed).

        Raises:
            TeacherOutputError: a teacher returned NaN/inf or a wrong shape (fatal).
            RetriableError: infrastructure failures the executor gave up on.
        """
        remaining: list[ShardTask] = []
        num_skipped = 0
        for shard_index, teachers in tasks:
            todo = tuple(
                k
                for k in teachers
                if context.entries[k].committed_shard(shard_index, check_bytes=True) is None
            )
            num_skipped += len(teachers) - len(todo)
            if todo:
                remaining.append(ShardTask(shard_index, todo))
        num_todo = sum(len(t.teachers) for t in remaining)
        report.reused += num_skipped
        report.computed += num_todo
        if num_skipped:
            log.info(
                "resuming: %d (teacher, shard) output(s) already committed are skipped; "
                "%d remain to compute",
                num_skipped,
                num_todo,
            )
        if remaining:
            self._run(context, remaining, report, progress=progress)
        return remaining

    @abc.abstractmethod
    def _run(
        self, context: TaskContext, tasks: list[ShardTask], report: BuildReport, *, progress: bool
    ) -> None:
        """Run every task (all still to do; at least one), accounting each in ``report``
        with :func:`account`, and return when all are committed.

        Raises:
            TeacherOutputError: at once, on a teacher error.
        """

    def close(self) -> None:
        """Release what the executor holds between runs (nothing, by default)."""
        return None

    def __enter__(self) -> Executor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


def progress_bar(num_tasks: int, enabled: bool) -> Progress:
    """Progress over ``num_tasks`` shard tasks (:class:`kdcache.progress.Progress`: a bar
    on a terminal, a log line every 30 s in a log file)."""
    return Progress(num_tasks, desc="teacher stage", unit="shard", enabled=enabled)


def account(report: BuildReport, worker: str, stats: Mapping[str, float], bar: Progress) -> None:
    """Add one finished task's ``stats`` (from :meth:`TaskContext.compute`) to ``report``
    under ``worker`` and advance ``bar`` (with the task's samples, for samples/s)."""
    report.record(worker, stats)
    bar.update(1, samples=int(stats["samples"]))
