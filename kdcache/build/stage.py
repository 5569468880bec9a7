"""The teacher stage: plan the work, hand it to an executor, commit.

``build_cache`` makes one cache entry per teacher over a sharded dataset. It is
idempotent and resumable: entries with a manifest are reused (a *hit*), and of an
interrupted entry only the shards without a commit record are computed (the executor's
base class, :class:`kdcache.executors.Executor`, skips the committed ones).
"""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from typing import Any

import torch

from kdcache import schema
from kdcache._version import __version__
from kdcache.build.report import BuildReport
from kdcache.build.task import check_teacher_vocabularies
from kdcache.data.base import ShardedDataset, dataset_layout, declared_shard_records
from kdcache.errors import DataError
from kdcache.executors import Executor, ExecutorConfig, TaskContext, get_executor
from kdcache.schema import TargetSpec
from kdcache.stores.entry import CacheEntry
from kdcache.stores.lease import Lease, _LeaseKeeper
from kdcache.stores.view import EnsembleView, view_json
from kdcache.teachers.spec import TeacherSpec
from kdcache.teachers.teacher import Teacher, TeacherEnsemble

log = logging.getLogger(__name__)

#: What ``build_cache`` accepts as its teachers.
Teachers = Teacher | TeacherSpec | TeacherEnsemble | Sequence[Teacher | TeacherSpec]


def _as_ensemble(teachers: Teachers) -> TeacherEnsemble:
    if isinstance(teachers, TeacherEnsemble):
        return teachers
    if isinstance(teachers, Teacher | TeacherSpec):
        return TeacherEnsemble([teachers])
    return TeacherEnsemble(list(teachers))


def build_cache(
    dataset: ShardedDataset,
    teachers: Teachers,
    *,
    temperature: float,
    root: str,
    storage_dtype: str = "float32",
    backend: str = "arrow",
    executor: str | ExecutorConfig | Executor = "ray",
    lease_ttl_s: float = 600.0,
    progress: bool = True,
    kind: str = "dense",
    params: dict[str, Any] | None = None,
) -> CacheEntry | EnsembleView:
    """Cache every teacher's scaled logits over ``dataset`` and return the cache.

    Each teacher gets its own entry keyed by (dataset fingerprint, teacher fingerprint,
    target spec); entries already complete are reused, so adding a teacher to an ensemble
    computes only that teacher, and a rerun after an interruption computes only the
    shards not yet committed.

    Args:
        dataset: A :class:`kdcache.data.ShardedDataset` (picklable).
        teachers: A teacher, a list of teachers, or a :class:`TeacherEnsemble`; each a
            :class:`kdcache.Teacher` (in memory, shipped to each actor with its weights:
            the path for small teachers) or a :class:`kdcache.teachers.TeacherSpec`
            (described by its files and loaded on the actors, never here: the path for
            large teachers), mixed freely. The key of a spec's entry comes from
            ``spec.fingerprint()`` (a hash of its files), a Teacher's from
            ``teacher.fingerprint()`` (a hash of its state dict). Teachers with
            :class:`~kdcache.teachers.TeacherResources` run in actor pools of their own
            on Ray (:mod:`kdcache.executors.pools`).
        temperature: tau > 0; entries store ``logits / tau`` and tau is in the key.
        root: Cache root: local path, ``file://`` or another pyarrow filesystem URI.
        storage_dtype: ``"float32"`` or ``"float16"`` (values out of range are refused).
        backend: Storage backend (``"arrow"``).
        executor: Where the shard tasks run: ``"ray"`` (actors; a local Ray when no
            cluster is given) or ``"local"`` (this process; for debugging and tests
            without Ray), with default settings; an :class:`ExecutorConfig` (address,
            actors, CPUs and GPUs per actor, batch size, retries); or an
            :class:`~kdcache.executors.Executor`, which is used and left open (a
            :class:`~kdcache.executors.RayExecutor` keeps its actors, and the teachers
            they loaded from specs, for the next build). An executor made here from a
            name or a config is closed on return.
            None of this changes the key or the bytes.
        lease_ttl_s: Seconds before a crashed job's lease can be taken over.
        progress: Show a progress bar.
        kind: Target kind, ``"dense"`` (default: all V scaled logits per row) or a sparse
            kind ``"topk"``, ``"topp"``, ``"sampled"`` (:class:`kdcache.schema.TargetSpec`).
        params: Sparsification parameters of ``kind`` (``{"k": 32}``, ``{"top_p": 0.9,
            "max_k": 64}``, ``{"num_samples": 24, "seed": 0}``, optionally ``labels``
            and ``grid_temperatures``); part of the key. None for dense, so dense keys
            are unchanged.

    Token datasets (``layout = "tokens"``, such as :class:`kdcache.TokenDataset`) get one
    row per target position: teachers return logits
    [B, T, V], position t's row holds the distribution of token t + 1, prompt and padding
    positions are skipped, and targets are sparsified per batch (``docs/format.md``,
    "Token-level entries"). Their teachers must share one vocabulary and tokenizer.

    Returns:
        A :class:`CacheEntry` for one teacher, else an :class:`EnsembleView` (saved under
        ``<root>/ensembles/``). Its ``build_report`` attribute is a :class:`BuildReport`.

    Raises:
        ConfigError: bad temperature, dtype, backend, executor, kind or params; teachers
            whose vocabularies or tokenizers differ (token datasets); teachers'
            resources that do not form pools (a group whose members disagree).
        MissingDependencyError: a Ray executor without Ray installed (before anything is
            written).
        TeacherOutputError: a teacher returned NaN/inf or a wrong shape (names the
            teacher and the sample); everything committed before stays committed.
        LeaseHeldError: another job is building the same entry and did not finish in time.
    """
    # First: a Ray executor checks that Ray is installed, before anything is written.
    ex = get_executor(executor)
    try:
        return _build(
            dataset,
            teachers,
            ex,
            temperature=temperature,
            root=root,
            storage_dtype=storage_dtype,
            backend=backend,
            lease_ttl_s=lease_ttl_s,
            progress=progress,
            kind=kind,
            params=params,
        )
    finally:
        if ex is not executor:
            ex.close()


