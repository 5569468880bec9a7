"""``kdcache plan``: what a teacher-stage job will cost, before it runs.

From a :class:`~kdcache.jobs.config.BuildConfig`, without building anything: the dataset's
shards, rows and bytes on disk (from its plan: file metadata only); per target kind and
storage dtype, the bytes the cache will take; per teacher, the teacher-stage time
estimated from a timed calibration batch, and an estimate of one actor's memory (its
teachers' parameters, the batches it holds and one shard's outputs). The
cache bytes are measured, not modelled: the calibration batch's soft targets are encoded
by the real codec into a scratch entry and the bytes per row are scaled to the dataset.

The plan refuses nothing; it warns when a dense cache over the full vocabulary would
exceed ``max_cache_bytes``.
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.data.base import declared_shard_records, open_shard
from kdcache.jobs.config import BuildConfig
from kdcache.schema import TargetSpec

log = logging.getLogger(__name__)

#: Prefetched batches a teacher actor holds besides the one in its forward pass
#: (``kdcache.build.task``: reading overlaps the forward pass, two batches ahead).
PREFETCH_DEPTH = 2


@dataclasses.dataclass
class TargetCost:
    """Bytes of one target kind/dtype over the whole dataset, per teacher entry."""

    kind: str
    params: dict[str, Any] | None
    storage_dtype: str
    bytes_per_row: float
    total_bytes: int
    configured: bool  # the config's own targets


@dataclasses.dataclass
class TeacherCost:
    """One teacher's calibration: its forward time and the memory of one actor."""

    name: str
    num_parameters: int
    parameter_bytes: int
    vocab_size: int
    seconds_per_row: float
    stage_seconds: float  # all rows on one actor
    num_actors: int | None
    peak_actor_bytes: int  # estimated: parameters + batches held + a shard's outputs


@dataclasses.dataclass
class Plan:
    """The result of :func:`plan_build` (see ``format_plan`` for the printed form)."""

    num_shards: int
    num_rows: int
    input_bytes: int | None
    max_shard_rows: int
    batch_size: int
    calibration_rows: int
    targets: list[TargetCost]
    teachers: list[TeacherCost]
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _candidate_specs(spec: TargetSpec, vocab_size: int, tokens: bool = False) -> list[TargetSpec]:
    """The config's spec first, then dense float32/float16 and top-k at a few k < V; for
    token datasets also the compact choices (top-64 with 8-bit values, 16 counts-only
    draws)."""
    out = [spec]
    t = spec.temperature
    for dtype in ("float32", "float16"):
        out.append(TargetSpec(temperature=t, storage_dtype=dtype))
    for k in (8, 32, 128):
        if k < vocab_size:
            out.append(TargetSpec(temperature=t, kind="topk", params={"k": k}))
    if tokens:
        if 64 < vocab_size:
            out.append(TargetSpec(t, kind="topk", params={"k": 64, "value_bits": 8}))
        out.append(TargetSpec(t, kind="sampled_counts", params={"num_samples": 16}))
    seen, unique = set(), []
    for s in out:
        key = schema.canonical_json(s.to_json())
        if key not in seen:
            seen.add(key)
            unique.append(s)
    return unique


def _encoded_bytes(
    scaled_BV: Any,
    ids_B: np.ndarray,
    labels_B: np.ndarray | None,
    spec: TargetSpec,
    positions_B: np.ndarray | None = None,
) -> tuple[float, float]:
    """(bytes per row, bytes per shard file) of ``spec``'s shards for these scaled logits,
    measured by writing two real shards (all rows, and half of them) into a scratch entry:
    the slope is the per-row cost, the intercept the file's framing. With ``positions_B``
    the rows are token-level (``ids_B`` the sequence of each row), written in the
    token-level layout a build writes."""
    n = len(ids_B)
    if n < 2:
        return float(_encoded_file_bytes(scaled_BV, ids_B, labels_B, spec, positions_B)), 0.0
    half = n // 2
    full = _encoded_file_bytes(scaled_BV, ids_B, labels_B, spec, positions_B)
    part = _encoded_file_bytes(
        scaled_BV[:half],
        ids_B[:half],
        None if labels_B is None else labels_B[:half],
        spec,
        None if positions_B is None else positions_B[:half],
    )
    per_row = max(0.0, (full - part) / (n - half))
    return per_row, max(0.0, full - per_row * n)


