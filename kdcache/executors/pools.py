"""Actor pools of the teacher stage: which teachers share actors, and with what resources.

A build's teachers are split into pools by their :class:`kdcache.teachers.TeacherResources`:

- teachers without resources share the *default* pool, sized by
  :class:`kdcache.ExecutorConfig` (``num_actors``, ``cpus_per_actor``,
  ``gpus_per_actor``): several small teachers per actor, each shard read once for all;
- teachers with the same ``group`` share the pool of that name, with the resources its
  members set (they must agree; unset fields fall back to the ``ExecutorConfig``);
- a teacher with resources and no group gets a pool of its own, named after it.

Pools are listed in the order of their first teacher. Which pool a teacher is in changes
where it runs, never its cache key or bytes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from kdcache.errors import ConfigError
from kdcache.executors.config import ExecutorConfig
from kdcache.teachers.spec import TeacherResources

#: Name of the pool of the teachers without resources.
DEFAULT_POOL = "default"

_FIELDS = ("num_actors", "cpus_per_actor", "gpus_per_actor", "memory_bytes")


@dataclasses.dataclass(frozen=True)
class PoolPlan:
    """One actor pool of a build.

    Attributes:
        name: ``"default"``, the group's name, or the teacher's name (its own pool);
            workers are reported as ``"<name>/actor-<i>"``.
        teachers: Indices (into the build's teachers) of the pool's teachers, in order.
        num_actors: Actors requested; None: a share of the cluster (see
            :func:`pool_sizes`).
        cpus_per_actor: Ray ``num_cpus`` per actor (> 0; also its torch threads).
        gpus_per_actor: Ray ``num_gpus`` per actor (>= 0; > 0 runs on CUDA).
        memory_bytes: Ray ``memory`` per actor in bytes, or None (not requested).
    """

    name: str
    teachers: tuple[int, ...]
    num_actors: int | None
    cpus_per_actor: float
    gpus_per_actor: float
    memory_bytes: int | None

    @property
    def resources_key(self) -> tuple[float, float, int | None]:
        """What an actor of this pool asks Ray for; actors are kept between runs by it."""
        return (self.cpus_per_actor, self.gpus_per_actor, self.memory_bytes)

    def describe(self) -> str:
        mem = "" if self.memory_bytes is None else f", {self.memory_bytes / 2**20:.0f} MiB"
        return f"{self.cpus_per_actor:g} CPU, {self.gpus_per_actor:g} GPU{mem} per actor"


def _resources(teacher: Any) -> TeacherResources | None:
    r = getattr(teacher, "resources", None)
    if r is None or r.is_default:
        return None
    if not isinstance(r, TeacherResources):
        raise ConfigError(
            f"teacher {teacher.name!r}: resources must be a kdcache.teachers.TeacherResources, "
            f"got {type(r).__name__}"
        )
    return r


def plan_pools(teachers: Sequence[Any], config: ExecutorConfig) -> list[PoolPlan]:
    """Split a build's teachers into actor pools (see the module docstring).

    Args:
        teachers: The build's :class:`kdcache.Teacher` / ``TeacherSpec`` objects (their
            optional ``resources`` attribute decides the pool).
        config: The executor's settings: the default pool's resources, and the fallback
            of every field a pool leaves unset.

    Returns:
        The pools, in the order of their first teacher; every teacher is in exactly one.

    Raises:
        ConfigError: members of one group ask for different resources, or two pools
            would have the same name (a group named like a teacher with a pool of its own,
            or ``"default"``).
    """
    members: dict[str, list[int]] = {}
    kinds: dict[str, str] = {}  # pool name -> "default" / "group" / "teacher"
    asked: dict[str, dict[str, tuple[Any, str]]] = {}  # pool -> field -> (value, teacher)
    for k, t in enumerate(teachers):
        r = _resources(t)
        if r is None:
            name, kind = DEFAULT_POOL, "default"
        elif r.group is not None:
            name, kind = r.group, "group"
        else:
            name, kind = t.name, "teacher"
        if kinds.setdefault(name, kind) != kind:
            raise ConfigError(
                f"two actor pools would be named {name!r}: the "
                f"{_kind_text(kinds[name], name)} and the {_kind_text(kind, name)}; rename the "
                "group (TeacherResources(group=...)) or the teacher"
            )
        members.setdefault(name, []).append(k)
        if r is None:
            continue
        seen = asked.setdefault(name, {})
        for field in _FIELDS:
            value = getattr(r, field)
            if value is None:
                continue
            if field in seen and seen[field][0] != value:
                raise ConfigError(
                    f"teachers {seen[field][1]!r} and {t.name!r} of group {name!r} ask for "
                    f"different {field} ({seen[field][0]!r} and {value!r}); one group is one "
                    "actor pool: give its members the same resources, or set them on one only"
                )
            seen.setdefault(field, (value, t.name))
    plans = []
    for name, idx in members.items():
        fields: dict[str, Any] = {f: v for f, (v, _) in asked.get(name, {}).items()}
        default = kinds[name] == "default"
        gpus = fields.get("gpus_per_actor")
        plans.append(
            PoolPlan(
                name=name,
                teachers=tuple(idx),
                num_actors=config.num_actors if default else fields.get("num_actors"),
                cpus_per_actor=float(fields.get("cpus_per_actor") or config.cpus_per_actor),
                gpus_per_actor=float(config.gpus_per_actor if gpus is None else gpus),
                memory_bytes=fields.get("memory_bytes"),
            )
        )
    return plans


def _kind_text(kind: str, name: str) -> str:
    if kind == "default":
        return "default pool (teachers without resources)"
    if kind == "group":
        return f"group {name!r}"
    return f"own pool of teacher {name!r}"


def pool_sizes(
    plans: Sequence[PoolPlan], num_tasks: Sequence[int], cluster: Mapping[str, float]
) -> list[int]:
    """Actors per pool for one run.

    A pool with ``num_actors`` gets that many; the pools without it share what the
    cluster has left of its CPUs (and GPUs, and memory, for pools that ask for them)
    evenly, at least one actor each. No pool gets more actors than it has tasks. With the
    default pool alone this is one actor per ``cpus_per_actor`` CPUs of the cluster, at
    most one per GPU share.

    Args:
        plans: The run's pools.
        num_tasks: Shard tasks per pool, aligned with ``plans`` (each >= 1).
        cluster: ``ray.cluster_resources()`` (``"CPU"``, ``"GPU"``, ``"memory"``).

    Returns:
        Actors per pool, aligned with ``plans``, each >= 1.
    """
    totals = {
        "CPU": float(cluster.get("CPU", 1)),
        "GPU": float(cluster.get("GPU", 0)),
        "memory": float(cluster.get("memory", 0)),
    }
    used = dict.fromkeys(totals, 0.0)
    for p, n in zip(plans, num_tasks, strict=True):
        if p.num_actors is not None:
            for res, per in _asks(p):
                used[res] += min(p.num_actors, n) * per
    auto = [p for p in plans if p.num_actors is None]
    sizes = []
    for p, n in zip(plans, num_tasks, strict=True):
        if p.num_actors is not None:
            sizes.append(max(1, min(p.num_actors, n)))
            continue
        size = n
        for res, per in _asks(p):
            if per <= 0:
                continue
            sharing = sum(1 for q in auto if any(r == res and v > 0 for r, v in _asks(q)))
            left = max(0.0, totals[res] - used[res]) / max(1, sharing)
            size = min(size, max(1, int(left // per)))
        sizes.append(max(1, size))
    return sizes


def _asks(plan: PoolPlan) -> list[tuple[str, float]]:
    asks = [("CPU", plan.cpus_per_actor), ("GPU", plan.gpus_per_actor)]
    if plan.memory_bytes is not None:
        asks.append(("memory", float(plan.memory_bytes)))
    return asks


def unplaceable(plan: PoolPlan, cluster: Mapping[str, float]) -> list[str]:
    """What one actor of ``plan`` asks for beyond the whole cluster's total (empty when
    it fits); e.g. ``["1 GPU (the cluster has 0)"]``."""
    out = []
    names = {"CPU": "CPU", "GPU": "GPU", "memory": "bytes of memory"}
    for res, per in _asks(plan):
        have = float(cluster.get(res, 0))
        if per > have:
            out.append(f"{per:g} {names[res]} (the cluster has {have:g})")
    return out
