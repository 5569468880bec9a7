"""The per-shard task of the teacher stage: run the teachers over one input shard and commit
one output shard per teacher (idempotent: a rerun writes identical bytes).

Shape legend: B batch, T tokens, V vocabulary, M rows (samples or target positions).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Generator, Sequence
from typing import Any, cast

import numpy as np
import torch

from kdcache import targets
from kdcache.build.report import VOCAB_KEY
from kdcache.data.base import (
    ShardedDataset,
    dataset_layout,
    open_shard,
    prefetch,
    read_shard_checked,
)
from kdcache.errors import ConfigError, DataError, TeacherOutputError
from kdcache.schema import TargetSpec
from kdcache.stores.entry import CacheEntry
from kdcache.targets.sparse import MAX_LOGITS_PER_PASS, concat_sparse, sparsify
from kdcache.teachers.spec import TeacherSpec
from kdcache.teachers.teacher import Teacher, TeacherEnsemble

#: Batches read ahead of the teachers' forward pass (:func:`kdcache.data.base.prefetch`).
PREFETCH_DEPTH = 2


def compute_shard(
    dataset: ShardedDataset,
    teachers: Sequence[Teacher],
    entries: Sequence[CacheEntry],
    shard_index: int,
    batch_size: int,
    *,
    expected_rows: int | None = None,
) -> dict[str, float]:
    """Run ``teachers`` over one input shard and commit one output shard per teacher.

    This is the unit of work of every executor. It is idempotent: rerunning it rewrites
    byte-identical files under the same names.

    Records (``layout = "records"``): the shard is read once, batch by batch
    (:func:`kdcache.data.base.open_shard`: a streaming dataset's own lazy reader, else
    ``read_shard`` cut into batches of ``batch_size`` rows), on a background thread
    :data:`PREFETCH_DEPTH` batches ahead (:func:`kdcache.data.base.prefetch`), so that
    reading and decoding the next batch overlap the forward pass and at most that many
    input batches are held. Every batch goes to each teacher in turn; each teacher's
    scaled logits [B, V] (or its sparse targets) are kept per batch and written as its
    output shard after the last batch, with the reader's digest of the input
    (``input_digest``, when the dataset computes one). Tokens (``layout = "tokens"``): the
    whole shard is read once and each teacher runs over it in turn.

    Args:
        dataset: The input dataset.
        teachers: Loaded teachers, aligned with ``entries``.
        entries: The entry each teacher writes to.
        shard_index: The input shard (and output shard) index.
        batch_size: Rows (records) or at most sequences (tokens) per forward pass.
        expected_rows: Rows the dataset's fingerprint declares for this shard; None: not
            checked.

    Returns:
        ``{"samples": rows x teachers, "seconds": wall time, "vocab_size/<name>": V per
        teacher}`` (tokens: also ``"tokens"``, target positions x teachers).

    Raises:
        TeacherOutputError: NaN/inf or wrong shape, or a V that changes between batches
            (fatal; names teacher and sample).
        DataError: the shard reads more or fewer rows than the dataset declares, or none;
            nothing of the shard is written.
    """
    start = time.perf_counter()
    if dataset_layout(dataset) == "tokens":
        shard, digest = read_shard_checked(dataset, shard_index)
        num_rows = 0
        for teacher, entry in zip(teachers, entries, strict=True):
            num_rows = _compute_token_shard(
                shard, teacher, entry, shard_index, batch_size, input_digest=digest
            )
        return {
            "samples": float(len(shard["sample_id"]) * len(teachers)),
            "seconds": time.perf_counter() - start,
            "tokens": float(num_rows * len(teachers)),
        }
    outputs = [_RecordOutputs(t, e) for t, e in zip(teachers, entries, strict=True)]
    reader = open_shard(dataset, shard_index, batch_size)
    id_parts: list[np.ndarray] = []
    # prefetch is a generator: closing it (also on an error) stops its reader thread.
    ahead = cast("Generator[dict[str, Any], None, None]", prefetch(reader, depth=PREFETCH_DEPTH))
    with contextlib.closing(ahead) as batches:
        for batch in batches:
            batch_ids = np.array(batch["sample_id"], dtype=np.int64)  # a writable copy
            id_parts.append(batch_ids)
            for out in outputs:
                out.add(batch["inputs"], batch.get("labels"), batch_ids)
    ids = np.concatenate(id_parts) if id_parts else np.zeros(0, np.int64)
    _check_rows(dataset, shard_index, len(ids), expected_rows)
    for out in outputs:
        out.write(shard_index, ids, input_digest=reader.digest)
    return {
        "samples": float(len(ids) * len(teachers)),
        "seconds": time.perf_counter() - start,
        **{f"{VOCAB_KEY}{out.teacher.name}": float(out.width) for out in outputs},
    }


def _check_rows(
    dataset: ShardedDataset, shard_index: int, num_rows: int, expected: int | None
) -> None:
    """Refuse a shard that read no rows, or other rows than its dataset declares.

    Raises:
        DataError: names the dataset type, the shard and both counts.
    """
    name = type(dataset).__name__
    if num_rows == 0:
        raise DataError(
            f"shard {shard_index} of {name} has no records; every shard needs at least one "
            "(give the dataset fewer shards, or drop the empty one); nothing was written "
            "for it, and shards committed before are kept"
        )
    if expected is not None and num_rows != expected:
        raise DataError(
            f"shard {shard_index} of {name} read {num_rows} records, but its fingerprint "
            f"declares {expected}: the dataset returns other rows than it describes (fix its "
            "read_shard or its fingerprint, or the files changed while it was read); nothing "
            "was written for this shard"
        )


class _RecordOutputs:
    """One teacher's outputs over one shard of records, gathered batch by batch."""

    def __init__(self, teacher: Teacher, entry: CacheEntry) -> None:
        self.teacher = teacher
        self.entry = entry
        self.spec = TargetSpec.from_json(entry.spec["targets"])
        self.parts: list[Any] = []
        self.width = 0

    def add(self, inputs: Any, labels: Any, batch_ids: np.ndarray) -> None:
        """Run the teacher on one batch (inputs [B, ...], labels [B] or None, ids [B])."""
        teacher, spec = self.teacher, self.spec
        logits = teacher.logits(inputs)
        if logits.dim() != 2:
            raise TeacherOutputError(
                f"teacher {teacher.name!r} returned {tuple(logits.shape)} for a dataset "
                "of whole samples; expected logits [B, V] (token models need a "
                "TokenDataset, see kdcache.data.tokens)"
            )
        targets.check_finite(logits, teacher=teacher.name, sample_ids_B=torch.from_numpy(batch_ids))
        scaled = targets.scale_logits(logits, spec.temperature)
        if self.width and int(scaled.shape[1]) != self.width:
            raise TeacherOutputError(
                f"teacher {teacher.name!r} returned V={int(scaled.shape[1])} classes for the "
                f"batch starting at sample_id {int(batch_ids[0])}, V={self.width} for the "
                "batches before: a teacher's output width must not change between batches"
            )
        self.width = int(scaled.shape[1])
        if not spec.is_sparse:
            self.parts.append(scaled.numpy())
            return
        # Sparse kinds for classifiers with many classes: sparsified per batch, so no
        # shard-sized [N, V] array is held; the label is kept when the spec asks.
        batch_labels = None
        if spec.param("labels") and labels is not None:
            batch_labels = torch.from_numpy(np.asarray(labels))
        self.parts.append(sparsify(scaled, spec, labels_M=batch_labels, row_sample_ids_M=batch_ids))

    def write(self, shard_index: int, ids: np.ndarray, *, input_digest: str | None) -> None:
        """Commit the output shard (ids [N] int64, in input order)."""
        if self.spec.is_sparse:
            if not self.parts:
                raise ConfigError(f"shard {shard_index} is empty; a sparse entry needs rows")
            self.entry.write_shard(
                shard_index,
                ids,
                concat_sparse(self.parts),
                vocab_size=self.width,
                input_digest=input_digest,
            )
        else:
            values = np.concatenate(self.parts) if self.parts else np.zeros((0, 0), np.float32)
            self.entry.write_shard(shard_index, ids, values, input_digest=input_digest)


