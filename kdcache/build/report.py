"""What one teacher-stage call did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass
class BuildReport:
    """What one ``build_cache`` call did.

    Attributes:
        hit: True when every entry already existed (the teacher stage was skipped).
        keys: Entry key per teacher, in ensemble order.
        computed: Number of (teacher, shard) pairs computed by this call.
        reused: Number of (teacher, shard) pairs found already committed (in entries that
            were not complete; complete entries are reused whole and not counted here).
        num_samples: Samples run through teachers by this call (summed over teachers).
        wall_s: Wall time of the call, seconds.
        per_actor: Samples, busy seconds and shard tasks per worker: on Ray
            ``"<pool>/actor-<i>"``, where the pool is ``"default"`` (teachers without
            resources), a group's name or a teacher's name (its own pool); ``"local"``
            in-process. A shard task runs one pool's teachers on one shard.
    """

    hit: bool
    keys: list[str]
    computed: int = 0
    reused: int = 0
    num_samples: int = 0
    wall_s: float = 0.0
    per_actor: dict[str, dict[str, float]] = field(default_factory=dict)

    def record(self, worker: str, stats: Mapping[str, float]) -> None:
        """Add one finished shard task to the totals.

        Args:
            worker: Who ran it (``"default/actor-0"``, ``"local"``).
            stats: The task's ``{"samples": ..., "seconds": ...}``
                (:func:`kdcache.build.task.compute_shard`).
        """
        slot = self.per_actor.setdefault(worker, {"samples": 0.0, "seconds": 0.0, "shards": 0.0})
        slot["samples"] += stats["samples"]
        slot["seconds"] += stats["seconds"]
        slot["shards"] += 1
        self.num_samples += int(stats["samples"])