def _encoded_file_bytes(
    scaled_BV: Any,
    ids_B: np.ndarray,
    labels_B: np.ndarray | None,
    spec: TargetSpec,
    positions_B: np.ndarray | None = None,
) -> int:
    """Bytes of one shard file of ``spec`` holding these scaled logits (written for real
    into a scratch entry; token-level when ``positions_B`` is given)."""
    import torch

    from kdcache.stores.entry import CacheEntry
    from kdcache.targets.sparse import sparsify

    material = schema.entry_spec(
        {"plan": "calibration"},
        {"plan": "calibration"},
        spec,
        token_level=positions_B is not None,
    )
    with tempfile.TemporaryDirectory(prefix="kdcache-plan-") as root:
        entry = CacheEntry(root, schema.content_key(material))
        entry.write_spec(material)
        width = int(scaled_BV.shape[1])
        if spec.is_sparse:
            labels = None
            if spec.param("labels") and labels_B is not None:
                labels = torch.from_numpy(np.asarray(labels_B, dtype=np.int64))
            values: Any = sparsify(scaled_BV, spec, labels_M=labels, row_sample_ids_M=ids_B)
        else:
            values = scaled_BV.numpy()
        rec = entry.write_shard(0, ids_B, values, vocab_size=width, positions_N=positions_B)
    return rec.num_bytes


def _load(teacher: Any) -> Any:
    """A loaded :class:`kdcache.Teacher` from a Teacher or a teacher spec."""
    load = getattr(teacher, "load", None)
    return load() if callable(load) else teacher