def _build(
    dataset: ShardedDataset,
    teachers: Teachers,
    ex: Executor,
    *,
    temperature: float,
    root: str,
    storage_dtype: str,
    backend: str,
    lease_ttl_s: float,
    progress: bool,
    kind: str,
    params: dict[str, Any] | None,
) -> CacheEntry | EnsembleView:
    started = time.perf_counter()
    ensemble = _as_ensemble(teachers)
    spec = TargetSpec(
        temperature=temperature,
        storage_dtype=storage_dtype,
        backend=backend,
        kind=kind,
        params=params,
    )
    if dataset_layout(dataset) == "tokens":
        check_teacher_vocabularies(ensemble, dataset)
    dataset_fp = dataset.fingerprint()
    expected_rows = planned_rows(dataset, dataset_fp)
    # Once per teacher: a spec's fingerprint hashes its weight files (memoised per process).
    teacher_fps = [teacher.fingerprint() for teacher in ensemble]
    entries = []
    token_level = dataset_layout(dataset) == "tokens"
    for material in _key_materials(dataset_fp, teacher_fps, spec, token_level=token_level):
        entry = CacheEntry(root, schema.content_key(material))
        entry.write_spec(material)
        entries.append(entry)

    leases: list[Lease] = []
    building: list[int] = []  # indices of the entries this call holds a lease on
    report = BuildReport(hit=False, keys=[e.key for e in entries], one_vocab=len(entries) > 1)
    keeper = _LeaseKeeper(leases, interval_s=max(1.0, lease_ttl_s / 3))
    try:
        for k, entry in enumerate(entries):
            if entry.is_complete:
                if not entry.uncommit_damaged():
                    continue
            lease = Lease(entry, ttl_s=lease_ttl_s)
            if not lease.acquire():
                continue  # another job completed it while we waited
            leases.append(lease)
            building.append(k)
        todo = [e for e in entries if not e.is_complete]
        if not todo:
            report.hit = True
            log.info(
                "cache hit: all %d teacher entries exist under %s; teacher stage skipped",
                len(entries),
                root,
            )
        else:
            done = len(entries) - len(todo)
            if done:
                log.info(
                    "%d of %d teacher entries already complete; building the others",
                    done,
                    len(entries),
                )
            keeper.start()
            batch_size = ex.config.batch_size
            if building:
                # Every shard of every entry being built is a candidate; the executor's base
                # skips the (teacher, shard) pairs already committed.
                context = TaskContext(
                    dataset,
                    ensemble.teachers,
                    entries,
                    batch_size,
                    teacher_keys=[schema.content_key(fp) for fp in teacher_fps],
                    expected_rows=expected_rows,
                )
                tasks = [(i, building) for i in range(dataset.num_shards)]
                ex.run(context, tasks, report, progress=progress)
            info = {
                "temperature": spec.temperature,
                "versions": {
                    "kdcache": __version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "build": {"executor": ex.name, "batch_size": batch_size},
            }
            for teacher, teacher_fp, entry in zip(ensemble, teacher_fps, entries, strict=True):
                if not entry.is_complete:
                    entry.commit(
                        dataset.num_shards,
                        {**info, "teacher_name": teacher.name, "teacher": teacher_fp},
                    )
    finally:
        keeper.stop()
        for lease in leases:
            lease.release()
    report.wall_s = time.perf_counter() - started
    if not report.hit:
        _log_summary(report, ensemble, entries)
    cache: CacheEntry | EnsembleView
    if len(entries) == 1:
        cache = entries[0]
    else:
        cache = EnsembleView(entries, ensemble.ensemble_rule)
        cache.save()
    cache.build_report = report  # type: ignore[union-attr]
    return cache


def planned_rows(dataset: ShardedDataset, fingerprint: dict[str, Any]) -> list[int] | None:
    """Rows per shard as the dataset's fingerprint declares them, checked before any work.

    Returns:
        ``fingerprint["shards"][i]["num_records"]`` for every shard, or None when the
        fingerprint does not list shards with their records (then nothing is checked).

    Raises:
        DataError: the dataset has no shards, declares a shard without records, or lists
            another number of shards than ``num_shards``; nothing is computed.
    """
    name = type(dataset).__name__
    if dataset.num_shards < 1:
        raise DataError(
            f"{name} has no shards (an empty dataset): there is nothing to cache; check the "
            "dataset's path, filter or factory"
        )
    rows = declared_shard_records(fingerprint)
    if rows is None:
        return None
    if len(rows) != dataset.num_shards:
        raise DataError(
            f"{name} has num_shards={dataset.num_shards} but its fingerprint lists "
            f"{len(rows)} shards; fix the dataset (the two must agree)"
        )
    empty = [i for i, n in enumerate(rows) if n < 1]
    if empty:
        raise DataError(
            f"{name}: shard(s) {', '.join(map(str, empty[:10]))} declare no records; every "
            "shard needs at least one (fewer shards, or drop the empty ones); nothing was "
            "computed"
        )
    return rows


def _key_materials(
    dataset_fp: dict[str, Any],
    teacher_fps: list[dict[str, Any]],
    spec: TargetSpec,
    *,
    token_level: bool,
) -> list[dict[str, Any]]:
    """The key material of each teacher's entry (what its ``spec.json`` holds and its key
    hashes): one definition for :func:`build_cache` and :func:`planned_key`."""
    return [schema.entry_spec(dataset_fp, fp, spec, token_level=token_level) for fp in teacher_fps]


def planned_key(
    dataset: ShardedDataset,
    teachers: Teacher | TeacherSpec | TeacherEnsemble | Sequence[Teacher | TeacherSpec],
    *,
    temperature: float,
    storage_dtype: str = "float32",
    backend: str = "arrow",
    kind: str = "dense",
    params: dict[str, Any] | None = None,
) -> str:
    """The key :func:`build_cache` with these arguments returns (an entry's for one
    teacher, the ensemble view's for several), computed without building or writing
    anything: from the fingerprints alone (a spec's weight files are hashed, memoised).

    Raises:
        ConfigError: as :func:`build_cache`, for bad target settings.
    """
    ensemble = _as_ensemble(teachers)
    spec = TargetSpec(
        temperature=temperature,
        storage_dtype=storage_dtype,
        backend=backend,
        kind=kind,
        params=params,
    )
    materials = _key_materials(
        dataset.fingerprint(),
        [t.fingerprint() for t in ensemble],
        spec,
        token_level=dataset_layout(dataset) == "tokens",
    )
    keys = [schema.content_key(m) for m in materials]
    if len(keys) == 1:
        return keys[0]
    return schema.content_key(view_json(keys, ensemble.ensemble_rule))


def _log_summary(report: BuildReport, ensemble: TeacherEnsemble, entries: list[CacheEntry]) -> None:
    num_bytes = sum(e.num_bytes for e in entries if e.is_complete)
    log.info(
        "teacher stage done: %d teacher(s), %d (teacher, shard) computed, %d reused, "
        "%d samples, %.1f MB in the entries, %.1fs wall, %.0f samples/s",
        len(ensemble),
        report.computed,
        report.reused,
        report.num_samples,
        num_bytes / 1e6,
        report.wall_s,
        report.num_samples / max(report.wall_s, 1e-9),
    )
    for actor, slot in sorted(report.per_actor.items()):
        log.info(
            "  %s: %d shard(s), %d samples, %.0f samples/s while busy",
            actor,
            slot["shards"],
            slot["samples"],
            slot["samples"] / max(slot["seconds"], 1e-9),
        )
