"""Executors of the teacher stage: where the per-shard tasks run (this process, or pools of
Ray actors planned from the teachers' resources, :mod:`~kdcache.executors.pools`), behind
one interface whose base class skips the work already committed.

``get_executor`` turns what ``build_cache(executor=...)`` accepts into an executor.
"""

from __future__ import annotations

from kdcache.errors import ConfigError
from kdcache.executors.base import Executor, LoadedTeachers, ShardTask, TaskContext
from kdcache.executors.config import ExecutorConfig
from kdcache.executors.local import LocalExecutor
from kdcache.executors.pools import PoolPlan, plan_pools
from kdcache.executors.ray import RayExecutor

#: The built-in executors, by ``ExecutorConfig.kind``.
EXECUTORS: dict[str, type[Executor]] = {"ray": RayExecutor, "local": LocalExecutor}


def get_executor(spec: object) -> Executor:
    """An executor for ``spec``.

    Args:
        spec: An executor name (``"ray"``, ``"local"``: default settings), an
            :class:`ExecutorConfig` (the executor of its ``kind``, with its settings), or
            an :class:`Executor`, returned as is.

    Returns:
        The executor. One made here is the caller's to :meth:`Executor.close`.

    Raises:
        ConfigError: ``spec`` is none of these (names what was given and what is
            accepted).
        MissingDependencyError: a Ray executor without Ray installed.
    """
    if isinstance(spec, Executor):
        return spec
    if isinstance(spec, ExecutorConfig):
        return _executor_class(spec.kind)(spec)
    if isinstance(spec, str):
        return _executor_class(spec)()
    raise ConfigError(f"executor must be {_accepted()}; got {spec!r} ({type(spec).__name__})")


def _executor_class(kind: str) -> type[Executor]:
    try:
        return EXECUTORS[kind]
    except KeyError:
        raise ConfigError(f"executor must be {_accepted()}; got {kind!r}") from None


def _accepted() -> str:
    names = ", ".join(repr(name) for name in EXECUTORS)
    return f"one of {names}, an ExecutorConfig or an Executor instance"


__all__ = [
    "EXECUTORS",
    "Executor",
    "ExecutorConfig",
    "LoadedTeachers",
    "LocalExecutor",
    "PoolPlan",
    "RayExecutor",
    "ShardTask",
    "TaskContext",
    "get_executor",
    "plan_pools",
]