def plan_build(
    config: BuildConfig, *, calibration_rows: int = 256, max_cache_bytes: int | None = None
) -> Plan:
    """Plan ``config``'s teacher stage: sizes from the dataset's plan, times and bytes from
    one calibration batch per teacher (loaded in this process).

    Args:
        config: The build job.
        calibration_rows: Rows of shard 0 each teacher runs on (at most the shard).
        max_cache_bytes: Warn when a dense float32 cache of one teacher over the full
            vocabulary exceeds this many bytes.

    Returns:
        A :class:`Plan`.

    Raises:
        ConfigError, DataError: as ``kdcache build`` (the dataset or a teacher cannot be
            loaded); nothing is written under the cache root.
    """
    from kdcache import targets
    from kdcache.data.base import dataset_layout

    dataset = config.dataset.build()
    fp = dataset.fingerprint()
    declared = declared_shard_records(fp)
    # a plan that knows its records only once read (text): one scan, for the plan
    shard_rows = declared if declared is not None else [int(n) for n in dataset.shard_counts()]
    files = fp.get("files")
    input_bytes = None if not files else int(sum(int(f.get("size", 0)) for f in files))
    num_rows = int(sum(shard_rows))
    warnings: list[str] = []
    tokens = dataset_layout(dataset) == "tokens"
    row_positions: np.ndarray | None = None
    if tokens:
        # Rows are target positions (one cached row each), not sequences.
        batch, positions = _token_calibration(dataset, calibration_rows)
        # one row per position, encoded in a scratch entry as a build writes them
        ids = np.asarray(batch["row_sample_id"], dtype=np.int64)
        row_positions = positions[1].numpy()
        sequences = max(1, len(batch["sample_id"]))
        total_positions = getattr(dataset, "num_targets", None)
        if total_positions is None:  # scaled from the calibration sequences
            total_positions = round(len(ids) / sequences * num_rows)
        seq_rows, num_rows = num_rows, int(total_positions)
        shard_rows = [round(r * num_rows / max(1, seq_rows)) for r in shard_rows]
    else:
        reader = open_shard(dataset, 0, max(1, min(calibration_rows, shard_rows[0] or 1)))
        batch = next(iter(reader))
        ids = np.asarray(batch["sample_id"], dtype=np.int64)
    rows = len(ids)
    input_bytes_per_row = float(np.asarray(batch["inputs"]).nbytes) / max(1, rows)
    batch_size = config.executor.batch_size
    spec = config.targets
    costs: list[TeacherCost] = []
    target_costs: list[TargetCost] = []
    for tc in config.teachers:
        built = tc.build()
        teacher = _load(built)
        logits = teacher.logits(batch["inputs"][: min(8, len(batch["inputs"]))])  # warm-up
        started = time.perf_counter()
        logits = teacher.logits(batch["inputs"])
        per_row = (time.perf_counter() - started) / max(1, rows)
        if tokens:  # [B, T, V] -> the target positions' rows [M, V]
            logits = logits[positions[0], positions[1]]
        scaled = targets.scale_logits(logits, spec.temperature)
        width = int(scaled.shape[1])
        if not target_costs:
            for cand in _candidate_specs(spec, width, tokens):
                per, framing = _encoded_bytes(
                    scaled, ids, batch.get("labels"), cand, row_positions if tokens else None
                )
                target_costs.append(
                    TargetCost(
                        kind=cand.kind,
                        params=dict(cand.params) if cand.params else None,
                        storage_dtype=cand.storage_dtype,
                        bytes_per_row=per,
                        total_bytes=round(per * num_rows + framing * len(shard_rows)),
                        configured=cand is spec,
                    )
                )
        params = sum(p.numel() for p in teacher.module.parameters())
        param_bytes = sum(p.numel() * p.element_size() for p in teacher.module.parameters())
        stored = next(t.bytes_per_row for t in target_costs if t.configured)
        b = min(batch_size, max(shard_rows))
        peak = int(
            param_bytes
            + (PREFETCH_DEPTH + 1) * b * input_bytes_per_row  # batches read ahead + current
            + 3 * b * width * 4  # logits, scaled logits, their float32 copy
            + 2 * max(shard_rows) * stored  # a shard's outputs and their encoded file
        )
        resources = getattr(built, "resources", None)
        num_actors = getattr(resources, "num_actors", None) or config.executor.num_actors
        costs.append(
            TeacherCost(
                name=tc.name,
                num_parameters=int(params),
                parameter_bytes=int(param_bytes),
                vocab_size=width,
                seconds_per_row=per_row,
                stage_seconds=per_row * num_rows,
                num_actors=num_actors,
                peak_actor_bytes=peak,
            )
        )
        dense = next(
            (t for t in target_costs if t.kind == "dense" and t.storage_dtype == "float32"), None
        )
        if (
            max_cache_bytes is not None
            and dense is not None
            and dense.total_bytes > max_cache_bytes
        ):
            warnings.append(
                f"teacher {tc.name!r}: a dense float32 cache over all {width} classes/tokens "
                f"takes {_human(dense.total_bytes)}, above --max-cache-bytes "
                f"{_human(max_cache_bytes)}; consider targets.kind=topk (see the table)"
            )
    widths = {c.name: c.vocab_size for c in costs}
    if len(costs) > 1 and len(set(widths.values())) > 1:
        warnings.append(
            "the teachers output different numbers of classes ("
            + ", ".join(f"{n!r}: V={v}" for n, v in widths.items())
            + "); the build of one ensemble will stop at the first shard: build them "
            "separately, or fix the teachers' heads"
        )
    return Plan(
        num_shards=len(shard_rows),
        num_rows=num_rows,
        input_bytes=input_bytes,
        max_shard_rows=max(shard_rows),
        batch_size=batch_size,
        calibration_rows=rows,
        targets=target_costs,
        teachers=costs,
        warnings=warnings,
    )


