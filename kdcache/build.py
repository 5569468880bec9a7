"""The teacher stage: plan the work, run it (in-process or on Ray actors), commit.

``build_cache`` makes one cache entry per teacher over a sharded dataset. It is
idempotent and resumable: entries with a manifest are reused (a *hit*), and of an
interrupted entry only the shards without a commit record are computed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kdcache import __version__, schema, targets
from kdcache.cache import CacheEntry, EnsembleView, Lease
from kdcache.config import BuildConfig
from kdcache.data import ShardedDataset
from kdcache.errors import ConfigError, RetriableError, TeacherOutputError
from kdcache.schema import TargetSpec
from kdcache.teachers import Teacher, TeacherEnsemble

log = logging.getLogger(__name__)

EXECUTORS = ("ray", "local")


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


def compute_shard(
    dataset: ShardedDataset,
    teachers: Sequence[Teacher],
    entries: Sequence[CacheEntry],
    shard_index: int,
    batch_size: int,
) -> dict[str, float]:
    """Run ``teachers`` over one input shard and commit one output shard per teacher.

    This is the unit of work of every executor. It is idempotent: rerunning it rewrites
    byte-identical files under the same names.

    Returns:
        ``{"samples": rows x teachers, "seconds": wall time}``.

    Raises:
        TeacherOutputError: NaN/inf or wrong shape (fatal; names teacher and sample).
    """
    start = time.perf_counter()
    shard = dataset.read_shard(shard_index)
    ids = np.array(shard["sample_id"], dtype=np.int64)  # a writable copy
    if "token_offsets" in shard:
        num_rows = 0
        for teacher, entry in zip(teachers, entries, strict=True):
            num_rows = _compute_token_shard(shard, teacher, entry, shard_index, batch_size)
        return {
            "samples": float(len(ids) * len(teachers)),
            "seconds": time.perf_counter() - start,
            "tokens": float(num_rows * len(teachers)),
        }
    inputs = shard["inputs"]
    labels = shard.get("labels")
    for teacher, entry in zip(teachers, entries, strict=True):
        spec = TargetSpec.from_json(entry.spec["targets"])
        parts: list[Any] = []
        width = 0
        for lo in range(0, len(ids), batch_size):
            batch_ids = ids[lo : lo + batch_size]
            logits = teacher.logits(inputs[lo : lo + batch_size])
            if logits.dim() != 2:
                raise TeacherOutputError(
                    f"teacher {teacher.name!r} returned {tuple(logits.shape)} for a dataset "
                    "of whole samples; expected logits [B, V] (token models need a "
                    "TokenDataset, see kdcache.text)"
                )
            targets.check_finite(
                logits, teacher=teacher.name, sample_ids_B=torch.from_numpy(batch_ids)
            )
            scaled = targets.scale_logits(logits, spec.temperature)
            width = int(scaled.shape[1])
            if not spec.is_sparse:
                parts.append(scaled.numpy())
                continue
            # Sparse kinds for classifiers with many classes: sparsified per batch, so no
            # shard-sized [N, V] array is held; the label is kept when the spec asks.
            batch_labels = None
            if spec.param("labels") and labels is not None:
                batch_labels = torch.from_numpy(np.asarray(labels[lo : lo + batch_size]))
            parts.append(sparsify(scaled, spec, labels_M=batch_labels, row_sample_ids_M=batch_ids))
        if spec.is_sparse:
            if not parts:
                raise ConfigError(f"shard {shard_index} is empty; a sparse entry needs rows")
            entry.write_shard(shard_index, ids, concat_sparse(parts), vocab_size=width)
        else:
            values = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
            entry.write_shard(shard_index, ids, values)
    return {"samples": float(len(ids) * len(teachers)), "seconds": time.perf_counter() - start}


#: Most logits (B x T x V floats) one teacher forward pass may return on the token path:
#: 2^26 float32 = 256 MiB; a batch of long sequences is split to stay under it.
MAX_LOGITS_PER_PASS = 1 << 26


def _sample_seed(seed: int, sample_id: int) -> int:
    """A 63-bit generator seed from (spec seed, sample_id): draws do not depend on the
    batch size, the shard layout or the actor that runs the sample."""
    digest = hashlib.sha256(f"{int(seed)}:{int(sample_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sparsify(
    scaled_MV: torch.Tensor,
    spec: TargetSpec,
    *,
    labels_M: torch.Tensor | None = None,
    row_sample_ids_M: np.ndarray | None = None,
) -> targets.SparseTargets | np.ndarray:
    """The targets of ``spec`` for M rows of scaled logits (one row per token or sample).

    Args:
        scaled_MV: float32 ``z / tau``, shape [M, V].
        spec: The entry's :class:`TargetSpec` (kind and params).
        labels_M: int64 [M] true next tokens / labels; kept in an extra slot when the spec
            has ``labels: true``.
        row_sample_ids_M: int64 [M] sample of each row; ``sampled`` draws use a generator
            seeded by (``seed`` param, sample_id), so bytes do not depend on batching.

    Returns:
        float32 numpy [M, V] for ``dense``; else :class:`kdcache.targets.SparseTargets`.

    Raises:
        ConfigError: ``mixture`` (made by combining entries, never by a teacher).
    """
    if spec.kind == "dense":
        return scaled_MV.numpy()
    labels = labels_M if spec.param("labels", False) else None
    grid: dict[str, Any] = {
        "temperature": spec.temperature,
        "grid_temperatures": spec.grid_temperatures,
    }
    if spec.kind == "topk":
        return targets.topk_targets(scaled_MV, int(spec.param("k")), labels_B=labels, **grid)
    if spec.kind == "topp":
        return targets.topp_targets(
            scaled_MV,
            float(spec.param("top_p")),
            min_k=int(spec.param("min_k", 1)),
            max_k=int(spec.param("max_k")),
            labels_B=labels,
            **grid,
        )
    if spec.kind == "sampled":
        n = int(spec.param("num_samples"))
        seed = int(spec.param("seed", 0))
        if row_sample_ids_M is None:
            gen = torch.Generator().manual_seed(seed)
            return targets.sampled_targets(scaled_MV, n, labels_B=labels, generator=gen, **grid)
        parts = []
        bounds = np.flatnonzero(np.diff(row_sample_ids_M)) + 1
        for lo, hi in zip(
            [0, *bounds.tolist()], [*bounds.tolist(), len(row_sample_ids_M)], strict=True
        ):
            gen = torch.Generator().manual_seed(_sample_seed(seed, int(row_sample_ids_M[lo])))
            parts.append(
                targets.sampled_targets(
                    scaled_MV[lo:hi],
                    n,
                    labels_B=None if labels is None else labels[lo:hi],
                    generator=gen,
                    **grid,
                )
            )
        return concat_sparse(parts)
    raise ConfigError(
        f"a teacher cannot produce {spec.kind!r} targets; combine entries with "
        "kdcache.targets.combine_sparse_ensemble instead"
    )


def concat_sparse(parts: Sequence[targets.SparseTargets]) -> targets.SparseTargets:
    """Stack SparseTargets row-wise (same kind; the slot count S is the largest, others
    padded with ``PAD_ID``).

    Raises:
        ConfigError: no parts, or parts of different kinds or grids.
    """
    if not parts:
        raise ConfigError("concat_sparse needs at least one part")
    first = parts[0]
    if any(p.kind != first.kind or p.grid_temperatures != first.grid_temperatures for p in parts):
        raise ConfigError("concat_sparse: parts differ in kind or grid temperatures")
    width = max(p.num_slots for p in parts)

    def widen(x: torch.Tensor, fill: float) -> torch.Tensor:
        if x.shape[1] == width:
            return x
        pad = torch.full((x.shape[0], width - x.shape[1]), fill, dtype=x.dtype)
        return torch.cat([x, pad], dim=1)

    def cat(name: str) -> torch.Tensor | None:
        got = [getattr(p, name) for p in parts]
        return None if got[0] is None else torch.cat(got)

    return targets.SparseTargets(
        ids_BS=torch.cat([widen(p.ids_BS, targets.PAD_ID) for p in parts]),
        values_BS=torch.cat([widen(p.values_BS, float("-inf")) for p in parts]),
        log_partition_B=torch.cat([p.log_partition_B for p in parts]),
        kind=first.kind,
        counts_BS=None
        if first.counts_BS is None
        else torch.cat([widen(p.counts_BS, 0) for p in parts if p.counts_BS is not None]),
        grid_temperatures=first.grid_temperatures,
        log_partition_grid_BG=cat("log_partition_grid_BG"),
        tail_log_mass_B=cat("tail_log_mass_B"),
    )


def _teacher_vocab(teacher: Teacher) -> int | None:
    v = teacher.config.get("vocab_size")
    return None if v is None else int(v)


def _compute_token_shard(
    shard: dict[str, np.ndarray],
    teacher: Teacher,
    entry: CacheEntry,
    shard_index: int,
    batch_size: int,
) -> int:
    """Token path of :func:`compute_shard`: per-position targets for one teacher.

    For each batch of sequences (right-padded, so valid positions keep their causal
    context), the teacher's logits [B, T, V] are cut to the target positions of each
    sequence (:func:`kdcache.text.target_positions`: position t holds the distribution of
    token t + 1; prompt and padding positions are dropped), scaled by 1 / tau and
    sparsified per batch, so at most one batch of [B, T, V] logits is ever held. Rows are
    written one per target position, with the sample's ``sample_id`` and the position.

    Returns:
        Rows (target positions) written.
    """
    from kdcache.text import target_positions

    spec = TargetSpec.from_json(entry.spec["targets"])
    ids = np.asarray(shard["sample_id"], dtype=np.int64)
    toks = shard["tokens"]
    offs = shard["token_offsets"]
    plens = shard["prompt_lengths"]
    pad_id = teacher.config.get("pad_token_id")
    pad_id = 0 if pad_id is None else int(pad_id)
    vocab = _teacher_vocab(teacher)
    lengths = np.diff(offs)
    row_ids: list[np.ndarray] = []
    row_pos: list[np.ndarray] = []
    outs: list[Any] = []
    n = len(ids)
    lo = 0
    width = vocab or 0
    while lo < n:
        # Sequences per pass: at most batch_size, and few enough that B * T * V logits fit.
        hi = lo + 1
        while hi < n and hi - lo < batch_size:
            width = int(lengths[lo : hi + 1].max())
            if (hi + 1 - lo) * width * (vocab or 50_000) > MAX_LOGITS_PER_PASS:
                break
            hi += 1
        seqs = [toks[offs[i] : offs[i + 1]] for i in range(lo, hi)]
        batch = torch.full((hi - lo, int(lengths[lo:hi].max())), pad_id, dtype=torch.int64)
        for b, sq in enumerate(seqs):
            batch[b, : len(sq)] = torch.from_numpy(sq.astype(np.int64))
        logits_BTV = teacher.logits(batch)
        if logits_BTV.dim() != 3 or tuple(logits_BTV.shape[:2]) != tuple(batch.shape):
            raise TeacherOutputError(
                f"teacher {teacher.name!r} must return logits [B, T, V] = "
                f"[{batch.shape[0]}, {batch.shape[1]}, V] for token data, got "
                f"{tuple(logits_BTV.shape)}"
            )
        if vocab is not None:
            logits_BTV = targets.trim_vocab(logits_BTV, vocab, name=f"teacher {teacher.name!r}")
        width = int(logits_BTV.shape[-1])
        b_idx, t_idx = [], []
        for b, i in enumerate(range(lo, hi)):
            pos = target_positions(int(lengths[i]), int(plens[i]))
            b_idx.append(np.full(len(pos), b))
            t_idx.append(pos)
        bb = torch.from_numpy(np.concatenate(b_idx))
        tt = torch.from_numpy(np.concatenate(t_idx))
        rows_M = ids[lo:hi][bb.numpy()]
        logits_MV = logits_BTV[bb, tt]
        del logits_BTV
        targets.check_finite(logits_MV, teacher=teacher.name, sample_ids_B=torch.from_numpy(rows_M))
        scaled_MV = targets.scale_logits(logits_MV, spec.temperature)
        labels_M = batch[bb, tt + 1]
        outs.append(sparsify(scaled_MV, spec, labels_M=labels_M, row_sample_ids_M=rows_M))
        row_ids.append(rows_M)
        row_pos.append(tt.numpy())
        lo = hi
    all_ids = np.concatenate(row_ids) if row_ids else np.zeros(0, np.int64)
    all_pos = np.concatenate(row_pos) if row_pos else np.zeros(0, np.int64)
    if spec.is_sparse:
        if not outs:
            raise ConfigError(f"shard {shard_index} is empty; a token entry needs sequences")
        values: Any = concat_sparse(outs)
    else:
        values = np.concatenate(outs) if outs else np.zeros((0, vocab or 0), np.float32)
    entry.write_shard(shard_index, all_ids, values, vocab_size=vocab or width, positions_N=all_pos)
    return len(all_ids)


def check_teacher_vocabularies(ensemble: TeacherEnsemble, dataset: Any) -> int | None:
    """Refuse teachers whose vocabularies (size or tokenizer files) differ from each other
    or from the token dataset's tokenizer (``preprocessing["tokenizer_sha256"]`` and
    ``["vocab_size"]``, when the dataset records them).

    Returns:
        The shared vocabulary size, or None when no teacher declares one.

    Raises:
        ConfigError: sizes or tokenizer fingerprints differ (names every model).
    """
    sizes = {t.name: v for t in ensemble if (v := _teacher_vocab(t)) is not None}
    prints = {
        t.name: str(t.config["tokenizer_sha256"])
        for t in ensemble
        if t.config.get("tokenizer_sha256")
    }
    prep = getattr(dataset, "preprocessing", {}) or {}
    if prep.get("vocab_size") is not None and sizes:
        sizes["dataset"] = int(prep["vocab_size"])
    if prep.get("tokenizer_files_sha256") and prints:
        prints["dataset"] = str(prep["tokenizer_files_sha256"])
    if not sizes:
        return None
    return targets.check_vocabularies(sizes, fingerprints=prints or None)


def _as_ensemble(teachers: Teacher | TeacherEnsemble | Sequence[Teacher]) -> TeacherEnsemble:
    if isinstance(teachers, TeacherEnsemble):
        return teachers
    if isinstance(teachers, Teacher):
        return TeacherEnsemble([teachers])
    return TeacherEnsemble(list(teachers))


def build_cache(
    dataset: ShardedDataset,
    teachers: Teacher | TeacherEnsemble | Sequence[Teacher],
    *,
    temperature: float,
    root: str,
    storage_dtype: str = "float32",
    backend: str = "arrow",
    executor: str = "ray",
    address: str | None = None,
    num_actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int = 1024,
    max_retries: int = 2,
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
        teachers: A teacher, a list of teachers, or a :class:`TeacherEnsemble`.
        temperature: tau > 0; entries store ``logits / tau`` and tau is in the key.
        root: Cache root: local path, ``file://`` or another pyarrow filesystem URI.
        storage_dtype: ``"float32"`` or ``"float16"`` (values out of range are refused).
        backend: Storage backend (``"arrow"``).
        executor: ``"ray"`` (actors; local Ray when no cluster is given) or ``"local"``
            (this process; for debugging and tests without Ray).
        address: Ray cluster address; None uses ``RAY_ADDRESS`` or starts a local Ray.
        num_actors: Ray actors; default one per ``cpus_per_actor`` CPUs, at most one per shard.
        cpus_per_actor: CPUs each actor requests (and torch threads it uses).
        gpus_per_actor: GPUs each actor requests (fractional shares one GPU between
            actors); with > 0 the teachers run on the actor's CUDA device.
        batch_size: Rows per teacher forward pass; does not change the key or the bytes.
        max_retries: Times a shard is retried after its actor died (infrastructure
            failures only; teacher errors fail at once).
        lease_ttl_s: Seconds before a crashed job's lease can be taken over.
        progress: Show a progress bar.
        kind: Target kind, ``"dense"`` (default: all V scaled logits per row) or a sparse
            kind ``"topk"``, ``"topp"``, ``"sampled"`` (:class:`kdcache.schema.TargetSpec`).
        params: Sparsification parameters of ``kind`` (``{"k": 32}``, ``{"top_p": 0.9,
            "max_k": 64}``, ``{"num_samples": 24, "seed": 0}``, optionally ``labels``
            and ``grid_temperatures``); part of the key. None for dense, so dense keys
            are unchanged.

    Token datasets (a :class:`kdcache.text.TokenDataset`, whose shards carry
    ``token_offsets``) get one row per target position: teachers return logits
    [B, T, V], position t's row holds the distribution of token t + 1, prompt and padding
    positions are skipped, and targets are sparsified per batch (``docs/format.md``,
    "Token-level entries"). Their teachers must share one vocabulary and tokenizer.

    Returns:
        A :class:`CacheEntry` for one teacher, else an :class:`EnsembleView` (saved under
        ``<root>/ensembles/``). Its ``build_report`` attribute is a :class:`BuildReport`.

    Raises:
        ConfigError: bad temperature, dtype, backend, executor, kind or params; teachers
            whose vocabularies or tokenizers differ (token datasets).
        TeacherOutputError: a teacher returned NaN/inf or a wrong shape (names the
            teacher and the sample); everything committed before stays committed.
        LeaseHeldError: another job is building the same entry and did not finish in time.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if num_actors is not None and num_actors < 1:
        raise ConfigError(f"num_actors must be >= 1, got {num_actors}")
    if executor == "ray":
        from kdcache.errors import require

        require("ray", "ray")  # before anything is written
    started = time.perf_counter()
    ensemble = _as_ensemble(teachers)
    spec = TargetSpec(
        temperature=temperature,
        storage_dtype=storage_dtype,
        backend=backend,
        kind=kind,
        params=params,
    )
    if getattr(dataset, "token_level", False):
        check_teacher_vocabularies(ensemble, dataset)
    dataset_fp = dataset.fingerprint()
    entries = []
    for teacher in ensemble:
        material = schema.entry_spec(dataset_fp, teacher.fingerprint(), spec)
        entry = CacheEntry(root, schema.content_key(material))
        entry.write_spec(material)
        entries.append(entry)

    leases: list[Lease] = []
    pending: dict[int, list[int]] = {}  # shard -> indices of teachers still to compute
    report = BuildReport(hit=False, keys=[e.key for e in entries])
    keeper = _LeaseKeeper(leases, interval_s=max(1.0, lease_ttl_s / 3))
    try:
        for k, entry in enumerate(entries):
            if entry.is_complete:
                damaged = entry.damaged_shards()
                if not damaged:
                    continue
                log.warning(
                    "cache entry %s lists %d shard file(s) that are missing or of the wrong "
                    "size (%s); recomputing them",
                    entry.key,
                    len(damaged),
                    ", ".join(schema.shard_stem(i) for i in damaged),
                )
                for i in damaged:
                    entry.invalidate_shard(i)
            lease = Lease(entry, ttl_s=lease_ttl_s)
            if not lease.acquire():
                continue  # another job completed it while we waited
            leases.append(lease)
            for i in range(dataset.num_shards):
                if entry.committed_shard(i) is None:
                    pending.setdefault(i, []).append(k)
                else:
                    report.reused += 1
        report.computed = sum(len(v) for v in pending.values())
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
            if report.reused or done:
                log.info(
                    "resuming: %d of %d teacher entries already complete; of the others, "
                    "%d (teacher, shard) outputs are committed and %d remain to compute",
                    done,
                    len(entries),
                    report.reused,
                    report.computed,
                )
            keeper.start()
            if pending:
                run = _run_ray if executor == "ray" else _run_local
                run(
                    dataset,
                    ensemble,
                    entries,
                    pending,
                    report,
                    batch_size=batch_size,
                    address=address,
                    num_actors=num_actors,
                    cpus_per_actor=cpus_per_actor,
                    gpus_per_actor=gpus_per_actor,
                    max_retries=max_retries,
                    progress=progress,
                )
            info = {
                "temperature": spec.temperature,
                "versions": {
                    "kdcache": __version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "build": {"executor": executor, "batch_size": batch_size},
            }
            for teacher, entry in zip(ensemble, entries, strict=True):
                if not entry.is_complete:
                    entry.commit(
                        dataset.num_shards,
                        {**info, "teacher_name": teacher.name, "teacher": teacher.fingerprint()},
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
        cache = EnsembleView(entries, ensemble.rule, ensemble.weights)
        cache.save()
    cache.build_report = report  # type: ignore[union-attr]
    return cache


class _LeaseKeeper:
    """Renews build leases from a background thread, so a long shard never lets the
    lease expire while this job is alive (and a dead job's lease does expire)."""

    def __init__(self, leases: list[Lease], interval_s: float) -> None:
        self.leases = leases
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            for lease in self.leases:
                try:
                    lease.renew()
                except OSError as exc:  # transient storage error: retry next round
                    log.warning("could not renew the lease on %s: %s", lease.entry.key, exc)

    def start(self) -> None:
        if self.leases and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kdcache-lease", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


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


def _progress(total: int, samples_total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        unit="shard",
        desc="teacher stage",
        disable=not enabled,
        dynamic_ncols=True,
        # into a log file (a Ray job, CI), a line every 30 s rather than every update
        mininterval=0.1 if sys.stderr.isatty() else 30.0,
    )


def _run_local(
    dataset, ensemble, entries, pending, report, *, batch_size, progress, **_: Any
) -> None:
    bar = _progress(len(pending), 0, progress)
    for shard_index, ks in sorted(pending.items()):
        stats = compute_shard(
            dataset,
            [ensemble.teachers[k] for k in ks],
            [entries[k] for k in ks],
            shard_index,
            batch_size,
        )
        _account(report, "local", stats, bar)
    bar.close()


def _account(report: BuildReport, actor: str, stats: dict[str, float], bar) -> None:
    slot = report.per_actor.setdefault(actor, {"samples": 0.0, "seconds": 0.0, "shards": 0.0})
    slot["samples"] += stats["samples"]
    slot["seconds"] += stats["seconds"]
    slot["shards"] += 1
    report.num_samples += int(stats["samples"])
    elapsed = bar.format_dict.get("elapsed") or 1e-9
    bar.set_postfix_str(f"{report.num_samples / elapsed:,.0f} samples/s")
    bar.update(1)


def _run_ray(
    dataset,
    ensemble,
    entries,
    pending,
    report,
    *,
    batch_size,
    address,
    num_actors,
    cpus_per_actor,
    gpus_per_actor,
    max_retries,
    progress,
) -> None:
    from kdcache.errors import require

    ray = require("ray", "ray")
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=True,
                logging_level=logging.WARNING,
            )
        except (ConnectionError, ValueError) as exc:
            where = address or os.environ.get("RAY_ADDRESS") or "a local Ray"
            raise RetriableError(
                f"could not start or join Ray at {where}: {exc}. Check --address / "
                "RAY_ADDRESS (host:port of a running head, or 'local' for a new local Ray); "
                "nothing was computed, and entries committed before are kept"
            ) from exc
    try:
        resources = ray.cluster_resources()
        n = max(1, int(float(resources.get("CPU", 1)) // cpus_per_actor))
        if gpus_per_actor > 0:
            n = min(n, max(1, int(float(resources.get("GPU", 0)) // gpus_per_actor)))
        n = num_actors or n
        n = min(n, len(pending))
        threads = max(1, int(cpus_per_actor))

        class TeacherActor:
            """Holds the ensemble's teachers (co-located small models) and runs shards."""

            def __init__(self, refs):
                # Wrapped in a list so the driver, which keeps the refs alive, owns them.
                torch.set_num_threads(threads)
                self.dataset, self.teachers, self.entries = ray.get(refs)
                if gpus_per_actor > 0 and torch.cuda.is_available():
                    for teacher in self.teachers:
                        teacher.to("cuda")

            def run(self, shard_index, ks):
                return compute_shard(
                    self.dataset,
                    [self.teachers[k] for k in ks],
                    [self.entries[k] for k in ks],
                    shard_index,
                    batch_size,
                )

        actor_cls = ray.remote(num_cpus=cpus_per_actor, num_gpus=gpus_per_actor, max_restarts=0)(
            TeacherActor
        )
        refs = [ray.put(dataset), ray.put(ensemble.teachers), ray.put(entries)]
        actors = [actor_cls.remote(refs) for _ in range(n)]
        log.info(
            "teacher stage: %d shard(s) x %d teacher(s) on %d Ray actor(s)",
            len(pending),
            len(ensemble),
            n,
        )
        bar = _progress(len(pending), 0, progress)
        queue = [(shard, ks, 0) for shard, ks in sorted(pending.items())]
        in_flight: dict[Any, tuple[int, tuple[int, list[int], int]]] = {}
        free = list(range(n))
        actor_died = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        while queue or in_flight:
            while queue and free:
                a = free.pop()
                work = queue.pop(0)
                in_flight[actors[a].run.remote(work[0], work[1])] = (a, work)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            a, (shard_index, ks, attempt) = in_flight.pop(done[0])
            try:
                stats = ray.get(done[0])  # a teacher error (fatal) raises here: job stops
            except actor_died as exc:
                # Infrastructure failure: the shard's files are idempotent, so rerun it on
                # a fresh actor, a bounded number of times.
                if attempt >= max_retries:
                    raise RetriableError(
                        f"shard {shard_index} failed {attempt + 1} times because its actor "
                        f"died ({type(exc).__name__}); committed shards are kept, rerun the "
                        "build to resume"
                    ) from exc
                log.warning(
                    "actor-%d died on shard %d (%s); retrying on a new actor (attempt %d of %d)",
                    a,
                    shard_index,
                    type(exc).__name__,
                    attempt + 2,
                    max_retries + 1,
                )
                actors[a] = actor_cls.remote(refs)
                queue.insert(0, (shard_index, ks, attempt + 1))
                free.append(a)
                continue
            _account(report, f"actor-{a}", stats, bar)
            free.append(a)
        bar.close()
        for actor in actors:
            ray.kill(actor)
    finally:
        if started_here:
            ray.shutdown()


def build_from_config(config: BuildConfig, *, progress: bool = True) -> CacheEntry | EnsembleView:
    """Run a teacher-stage job described by a :class:`kdcache.config.BuildConfig`.

    Builds the dataset and teachers the config names, calls :func:`build_cache`, and
    points ``config.alias`` (if set) at the result.

    Raises:
        ConfigError: the config names something that cannot be imported or loaded.
        Everything :func:`build_cache` raises.
    """
    from kdcache.cache import write_alias

    dataset = config.dataset.build()
    teachers = [t.build() for t in config.teachers]
    ensemble = TeacherEnsemble(teachers, weights=config.ensemble.weights, rule=config.ensemble.rule)
    ex = config.executor
    cache = build_cache(
        dataset,
        ensemble,
        temperature=config.targets.temperature,
        root=config.root,
        storage_dtype=config.targets.storage_dtype,
        backend=config.targets.backend,
        kind=config.targets.kind,
        params=config.targets.params,
        executor=ex.kind,
        address=ex.address,
        num_actors=ex.num_actors,
        cpus_per_actor=ex.cpus_per_actor,
        gpus_per_actor=ex.gpus_per_actor,
        batch_size=ex.batch_size,
        max_retries=ex.max_retries,
        progress=progress,
    )
    if config.alias:
        kind = "ensemble" if isinstance(cache, EnsembleView) else "entry"
        write_alias(config.root, config.alias, cache.key, kind)
    return cache
