"""What one teacher-stage call did."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from kdcache.errors import TeacherOutputError

#: Prefix of the stats keys by which a shard task reports each teacher's output width V
#: (``"vocab_size/<teacher name>"``).
VOCAB_KEY = "vocab_size/"


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
    #: Output width V of each teacher, from the first shard it finished.
    vocab_sizes: dict[str, int] = field(default_factory=dict)
    #: The teachers make one ensemble (a view over all entries), so they must share V.
    one_vocab: bool = False

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
        for key, value in stats.items():
            if key.startswith(VOCAB_KEY):
                self.vocab_sizes.setdefault(key[len(VOCAB_KEY) :], int(value))

    def check_vocab_sizes(self) -> None:
        """Stop the build as soon as two teachers of one ensemble are seen to output
        different widths (not after every shard of both was computed).

        Raises:
            TeacherOutputError: names each teacher and its V.
        """
        if not self.one_vocab or len(set(self.vocab_sizes.values())) <= 1:
            return
        sizes = ", ".join(f"{name!r}: V={v}" for name, v in sorted(self.vocab_sizes.items()))
        raise TeacherOutputError(
            f"the teachers of this ensemble output different numbers of classes ({sizes}); "
            "an ensemble combines distributions over one label space. Build each teacher on "
            "its own (one build_cache call per teacher), or fix the teachers' heads; the "
            "shards committed so far are kept"
        )