def _token_calibration(dataset: Any, calibration_rows: int) -> tuple[dict[str, Any], Any]:
    """The calibration batch of a token dataset: sequences of shard 0 until they hold
    ``calibration_rows`` target positions (at least one sequence).

    Returns:
        ``(batch, (b_M, t_M))``: ``batch`` has ``inputs`` int64 [B, T] (right-padded),
        ``sample_id`` [B], ``row_sample_id`` int64 [M] (the sequence of each target
        position, the rows a token-level entry stores), and the positions' indices into
        the teacher's [B, T, V] logits.
    """
    import torch

    from kdcache.data.tokens import pad_batch, target_positions

    shard = dataset.read_shard(0)
    offsets, toks = shard["token_offsets"], shard["tokens"]
    prompts = shard.get("prompt_lengths")
    seqs, b_idx, t_idx, row_ids, total = [], [], [], [], 0
    for i, sid in enumerate(np.asarray(shard["sample_id"], dtype=np.int64)):
        seq = np.asarray(toks[int(offsets[i]) : int(offsets[i + 1])])
        pos = target_positions(len(seq), 0 if prompts is None else int(prompts[i]))
        seqs.append(seq)
        b_idx.append(np.full(len(pos), len(seqs) - 1, np.int64))
        t_idx.append(pos)
        row_ids.append(np.full(len(pos), sid, np.int64))
        total += len(pos)
        if total >= calibration_rows:
            break
    pad = int(getattr(dataset, "pad_token_id", 0))
    batch = {
        "inputs": pad_batch(seqs, pad),
        "sample_id": np.asarray(shard["sample_id"][: len(seqs)], dtype=np.int64),
        "row_sample_id": np.concatenate(row_ids),
    }
    positions = (torch.from_numpy(np.concatenate(b_idx)), torch.from_numpy(np.concatenate(t_idx)))
    return batch, positions


def _human(num_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num_bytes) < 1024 or unit == "TiB":
            return f"{num_bytes:,.1f} {unit}" if unit != "B" else f"{int(num_bytes)} B"
        num_bytes /= 1024
    return f"{num_bytes:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_plan(plan: Plan) -> str:
    """The plan as aligned text, for a terminal or a log file."""
    lines = [
        f"dataset: {plan.num_shards:,} shards, {plan.num_rows:,} rows"
        + (f", {_human(plan.input_bytes)} on disk" if plan.input_bytes is not None else "")
        + f" (largest shard {plan.max_shard_rows:,} rows)",
        "",
        "cache bytes per teacher entry (the calibration batch encoded, scaled to all rows):",
    ]
    rows: list[tuple[str, ...]] = [("kind", "params", "dtype", "bytes/row", "total", "config")]
    for t in plan.targets:
        params = ", ".join(f"{k}={v}" for k, v in (t.params or {}).items()) or "-"
        rows.append(
            (
                t.kind,
                params,
                t.storage_dtype,
                f"{t.bytes_per_row:,.1f}",
                _human(t.total_bytes),
                "<- this config" if t.configured else "",
            )
        )
    lines += _table(rows)
    lines += ["", f"teachers (calibration: {plan.calibration_rows} rows of shard 0):"]
    rows = [("teacher", "params", "V", "us/row", "stage, 1 actor", "actors", "est. mem/actor")]
    for c in plan.teachers:
        stage = _duration(c.stage_seconds)
        if c.num_actors:
            stage += f" ({_duration(c.stage_seconds / c.num_actors)} on {c.num_actors})"
        rows.append(
            (
                c.name,
                f"{c.num_parameters:,}",
                str(c.vocab_size),
                f"{c.seconds_per_row * 1e6:,.1f}",
                stage,
                str(c.num_actors or "auto"),
                _human(c.peak_actor_bytes),
            )
        )
    lines += _table(rows)
    lines += [f"warning: {w}" for w in plan.warnings]
    return "\n".join(lines)


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 or not c[:1].isdigit() else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            ).rstrip()
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return ["  " + line for line in out]
