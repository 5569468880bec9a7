"""The teacher stage's execution settings: :class:`ExecutorConfig`, one object for the Python
API, config files and pipelines alike; none of its settings change a cache key or the bytes
written."""

from __future__ import annotations

from kdcache.errors import ConfigError
from kdcache.validation import config_dataclass


@config_dataclass
class ExecutorConfig:
    """How the teacher stage runs (none of this changes the cache key).

    Attributes:
        kind: ``"ray"`` (actors; a local Ray when no cluster is given) or ``"local"``
            (this process; for debugging and tests without Ray).
        address: Ray cluster address; None uses ``RAY_ADDRESS`` or starts a local Ray.
        num_actors: Ray actors; None: one per ``cpus_per_actor`` CPUs, at most one per shard.
        cpus_per_actor: CPUs each actor requests (and torch threads it uses), > 0.
        gpus_per_actor: GPUs each actor requests, >= 0 (fractional shares one GPU).
        batch_size: Records per teacher forward pass, >= 1.
        max_retries: Retries of a shard after a retriable failure, >= 0.

    Raises:
        ConfigError: a value of the wrong type, an unknown key, or one out of range.
    """

    kind: str = "ray"
    address: str | None = None
    num_actors: int | None = None
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    batch_size: int = 1024
    max_retries: int = 2

    def __post_init__(self) -> None:
        if self.kind not in ("ray", "local"):
            raise ConfigError(f"executor.kind must be 'ray' or 'local', got {self.kind!r}")
        if self.batch_size < 1 or self.max_retries < 0 or self.cpus_per_actor <= 0:
            raise ConfigError("executor: batch_size >= 1, max_retries >= 0, cpus_per_actor > 0")
        if self.gpus_per_actor < 0:
            raise ConfigError(f"executor.gpus_per_actor must be >= 0, got {self.gpus_per_actor}")
        if self.num_actors is not None and self.num_actors < 1:
            raise ConfigError(f"executor.num_actors must be >= 1, got {self.num_actors}")