def _teacher_vocab(teacher: Teacher | TeacherSpec) -> int | None:
    v = teacher.config.get("vocab_size")
    return None if v is None else int(v)


def _compute_token_shard(
    shard: dict[str, np.ndarray],
    teacher: Teacher,
    entry: CacheEntry,
    shard_index: int,
    batch_size: int,
    *,
    input_digest: str | None = None,
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

    Raises:
        ConfigError: a sequence is longer than the teacher's context (its config's
            ``n_positions`` / ``max_position_embeddings``, :func:`_teacher_context`),
            checked before any forward pass; names the sample and the setting to change.
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
    context = _teacher_context(teacher)
    if context is not None and len(lengths) and int(lengths.max()) > context:
        j = int(np.argmax(lengths))
        raise ConfigError(
            f"sequence sample_id {int(ids[j])} of shard {shard_index} has {int(lengths[j])} "
            f"tokens, more than teacher {teacher.name!r} takes (its context is {context} "
            "positions, config n_positions / max_position_embeddings); make the dataset's "
            f"sequences at most {context} tokens: TextDataset(max_tokens={context}, "
            "truncation='right'), or max_tokens of encode_texts; nothing of this shard "
            "was written"
        )
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
    entry.write_shard(
        shard_index,
        all_ids,
        values,
        vocab_size=vocab or width,
        positions_N=all_pos,
        input_digest=input_digest,
    )
    return len(all_ids)


def _teacher_context(teacher: Teacher | TeacherSpec) -> int | None:
    """Longest sequence a teacher takes: ``n_positions`` or ``max_position_embeddings`` of
    its config (top level or, for :meth:`Teacher.from_hf`, ``hf_config``); None if none."""
    config = teacher.config or {}
    for where in (config, config.get("hf_config") or {}):
        for key in ("n_positions", "max_position_embeddings"):
            value = where.get(key) if isinstance(where, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_teacher_vocabularies(ensemble: TeacherEnsemble, dataset: Any) -> int | None:
    """Refuse teachers whose vocabularies (size or tokenizer files) differ from each other
    or from the token dataset's tokenizer (``preprocessing["tokenizer_sha256"]`` and
    ``["vocab_size"]``, when the dataset records them).

    Teachers may be loaded :class:`Teacher` objects or :class:`TeacherSpec` objects (whose
    ``config`` offers the same facts without loading the model).

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
