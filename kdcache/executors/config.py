"""The teacher stage's execution settings: :class:`ExecutorConfig`, one object for the Python
API, config files and pipelines alike; none of its settings change a cache key or the bytes
written."""

from __future__ import annotations

from kdcache.errors import ConfigError
from kdcache.validation import config_dataclass


@config_dataclass
class ExecutorConfig:
    """How the teacher stage runs (none of this changes the cache key).

    The actor settings (``num_actors``, ``cpus_per_actor``, ``gpus_per_actor``) size the
    *default pool*: the Ray actors shared by every teacher without
    :class:`~kdcache.teachers.TeacherResources` (several small teachers per actor, each
    shard read once for all of them). A teacher with resources, or a group of teachers,
    runs in a pool of its own whose actors ask for those resources; the fields it leaves
    unset (CPUs, GPUs) fall back to these (:mod:`kdcache.executors.pools`).

    Attributes:
        kind: ``"ray"`` (actors; a local Ray when no cluster is given) or ``"local"``
            (this process, every pool's teachers; for debugging and tests without Ray).
        address: Ray cluster address; None uses ``RAY_ADDRESS`` or starts a local Ray.
        num_actors: Actors of the default pool; None: one per ``cpus_per_actor`` CPUs of
            what the cluster has left beside the other pools, at most one per shard.
        cpus_per_actor: CPUs each default-pool actor requests (and torch threads it
            uses), > 0; also the default of pools that set no CPUs.
        gpus_per_actor: GPUs each default-pool actor requests, >= 0 (fractional shares
            one GPU); also the default of pools that set no GPUs.
        batch_size: Records per teacher forward pass, >= 1 (every pool).
        max_retries: Retries of a shard after a retriable failure (its actor died),
            within its pool, >= 0.

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
