"""The Ray executor: shard tasks run on a pool of Ray actors that the executor keeps.

Ray is imported only here, and only when a :class:`RayExecutor` is made, so
``import kdcache`` works without it. The actor class is defined once, at module level;
``ray.remote`` is applied to it on first use. One :class:`RayExecutor` keeps its actors
(and the Ray it started or joined) between runs, so a second ``build_cache`` through the
same object starts no new actors; each run ships that build's context (dataset, teachers,
entries, batch size) to the actors once, through the object store.

Failures are sorted as in datatrove's Ray executor: an actor that died (a lost node, a
killed process) is retriable, and its shard reruns on a fresh actor a bounded number of
times (the shard's files are idempotent); a teacher error is fatal and stops the run at
once.
"""

from __future__ import annotations

import logging
import os
from collections import deque
from typing import Any

import torch

from kdcache import quiet
from kdcache.build.report import BuildReport
from kdcache.errors import RetriableError, require
from kdcache.executors.base import Executor, ShardTask, TaskContext, account, progress_bar
from kdcache.executors.config import ExecutorConfig

log = logging.getLogger(__name__)


class TeacherActor:
    """The body of one Ray actor: holds one build's teachers (co-located small models)
    and runs that build's shard tasks.

    Args:
        num_threads: torch CPU threads (the CPUs the actor requested, at least 1).
        use_gpu: Move the teachers to the actor's CUDA device (when one is visible).
    """

    def __init__(self, num_threads: int, use_gpu: bool) -> None:
        torch.set_num_threads(num_threads)
        self._use_gpu = use_gpu
        self._context: TaskContext | None = None
        self._context_key: str | None = None

    def run(self, context_ref: list[Any], task: ShardTask) -> dict[str, float]:
        """Run one task of the build whose context is ``context_ref[0]``.

        The context is fetched from the object store on the first task of a build and
        kept for the next ones. The reference comes wrapped in a list so that Ray passes
        it as is, and the driver, which keeps it alive, stays its owner.

        Returns:
            The task's stats (:meth:`TaskContext.compute`).

        Raises:
            TeacherOutputError: a teacher returned NaN/inf or a wrong shape.
        """
        import ray

        (ref,) = context_ref
        if ref.hex() != self._context_key:
            self.release()
            context = ray.get(ref)
            if self._use_gpu and torch.cuda.is_available():
                for teacher in context.teachers:
                    teacher.to("cuda")
            self._context, self._context_key = context, ref.hex()
        assert self._context is not None
        return self._context.compute(task)

    def release(self) -> None:
        """Drop the build's context (its teachers' weights), keeping the process."""
        self._context = None
        self._context_key = None


_remote_actor_class: Any = None


def _actor_class(ray: Any) -> Any:
    """``ray.remote(TeacherActor)``, made once, on first use."""
    global _remote_actor_class
    if _remote_actor_class is None:
        _remote_actor_class = ray.remote(TeacherActor)
    return _remote_actor_class


