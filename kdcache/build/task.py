"""The per-shard task of the teacher stage: run the teachers over one input shard and commit
one output shard per teacher (idempotent: a rerun writes identical bytes).

Shape legend: B batch, T tokens, V vocabulary, M rows (samples or target positions).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kdcache import targets
from kdcache.data.base import ShardedDataset, dataset_layout
from kdcache.errors import ConfigError, TeacherOutputError
from kdcache.schema import TargetSpec
from kdcache.stores.entry import CacheEntry
from kdcache.targets.sparse import MAX_LOGITS_PER_PASS, concat_sparse, sparsify
from kdcache.teachers.teacher import Teacher, TeacherEnsemble


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
    if dataset_layout(dataset) == "tokens":
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
                    "TokenDataset, see kdcache.data.tokens)"
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
    sequence (:func:`kdcache.data.tokens.target_positions`: position t holds the distribution of
    token t + 1; prompt and padding positions are dropped), scaled by 1 / tau and
    sparsified per batch, so at most one batch of [B, T, V] logits is ever held. Rows are
    written one per target position, with the sample's ``sample_id`` and the position.

    Returns:
        Rows (target positions) written.
    """
    from kdcache.data.tokens import target_positions

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
