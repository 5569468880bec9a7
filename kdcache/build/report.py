"""What one teacher-stage call did."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class BuildReport:
    """What one ``build_cache`` call did.

    Attributes:
        hit: True when every entry already existed (the teacher stage was skipped).
        keys: Entry key per teacher, in ensemble order.
        computed: Number of (teacher, shard) pairs computed by this call.
        reused: Number of (teacher, shard) pairs found already committed.
        num_samples: Samples run through teachers by this call (summed over teachers).
        wall_s: Wall time of the call, seconds.
        per_actor: Samples and busy seconds per actor (or "local").
    """

    hit: bool
    keys: list[str]
    computed: int = 0
    reused: int = 0
    num_samples: int = 0
    wall_s: float = 0.0
    per_actor: dict[str, dict[str, float]] = field(default_factory=dict)
