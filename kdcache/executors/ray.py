"""The Ray executor: shard tasks run on pools of Ray actors that the executor keeps.

Ray is imported only here, and only when a :class:`RayExecutor` is made, so
``import kdcache`` works without it. The actor class is defined once, at module level;
``ray.remote`` is applied to it on first use.

**Pools.** A build's teachers are split into actor pools by their resources
(:func:`kdcache.executors.pools.plan_pools`): the teachers without resources share the
default pool, sized by the :class:`ExecutorConfig`; a teacher with its own
:class:`~kdcache.teachers.TeacherResources` (or a group of teachers) gets a pool whose
actors ask Ray for those CPUs, GPUs and memory. Each pool is shipped a context with only
its own teachers and the dataset, once per actor and build, through the object store. An
actor loads its specs on first use; a small in-memory teacher is put in the object store
once per executor and fetched once per actor. Both are kept on the actor across builds
while a build still has them, by name and fingerprint, so a second build sends only its
dataset.

**Scheduling.** All pools run together, over the shards, in one ``ray.wait`` loop: each
pool has its actors, its free list and its queue of (shard, the pool's teachers still to
do on it). Each (teacher, shard) output commits on its own as its task ends, so a slow
pool never holds back another's commits. A new actor is given tasks only once it is up
(its :meth:`TeacherActor.info` answered), so an actor the cluster cannot place yet never
holds a shard.

**Failures** are sorted as in datatrove's Ray executor: an actor that died (a lost node,
a killed process) is retriable, and its shard reruns on a fresh actor of the same pool a
bounded number of times (the shard's files are idempotent); a teacher error is fatal and
stops every pool at once (the busy actors are killed, so that nothing is written after
the build has failed).

**Kept actors.** One :class:`RayExecutor` keeps its actors (and the Ray it started or
joined) between runs, by pool resources: a second ``build_cache`` through the same
object with pools of the same resources starts no new actors and loads or ships no
teacher again. Kept actors that a run
does not need (other resources, or more than it uses) are stopped at its start, so that
they do not hold resources the run's pools need.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from kdcache import quiet
from kdcache.build.report import BuildReport
from kdcache.errors import ConfigError, RetriableError, require
from kdcache.executors.base import (
    Executor,
    LoadedTeachers,
    ShardTask,
    TaskContext,
    account,
    progress_bar,
)
from kdcache.executors.config import ExecutorConfig
from kdcache.executors.pools import PoolPlan, plan_pools, pool_sizes, unplaceable
from kdcache.local_ray import loopback_ray, starts_a_local_ray
from kdcache.teachers.spec import TeacherSpec
from kdcache.teachers.teacher import Teacher

log = logging.getLogger(__name__)

#: Seconds without any answer after which the executor logs which pools still wait for
#: an actor to be placed.
WAIT_LOG_S = 60.0


class TeacherActor:
    """The body of one Ray actor: runs one pool's shard tasks and keeps the teachers it
    holds between builds.

    Teachers are kept by their identity (name and fingerprint key,
    :meth:`TaskContext.key`): those loaded from specs (:class:`LoadedTeachers`) and the
    in-memory :class:`~kdcache.Teacher` objects the driver shipped (fetched from the object
    store once per actor). A build whose context no longer has a teacher lets it go.

    Args:
        num_threads: torch CPU threads (the CPUs the actor requested, at least 1), so that
            an actor never runs more threads than Ray gave it CPUs.
        use_gpu: Move the teachers to the actor's CUDA device (when one is visible).
    """

    def __init__(self, num_threads: int, use_gpu: bool) -> None:
        torch.set_num_threads(num_threads)
        with contextlib.suppress(RuntimeError):  # already set: this process ran torch ops
            torch.set_num_interop_threads(num_threads)
        self._use_gpu = use_gpu and torch.cuda.is_available()
        self._context: TaskContext | None = None
        self._context_key: str | None = None
        self._loaded = LoadedTeachers("cuda" if self._use_gpu else None)
        self._shipped: dict[str, Teacher] = {}  # in-memory teachers, by key
        #: In-memory teachers fetched from the object store (each once while kept).
        self._num_fetches = 0

    def info(self) -> dict[str, Any]:
        """Who this actor is and what it holds (cheap; also the executor's "is it up").

        Returns:
            ``{"pid": int, "node_id": str, "teachers": [names loaded], "num_loads": int,
            "shipped": [names], "num_fetches": int, "num_threads": int}``: ``teachers``
            lists the teachers loaded from specs (kept between builds) and the in-memory
            teachers of the current build; ``num_loads`` counts spec loads; ``shipped``
            lists the in-memory teachers kept (between builds too) and ``num_fetches``
            counts their fetches from the object store; ``num_threads`` is torch's.
        """
        import ray

        names = list(self._loaded.names)
        if self._context is not None:
            names += [t.name for t in self._context.teachers if isinstance(t, Teacher)]
        return {
            "pid": os.getpid(),
            "node_id": str(ray.get_runtime_context().get_node_id()),
            "teachers": names,
            "num_loads": self._loaded.num_loads,
            "shipped": [t.name for t in self._shipped.values()],
            "num_fetches": self._num_fetches,
            "num_threads": torch.get_num_threads(),
        }

    def run(self, shipment: list[Any], task: ShardTask) -> dict[str, float]:
        """Run one task of the build whose context is in ``shipment``.

        ``shipment`` is ``[context_ref, {key: teacher_ref}]`` (:func:`_ship`): the
        build's context without its in-memory teachers, and one object reference per
        in-memory teacher. On the first task of a build the context is fetched and kept
        for the next ones; an in-memory teacher is fetched only if this actor does not
        hold it already, and teachers the new context no longer has are let go. The
        references come wrapped in a list so that Ray passes them as they are, and the
        driver, which keeps them alive, stays their owner.

        Returns:
            The task's stats (:meth:`TaskContext.compute`).

        Raises:
            TeacherOutputError: a teacher returned NaN/inf or a wrong shape.
        """
        import ray

        ref, teacher_refs = shipment
        if ref.hex() != self._context_key:
            self.release()
            light: _Shipped = ray.get(ref)
            keys = light.keys
            self._loaded.retain(keys)
            for key in [k for k in self._shipped if k not in keys]:
                del self._shipped[key]
            teachers: list[Teacher | TeacherSpec] = []
            for item, key in zip(light.teachers, keys, strict=True):
                if item is not None:
                    teachers.append(item)
                    continue
                teacher = self._shipped.get(key)
                if teacher is None:
                    teacher = ray.get(teacher_refs[key])
                    if self._use_gpu:
                        teacher.to("cuda")
                    self._shipped[key] = teacher
                    self._num_fetches += 1
                teachers.append(teacher)
            self._context, self._context_key = light.context(teachers), ref.hex()
        assert self._context is not None
        return self._context.compute(task, self._loaded)

    def release(self) -> None:
        """Drop the build's context (its dataset), keeping the process and the teachers
        it holds."""
        self._context = None
        self._context_key = None


@dataclass(frozen=True)
class _Shipped:
    """A pool's :class:`TaskContext` as it travels: its in-memory teachers left out
    (None; each is shipped once per executor by reference, :func:`_ship`), its specs as
    they are, and every teacher's identity (:meth:`TaskContext.key`)."""

    dataset: Any
    teachers: tuple[TeacherSpec | None, ...]
    entries: tuple[Any, ...]
    batch_size: int
    teacher_keys: Sequence[str] | None
    expected_rows: Sequence[int] | None
    keys: list[str]

    def context(self, teachers: Sequence[Teacher | TeacherSpec]) -> TaskContext:
        """The :class:`TaskContext` again, with the actor's ``teachers`` in the gaps."""
        return TaskContext(
            self.dataset,
            tuple(teachers),
            self.entries,
            self.batch_size,
            self.teacher_keys,
            self.expected_rows,
        )


_remote_actor_class: Any = None


def _actor_class(ray: Any) -> Any:
    """``ray.remote(TeacherActor)``, made once, on first use."""
    global _remote_actor_class
    if _remote_actor_class is None:
        _remote_actor_class = ray.remote(TeacherActor)
    return _remote_actor_class


@dataclass
class _Slot:
    """One kept actor: its handle, and whether it has answered (it is placed and up)."""

    handle: Any
    ready: bool = False


@dataclass
class _PoolRun:
    """One pool during one run."""

    plan: PoolPlan
    slots: list[_Slot]  # the kept list, mutated in place
    shipment: list[Any]  # [context ref, {key: in-memory teacher ref}] (TeacherActor.run)
    queue: deque[tuple[ShardTask, int]]
    free: list[int] = field(default_factory=list)

    def worker(self, a: int) -> str:
        return f"{self.plan.name}/actor-{a}"


class RayExecutor(Executor):
    """Runs the tasks on pools of Ray actors (``ExecutorConfig.kind == "ray"``).

    Settings (:class:`ExecutorConfig`): ``address`` (None: ``RAY_ADDRESS`` or a new
    local Ray); the default pool's ``num_actors`` (default: one per ``cpus_per_actor``
    CPUs of what the cluster has left for it, and no more than one per GPU share when
    ``gpus_per_actor > 0``; never more than the run's shards), ``cpus_per_actor`` (also
    the actor's torch threads) and ``gpus_per_actor`` (fractional values share a GPU;
    with > 0 the teachers run on CUDA); ``batch_size`` and ``max_retries`` (times a
    shard reruns after its actor died). Teachers with
    :class:`~kdcache.teachers.TeacherResources` run in pools of their own (see the
    module docstring); workers are reported as ``"<pool>/actor-<i>"``.

    Ray is joined or started on the first run that has work; the actors are started as a
    run needs them and kept for the next runs. :meth:`close` kills them, and shuts Ray
    down only if this executor started it.

    Example::

        big = TeacherSpec.checkpoint("big", "models:big", "big.safetensors",
                                     resources=TeacherResources(gpus_per_actor=1))
        with RayExecutor(ExecutorConfig(num_actors=4)) as ex:
            a = kdcache.build_cache(ds, [small, big], temperature=2.0, root=root,
                                    executor=ex)
            b = kdcache.build_cache(ds2, [small, big], temperature=2.0, root=root,
                                    executor=ex)  # the same actors, big loaded once

    Raises:
        MissingDependencyError: Ray is not installed (names the extra).
        ConfigError: as :class:`Executor`.
    """

    name = "ray"

    def __init__(self, config: ExecutorConfig | None = None, **settings: Any) -> None:
        super().__init__(config, **settings)
        self._ray = require("ray", "ray")
        # Kept actors by pool resources: one list of slots per pool of those resources.
        self._kept: dict[tuple[float, float, int | None], list[list[_Slot]]] = {}
        self._last_pools: dict[str, tuple[Any, ...]] = {}
        self._session: tuple[str, str] | None = None  # the Ray the actors live in
        # In-memory teachers in the object store, by TaskContext.key: put once, kept
        # while the runs that follow still have them (the actors keep their copies too).
        self._teacher_refs: dict[str, Any] = {}
        self._started_ray = False

    @property
    def actors(self) -> tuple[Any, ...]:
        """Every kept actor handle, pool by pool (see :attr:`pools`)."""
        return tuple(s.handle for sets in self._kept.values() for slots in sets for s in slots)

    @property
    def pools(self) -> dict[str, tuple[Any, ...]]:
        """The last run's pools: name -> its actor handles (``"<name>/actor-<i>"``)."""
        return dict(self._last_pools)

    def close(self) -> None:
        """Kill the actors; shut Ray down if this executor started it. Idempotent."""
        ray = self._ray
        try:
            if ray.is_initialized() and self._session == _session(ray):
                for handle in self.actors:
                    _kill(ray, handle)
                if self._started_ray:
                    ray.shutdown()
        finally:
            self._kept.clear()
            self._last_pools.clear()
            self._teacher_refs.clear()
            self._session = None
            self._started_ray = False

    def _connect(self) -> Any:
        ray = self._ray
        started = False
        if not ray.is_initialized():
            address = self.config.address
            quiet.quiet_ray()  # no ANSI colour codes in the actors' lines in a log file
            try:
                with contextlib.ExitStack() as stack:
                    # A Ray of our own listens on 127.0.0.1 only; a cluster is joined as is.
                    local = (
                        stack.enter_context(loopback_ray()) if starts_a_local_ray(address) else {}
                    )
                    ray.init(
                        address=address,
                        include_dashboard=False,
                        log_to_driver=True,
                        logging_level=logging.WARNING,
                        **local,
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
            self._kept.clear()
            self._teacher_refs.clear()
            self._session = session
            self._started_ray = started
        return ray

    def _start_actor(self, plan: PoolPlan) -> Any:
        options: dict[str, Any] = {
            "num_cpus": plan.cpus_per_actor,
            "num_gpus": plan.gpus_per_actor,
            "max_restarts": 0,
        }
        if plan.memory_bytes is not None:
            options["memory"] = plan.memory_bytes
        return (
            _actor_class(self._ray)
            .options(**options)
            .remote(max(1, int(plan.cpus_per_actor)), plan.gpus_per_actor > 0)
        )

    def _assign(self, plans: Sequence[PoolPlan], sizes: Sequence[int]) -> list[list[_Slot]]:
        """Each pool's kept slots (trimmed or extended to its size); kept actors that no
        pool of this run uses are killed, so they hold no resources."""
        ray = self._ray
        taken: dict[tuple[float, float, int | None], int] = {}
        out = []
        for plan, n in zip(plans, sizes, strict=True):
            key = plan.resources_key
            j = taken.get(key, 0)
            taken[key] = j + 1
            sets = self._kept.setdefault(key, [])
            while len(sets) <= j:
                sets.append([])
            slots = sets[j]
            for slot in slots[n:]:
                _kill(ray, slot.handle)
            del slots[n:]
            slots.extend(_Slot(self._start_actor(plan)) for _ in range(n - len(slots)))
            out.append(slots)
        for key in list(self._kept):
            sets = self._kept[key]
            for slots in sets[taken.get(key, 0) :]:
                for slot in slots:
                    _kill(ray, slot.handle)
            del sets[taken.get(key, 0) :]
            if not sets:
                del self._kept[key]
        return out

    def _run(
        self, context: TaskContext, tasks: list[ShardTask], report: BuildReport, *, progress: bool
    ) -> None:
        ray = self._connect()
        in_memory = {
            context.key(k) for k, t in enumerate(context.teachers) if isinstance(t, Teacher)
        }
        for key in [k for k in self._teacher_refs if k not in in_memory]:
            del self._teacher_refs[key]
        cluster = ray.cluster_resources()
        # The pools, each with its own tasks (teacher indices local to its context).
        plans: list[PoolPlan] = []
        pool_tasks: list[list[ShardTask]] = []
        for plan in plan_pools(context.teachers, self.config):
            local = {k: j for j, k in enumerate(plan.teachers)}
            mine = [
                ShardTask(t.shard_index, tuple(local[k] for k in t.teachers if k in local))
                for t in tasks
            ]
            mine = [t for t in mine if t.teachers]
            if mine:
                plans.append(plan)
                pool_tasks.append(mine)
        if self._started_ray:
            # A Ray this executor started is this machine alone: no autoscaler will ever
            # add what a pool asks for, so waiting would be forever.
            for plan in plans:
                missing = unplaceable(plan, cluster)
                if missing:
                    raise ConfigError(
                        f"pool {plan.name!r}: one actor asks for {', '.join(missing)}, and "
                        "this Ray was started here, on this machine alone, so it can never "
                        "be placed; lower the teacher's TeacherResources (config: "
                        "teachers[i].resources) or executor settings, or join a cluster "
                        "that has it (executor.address / RAY_ADDRESS); nothing was computed"
                    )
        sizes = pool_sizes(plans, [len(t) for t in pool_tasks], cluster)
        kept_before = {id(s.handle) for s in self._iter_slots()}
        all_slots = self._assign(plans, sizes)
        runs = []
        for plan, mine, slots in zip(plans, pool_tasks, all_slots, strict=True):
            runs.append(
                _PoolRun(
                    plan,
                    slots,
                    self._ship(context.subset(plan.teachers)),
                    deque((t, 0) for t in mine),
                )
            )
            num_kept = sum(1 for s in slots if id(s.handle) in kept_before)
            log.info(
                "teacher stage: pool %r (%s): %d shard task(s) x %d teacher(s) on %d Ray "
                "actor(s) (%d started, %d kept)",
                plan.name,
                plan.describe(),
                len(mine),
                len(plan.teachers),
                len(slots),
                len(slots) - num_kept,
                num_kept,
            )
            missing = unplaceable(plan, cluster)
            if missing:
                log.warning(
                    "pool %r: one actor asks for %s; its tasks wait until the cluster can "
                    "place one (an autoscaler adding nodes), or set the teacher's "
                    "TeacherResources to fit",
                    plan.name,
                    ", ".join(missing),
                )
        self._last_pools = {r.plan.name: tuple(s.handle for s in r.slots) for r in runs}
        self._schedule(ray, runs, report, progress=progress)

    def _ship(self, context: TaskContext) -> list[Any]:
        """What a pool's actors are sent with each task: ``[context_ref, {key:
        teacher_ref}]``. The context (dataset, entries, specs) is put in the object store
        once per run; each in-memory teacher once per executor (a later run with the same
        teacher, by name and fingerprint, sends the same reference, and an actor that
        holds it fetches nothing)."""
        ray = self._ray
        keys = [context.key(k) for k in range(len(context.teachers))]
        refs = {}
        for teacher, key in zip(context.teachers, keys, strict=True):
            if isinstance(teacher, Teacher):
                if key not in self._teacher_refs:
                    self._teacher_refs[key] = ray.put(teacher)
                refs[key] = self._teacher_refs[key]
        light = _Shipped(
            context.dataset,
            tuple(None if isinstance(t, Teacher) else t for t in context.teachers),
            tuple(context.entries),
            context.batch_size,
            context.teacher_keys,
            context.expected_rows,
            keys,
        )
        return [ray.put(light), refs]

    def _iter_slots(self) -> list[_Slot]:
        return [s for sets in self._kept.values() for slots in sets for s in slots]

    def _schedule(
        self, ray: Any, runs: list[_PoolRun], report: BuildReport, *, progress: bool
    ) -> None:
        """The one ``ray.wait`` loop over every pool's tasks (see the module docstring)."""
        actor_died = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        # ref -> (pool, slot index, task or None for an "is it up" probe, attempt)
        in_flight: dict[Any, tuple[int, int, ShardTask | None, int]] = {}
        for p, run in enumerate(runs):
            for a, slot in enumerate(run.slots):
                if slot.ready:
                    run.free.append(a)
                else:
                    in_flight[slot.handle.info.remote()] = (p, a, None, 0)
        for run in runs:
            run.free.reverse()  # pop() hands out actor-0 first
        bar = progress_bar(sum(len(r.queue) for r in runs), progress)
        busy: set[tuple[int, int]] = set()
        lost: set[tuple[int, int]] = set()
        last_answer = time.monotonic()
        try:
            while any(r.queue for r in runs) or busy:
                for p, run in enumerate(runs):
                    while run.queue and run.free:
                        a = run.free.pop()
                        todo, attempt = run.queue.popleft()
                        ref = run.slots[a].handle.run.remote(run.shipment, todo)
                        in_flight[ref] = (p, a, todo, attempt)
                        busy.add((p, a))
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=WAIT_LOG_S)
                if not done:
                    if time.monotonic() - last_answer >= WAIT_LOG_S:
                        self._log_waiting(runs)
                    continue
                last_answer = time.monotonic()
                p, a, task, attempt = in_flight.pop(done[0])
                run = runs[p]
                busy.discard((p, a))
                try:
                    result = ray.get(done[0])  # a teacher error (fatal) raises here: stop
                except actor_died as exc:
                    self._replace(run, p, a, task, attempt, exc, in_flight, lost)
                    continue
                if task is None:  # the actor is up
                    run.slots[a].ready = True
                    run.free.append(a)
                    continue
                account(report, run.worker(a), result, bar)
                run.free.append(a)
        except BaseException:
            # Stop at once: kill the actors still busy with this build's shards (and drop
            # dead ones), in every pool, so that nothing is written after the build has
            # failed and let go of its leases. Idle actors stay in their pools.
            self._discard(runs, busy | lost)
            raise
        finally:
            bar.close()
        # The actors stay (with the teachers they loaded from specs); the build's dataset
        # and in-memory teachers are let go.
        releases = {
            r.slots[a].handle.release.remote(): (p, a)
            for p, r in enumerate(runs)
            for a in range(len(r.slots))
            if r.slots[a].ready
        }
        dead = set()
        for ref, (p, a) in releases.items():
            try:
                ray.get(ref)
            except actor_died:
                dead.add((p, a))  # replaced when a later run needs it
        self._discard(runs, dead)

    def _replace(
        self,
        run: _PoolRun,
        p: int,
        a: int,
        task: ShardTask | None,
        attempt: int,
        exc: BaseException,
        in_flight: dict[Any, tuple[int, int, ShardTask | None, int]],
        lost: set[tuple[int, int]],
    ) -> None:
        """An actor died: rerun its shard (or its start) on a fresh actor of the same pool,
        a bounded number of times; the shard's files are idempotent."""
        max_retries = self.config.max_retries
        what = "starting" if task is None else f"on shard {task.shard_index}"
        if attempt >= max_retries:
            lost.add((p, a))
            if task is None:
                raise RetriableError(
                    f"an actor of pool {run.plan.name!r} ({run.plan.describe()}) died "
                    f"{attempt + 1} times while starting ({type(exc).__name__}: {exc}); "
                    "committed shards are kept, rerun the build to resume"
                ) from exc
            raise RetriableError(
                f"shard {task.shard_index} failed {attempt + 1} times in pool "
                f"{run.plan.name!r} because its actor died ({type(exc).__name__}); committed "
                "shards are kept, rerun the build to resume"
            ) from exc
        log.warning(
            "%s died %s (%s); retrying on a new actor (attempt %d of %d)",
            run.worker(a),
            what,
            type(exc).__name__,
            attempt + 2,
            max_retries + 1,
        )
        _kill(self._ray, run.slots[a].handle)
        run.slots[a] = _Slot(self._start_actor(run.plan))
        if task is None:
            in_flight[run.slots[a].handle.info.remote()] = (p, a, None, attempt + 1)
        else:
            run.queue.appendleft((task, attempt + 1))
            in_flight[run.slots[a].handle.info.remote()] = (p, a, None, 0)

    def _discard(self, runs: list[_PoolRun], which: set[tuple[int, int]]) -> None:
        """Kill the actors ``(pool, slot)`` and drop them from their pools."""
        ray = self._ray
        for p, run in enumerate(runs):
            gone = {a for q, a in which if q == p}
            for a in gone:
                _kill(ray, run.slots[a].handle)
            run.slots[:] = [s for a, s in enumerate(run.slots) if a not in gone]

    def _log_waiting(self, runs: list[_PoolRun]) -> None:
        for run in runs:
            if run.queue and not any(s.ready for s in run.slots):
                log.warning(
                    "pool %r: %d shard task(s) wait for an actor (%s) that Ray has not "
                    "placed yet; check the cluster's free resources",
                    run.plan.name,
                    len(run.queue),
                    run.plan.describe(),
                )


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
