"""The teacher-stage job: a typed :class:`~kdcache.jobs.config.BuildConfig` turned into a
``build_cache`` call."""

from __future__ import annotations

from kdcache.build.stage import build_cache
from kdcache.jobs.config import BuildConfig
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView
from kdcache.teachers.teacher import TeacherEnsemble


def build_from_config(config: BuildConfig, *, progress: bool = True) -> CacheEntry | EnsembleView:
    """Run a teacher-stage job described by a :class:`kdcache.jobs.config.BuildConfig`.

    Builds the dataset and teachers the config names, calls :func:`build_cache`, and
    points ``config.alias`` (if set) at the result.

    Raises:
        ConfigError: the config names something that cannot be imported or loaded.
        Everything :func:`build_cache` raises.
    """
    from kdcache.stores.catalog import write_alias

    dataset = config.dataset.build()
    teachers = [t.build() for t in config.teachers]
    ensemble = TeacherEnsemble(teachers, weights=config.ensemble.weights, rule=config.ensemble.rule)
    cache = build_cache(
        dataset,
        ensemble,
        temperature=config.targets.temperature,
        root=config.root,
        storage_dtype=config.targets.storage_dtype,
        backend=config.targets.backend,
        kind=config.targets.kind,
        params=config.targets.params,
        executor=config.executor,
        progress=progress,
    )
    if config.alias:
        kind = "ensemble" if isinstance(cache, EnsembleView) else "entry"
        write_alias(config.root, config.alias, cache.key, kind)
    return cache
