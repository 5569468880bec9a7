"""The executor interface of the teacher stage: the base skips what is done, subclasses run
the rest.

As in huggingface/datatrove's ``executor/base.py``, the base class owns "skip what is
done": :meth:`Executor.run` takes the candidate (shard, teachers) tasks, drops every
(teacher, shard) pair whose output shard already has a commit record, counts those as
reused, and hands only the rest to the concrete executor's :meth:`Executor._run`, which
just runs tasks (in this process, on Ray actors, ...).

A task's context holds teachers as loaded :class:`~kdcache.Teacher` objects or as
:class:`~kdcache.teachers.TeacherSpec` plans; a worker resolves a spec through its
:class:`LoadedTeachers` (loaded on first use, kept between builds), so the whole unit of
work stays ``TaskContext.compute(task)``.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, NamedTuple

from kdcache import schema
from kdcache.build.report import BuildReport
from kdcache.build.task import compute_shard
from kdcache.data.base import ShardedDataset
from kdcache.errors import ConfigError
from kdcache.executors.config import ExecutorConfig
from kdcache.executors.pools import plan_pools
from kdcache.progress import Progress
from kdcache.stores.entry import CacheEntry
from kdcache.teachers.spec import TeacherSpec
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


class LoadedTeachers:
    """The teachers one process has loaded from specs, kept between builds.

    Each Ray actor holds one (and the local executor one for this process): a
    :class:`~kdcache.teachers.TeacherSpec` is loaded on its first task
    (:meth:`TeacherSpec.load`) and kept, under its name and fingerprint key, while the
    builds that follow still have it; :meth:`retain` lets go of the others. A
    :class:`~kdcache.Teacher` in a context is used as it is (it came with its weights).

    Args:
        device: Where loaded teachers go (``"cuda"`` on a GPU actor); None: the CPU.
    """

    def __init__(self, device: str | None = None) -> None:
        self.device = device
        self._teachers: dict[str, Teacher] = {}
        #: Specs loaded by this object (each at most once while it is retained).
        self.num_loads = 0

    def get(self, item: Teacher | TeacherSpec, key: str) -> Teacher:
        """The loaded teacher of ``item``; a spec is loaded on first use.

        Args:
            item: A teacher or a spec.
            key: The spec's identity (name and fingerprint key, :meth:`TaskContext.key`).

        Raises:
            As :meth:`TeacherSpec.load`.
        """
        if isinstance(item, Teacher):
            return item
        teacher = self._teachers.get(key)
        if teacher is None:
            log.info("loading teacher %r from its spec (%s)", item.name, item.kind)
            teacher = item.load()
            if self.device is not None:
                teacher.to(self.device)
            self._teachers[key] = teacher
            self.num_loads += 1
        return teacher

    def retain(self, keys: Iterable[str]) -> None:
        """Let go of every loaded teacher whose key is not in ``keys``."""
        keep = set(keys)
        for key in [k for k in self._teachers if k not in keep]:
            del self._teachers[key]

    @property
    def names(self) -> list[str]:
        """Names of the teachers loaded from specs, in load order."""
        return [t.name for t in self._teachers.values()]

    def clear(self) -> None:
        self._teachers.clear()


@dataclass(frozen=True)
class TaskContext:
    """What every worker needs to run any task of one build (shipped once per worker).

    Attributes:
        dataset: The sharded input dataset (picklable; a worker reads only its shards).
        teachers: The teachers, one per entry, in ensemble order: loaded
            :class:`~kdcache.Teacher` objects (shipped with their weights) or
            :class:`~kdcache.teachers.TeacherSpec` objects (loaded where they run).
        entries: The cache entry each teacher writes to, aligned with ``teachers``.
        batch_size: Rows per teacher forward pass (does not change keys or bytes).
        teacher_keys: ``schema.content_key`` of each teacher's fingerprint, aligned with
            ``teachers`` (the driver computes them once, so that a worker never hashes a
            spec's weight files); None: computed where needed.
        expected_rows: Rows of each input shard as the dataset's fingerprint declares them
            (``fingerprint()["shards"][i]["num_records"]``); a shard that reads otherwise
            is refused before its outputs are written. None: not checked.

    Raises:
        ConfigError: ``teachers``, ``entries`` and ``teacher_keys`` differ in length, or
            ``batch_size`` < 1.
    """

    dataset: ShardedDataset
    teachers: Sequence[Teacher | TeacherSpec]
    entries: Sequence[CacheEntry]
    batch_size: int
    teacher_keys: Sequence[str] | None = None
    expected_rows: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if len(self.teachers) != len(self.entries):
            raise ConfigError(
                f"a task context needs one entry per teacher, got {len(self.teachers)} "
                f"teacher(s) and {len(self.entries)} entries"
            )
        if self.teacher_keys is not None and len(self.teacher_keys) != len(self.teachers):
            raise ConfigError(
                f"a task context needs one key per teacher, got {len(self.teachers)} "
                f"teacher(s) and {len(self.teacher_keys)} keys"
            )
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")

    def key(self, k: int) -> str:
        """Identity of teacher ``k`` for :class:`LoadedTeachers`: name and fingerprint key."""
        if self.teacher_keys is not None:
            fp_key = self.teacher_keys[k]
        else:
            fp_key = schema.content_key(self.teachers[k].fingerprint())
        return f"{self.teachers[k].name}@{fp_key}"

    def spec_keys(self) -> list[str]:
        """:meth:`key` of every spec among the teachers."""
        return [self.key(k) for k, t in enumerate(self.teachers) if isinstance(t, TeacherSpec)]

    def subset(self, indices: Sequence[int]) -> TaskContext:
        """The context of some teachers only (what one actor pool is shipped).

        Args:
            indices: Positions in :attr:`teachers`; teacher ``indices[j]`` becomes
                teacher ``j`` of the new context.
        """
        return TaskContext(
            self.dataset,
            tuple(self.teachers[k] for k in indices),
            tuple(self.entries[k] for k in indices),
            self.batch_size,
            None if self.teacher_keys is None else tuple(self.teacher_keys[k] for k in indices),
            self.expected_rows,
        )

    def compute(self, task: ShardTask, loaded: LoadedTeachers | None = None) -> dict[str, float]:
        """Run one task (see :func:`kdcache.build.task.compute_shard`): the shard is read
        once for all the task's teachers.

        Args:
            task: The shard and the teachers to run on it.
            loaded: Where specs are loaded and kept (an actor's, the local executor's);
                None loads them for this task only.

        Returns:
            ``{"samples": rows x teachers, "seconds": wall time, ...}``.

        Raises:
            TeacherOutputError: NaN/inf or a wrong shape (fatal).
            ConfigError, DataFileNotFoundError: a spec fails to load (fatal).
        """
        loaded = loaded if loaded is not None else LoadedTeachers()
        return compute_shard(
            self.dataset,
            [loaded.get(self.teachers[k], self.key(k)) for k in task.teachers],
            [self.entries[k] for k in task.teachers],
            task.shard_index,
            self.batch_size,
            expected_rows=(
                None if self.expected_rows is None else self.expected_rows[task.shard_index]
            ),
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
            ConfigError: the teachers' resources do not form pools
                (:func:`kdcache.executors.pools.plan_pools`; checked for every executor,
                before anything runs).
            TeacherOutputError: a teacher returned NaN/inf or a wrong shape (fatal).
            RetriableError: infrastructure failures the executor gave up on.
        """
        plan_pools(context.teachers, self.config)
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
    report.check_vocab_sizes()
    bar.update(1, samples=int(stats["samples"]))
