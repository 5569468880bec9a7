"""The teacher-stage job: a typed :class:`~kdcache.jobs.config.BuildConfig` turned into a
``build_cache`` call."""

from __future__ import annotations

from kdcache.build.stage import build_cache, planned_key
from kdcache.data.base import dataset_layout
from kdcache.errors import ConfigError
from kdcache.jobs.config import BuildConfig, check_teachers_for_layout
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView
from kdcache.teachers.teacher import TeacherEnsemble


def build_from_config(
    config: BuildConfig, *, progress: bool = True, move_alias: bool = False
) -> CacheEntry | EnsembleView:
    """Run a teacher-stage job described by a :class:`kdcache.jobs.config.BuildConfig`.

    Builds the dataset and teachers the config names, calls :func:`build_cache`, and
    points ``config.alias`` (if set) at the result. An alias that already names another
    key (the config or its overrides changed what is built) is left alone unless
    ``move_alias``: the build is refused before any work (the key is computed from the
    fingerprints first, :func:`kdcache.build.stage.planned_key`), and the error says so.

    Args:
        config: The job.
        progress: Progress bars.
        move_alias: Re-point ``config.alias`` when it names another key.

    Raises:
        ConfigError: the config names something that cannot be imported or loaded; a
            Hugging Face teacher that is not a causal LM over a token dataset; or
            ``config.alias`` names another key and ``move_alias`` is False.
        Everything :func:`build_cache` raises.
    """
    from kdcache.stores.catalog import alias_target, write_alias

    dataset = config.dataset.build()
    check_teachers_for_layout(config.teachers, dataset_layout(dataset), "the dataset")
    teachers = [t.build() for t in config.teachers]
    ensemble = TeacherEnsemble(teachers, rule=config.ensemble.to_rule([t.name for t in teachers]))
    if config.alias and not move_alias:
        # Before any work: an alias that names another key refuses the build up front.
        key = planned_key(
            dataset,
            ensemble,
            temperature=config.targets.temperature,
            storage_dtype=config.targets.storage_dtype,
            backend=config.targets.backend,
            kind=config.targets.kind,
            params=config.targets.params,
        )
        old = alias_target(config.root, config.alias)
        if old is not None and old != key:
            raise ConfigError(
                f"alias {config.alias!r} points at key {old}, but this build would make key "
                f"{key} (the config or its overrides changed what is built); nothing was "
                f"built. Pass --move-alias (move_alias=True) to build it and re-point "
                f"{config.alias!r}, or set another alias"
            )
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
        old = alias_target(config.root, config.alias)
        if old is not None and old != cache.key and not move_alias:
            raise ConfigError(
                f"alias {config.alias!r} points at key {old}, but this build made key "
                f"{cache.key} (built and kept: a rerun is a cache hit); pass --move-alias "
                f"(move_alias=True) to re-point {config.alias!r} at {cache.key}, or set "
                "another alias"
            )
        write_alias(config.root, config.alias, cache.key, kind, move=move_alias)
    return cache