class RayExecutor(Executor):
    """Runs the tasks on Ray actors (``ExecutorConfig.kind == "ray"``).

    Settings (:class:`ExecutorConfig`): ``address`` (None: ``RAY_ADDRESS`` or a new
    local Ray), ``num_actors`` (default: one per ``cpus_per_actor`` CPUs of the cluster,
    and no more than one per GPU share when ``gpus_per_actor > 0``; never more than the
    run's shards), ``cpus_per_actor`` (also the actor's torch threads),
    ``gpus_per_actor`` (fractional values share a GPU; with > 0 the teachers run on
    CUDA), ``batch_size`` and ``max_retries`` (times a shard reruns after its actor
    died).

    Ray is joined or started on the first run that has work; the actors are started as a
    run needs them and kept for the next runs. :meth:`close` kills them, and shuts Ray
    down only if this executor started it.

    Example::

        with RayExecutor(ExecutorConfig(num_actors=4)) as ex:
            a = kdcache.build_cache(ds, teacher_a, temperature=2.0, root=root, executor=ex)
            b = kdcache.build_cache(ds, teacher_b, temperature=2.0, root=root, executor=ex)

    Raises:
        MissingDependencyError: Ray is not installed (names the extra).
        ConfigError: as :class:`Executor`.
    """

    name = "ray"

    def __init__(self, config: ExecutorConfig | None = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._ray = require("ray", "ray")
        self._actors: list[Any] = []
        self._session: tuple[str, str] | None = None  # the Ray the actors live in
        self._started_ray = False

    @property
    def actors(self) -> tuple[Any, ...]:
        """The pool's actor handles, in pool order (``"actor-<i>"`` in the report)."""
        return tuple(self._actors)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it. Idempotent."""
        ray = self._ray
        try:
            if ray.is_initialized() and self._session == _session(ray):
                for actor in self._actors:
                    _kill(ray, actor)
                if self._started_ray:
                    ray.shutdown()
        finally:
            self._actors.clear()
            self._session = None
            self._started_ray = False

    def _connect(self) -> Any:
        ray = self._ray
        started = False
        if not ray.is_initialized():
            address = self.config.address
            quiet.quiet_ray()  # no ANSI colour codes in the actors' lines in a log file
            try:
                ray.init(
                    address=address,
                    include_dashboard=False,
                    log_to_driver=True,
                    logging_level=logging.WARNING,
                )
            except (ConnectionError, ValueError) as exc:
                where = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
                raise RetriableError(
                    f"could not start or join Ray at {where}: {exc}. Check --address / "
                    "RAY_ADDRESS (host:port of a running head, or 'local' for a new local "
                    "Ray); nothing was computed, and entries committed before are kept"
                ) from exc
            started = True
        session = _session(ray)
        if session != self._session:
            # A Ray other than the one of the last run (it was shut down since): the old
            # actors went with it.
            self._actors.clear()
            self._session = session
            self._started_ray = started
        return ray

    def _num_actors(self, ray: Any, num_tasks: int) -> int:
        cfg = self.config
        resources = ray.cluster_resources()
        n = max(1, int(float(resources.get("CPU", 1)) // cfg.cpus_per_actor))
        if cfg.gpus_per_actor > 0:
            n = min(n, max(1, int(float(resources.get("GPU", 0)) // cfg.gpus_per_actor)))
        return min(cfg.num_actors or n, num_tasks)

    def _start_actor(self) -> Any:
        cfg = self.config
        return (
            _actor_class(self._ray)
            .options(num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor, max_restarts=0)
            .remote(max(1, int(cfg.cpus_per_actor)), cfg.gpus_per_actor > 0)
        )

    def _discard(self, indices: set[int]) -> None:
        ray = self._ray
        for a in indices:
            _kill(ray, self._actors[a])
        self._actors = [h for a, h in enumerate(self._actors) if a not in indices]

    def _run(
        self, context: TaskContext, tasks: list[ShardTask], report: BuildReport, *, progress: bool
    ) -> None:
        ray = self._connect()
        max_retries = self.config.max_retries
        n = self._num_actors(ray, len(tasks))
        num_new = max(0, n - len(self._actors))
        self._actors.extend(self._start_actor() for _ in range(num_new))
        log.info(
            "teacher stage: %d shard(s) x %d teacher(s) on %d Ray actor(s) (%d started, %d kept)",
            len(tasks),
            len(context.teachers),
            n,
            num_new,
            n - num_new,
        )
        context_ref = [ray.put(context)]
        bar = progress_bar(len(tasks), progress)
        queue = deque((task, 0) for task in tasks)
        in_flight: dict[Any, tuple[int, ShardTask, int]] = {}
        free = list(range(n))
        lost: set[int] = set()
        actor_died = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        try:
            while queue or in_flight:
                while queue and free:
                    a = free.pop()
                    task, attempt = queue.popleft()
                    in_flight[self._actors[a].run.remote(context_ref, task)] = (a, task, attempt)
                done, _ = ray.wait(list(in_flight), num_returns=1)
                a, task, attempt = in_flight.pop(done[0])
                try:
                    stats = ray.get(done[0])  # a teacher error (fatal) raises here: job stops
                except actor_died as exc:
                    # Infrastructure failure: the shard's files are idempotent, so rerun it
                    # on a fresh actor, a bounded number of times.
                    if attempt >= max_retries:
                        lost.add(a)
                        raise RetriableError(
                            f"shard {task.shard_index} failed {attempt + 1} times because its "
                            f"actor died ({type(exc).__name__}); committed shards are kept, "
                            "rerun the build to resume"
                        ) from exc
                    log.warning(
                        "actor-%d died on shard %d (%s); retrying on a new actor "
                        "(attempt %d of %d)",
                        a,
                        task.shard_index,
                        type(exc).__name__,
                        attempt + 2,
                        max_retries + 1,
                    )
                    self._actors[a] = self._start_actor()
                    queue.appendleft((task, attempt + 1))
                    free.append(a)
                    continue
                account(report, f"actor-{a}", stats, bar)
                free.append(a)
        except BaseException:
            # Stop at once: kill the actors still busy with this build's shards (and drop
            # dead ones), so that nothing is written after the build has failed and let go
            # of its leases. Idle actors stay in the pool.
            self._discard(lost | {a for a, _, _ in in_flight.values()})
            raise
        finally:
            bar.close()
        # The actors stay; the build's dataset and teachers are let go.
        try:
            ray.get([self._actors[a].release.remote() for a in range(n)])
        except actor_died:
            pass  # the next run replaces a dead actor on its first task (a retry)


def _session(ray: Any) -> tuple[str, str]:
    """Identifies the Ray this driver is connected to (a new local Ray has a new node; a
    reconnection to a cluster is a new job)."""
    ctx = ray.get_runtime_context()
    return str(ctx.get_node_id()), str(ctx.get_job_id())


def _kill(ray: Any, actor: Any) -> None:
    try:
        ray.kill(actor)
    except Exception as exc:  # already gone, or Ray itself is gone: nothing left to kill
        log.debug("could not kill %r: %s", actor, exc)
