"""Joining cached soft targets to their inputs: by ``sample_id``, never by position.

One set of checks for every layout: the cache must have been built over the dataset
(:func:`check_same_dataset`), each cache shard's ids must be exactly its input shard's
(:func:`input_order` for one row per sample, :func:`read_token_shard` for token-level
entries, one row per target position), and a student's vocabulary and tokenizer must be
the teachers' (:func:`check_student_vocabulary`). Any difference raises; nothing is
zero-filled.

Shape legend: n samples in a shard, N target rows in a token-level shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache import schema
from kdcache.data.base import ShardedDataset, dataset_layout, read_shard_checked
from kdcache.data.tokens import target_positions
from kdcache.errors import (
    ConfigError,
    InputChangedError,
    SampleIdMismatchError,
    SpecMismatchError,
)
from kdcache.stores.codec import columns_to_dense, columns_to_sparse
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView, as_view
from kdcache.targets import check_vocabularies
from kdcache.targets.sparse import SparseTargets


def _digest(obj: Any) -> str:
    return hashlib.sha256(schema.canonical_json(obj).encode()).hexdigest()[:12]


def check_same_dataset(view: EnsembleView, dataset: ShardedDataset) -> None:
    """Refuse a dataset other than the one the cache was built over.

    Compared: the per-shard fingerprints (records and content hash of every shard) and,
    for token datasets, the preprocessing too (it holds the tokenizer's hash, so targets
    of tokenizer A are never joined to inputs of tokenizer B). Labels are not part of a
    fingerprint, so a relabelled dataset still joins.

    Raises:
        SpecMismatchError: the fingerprints differ; the message names both (short hashes)
            and the first shard that differs.
    """
    first = view.entries[0]
    cached, given = first.dataset_fingerprint, dataset.fingerprint()
    fields = ["shards"]
    if dataset_layout(dataset) == "tokens":
        fields.append("preprocessing")
    a = {f: cached.get(f) for f in fields}
    b = {f: given.get(f) for f in fields}
    if a == b:
        return
    where = "the preprocessing (tokenizer, truncation) differs"
    sa, sb = a["shards"] or [], b["shards"] or []
    if len(sa) != len(sb):
        where = f"the cache has {len(sa)} shards, the dataset {len(sb)}"
    else:
        bad = [i for i, (x, y) in enumerate(zip(sa, sb, strict=True)) if x != y]
        if bad:
            where = f"shard {bad[0]} differs ({len(bad)} of {len(sa)} shards)"
            x, y = sa[bad[0]], sb[bad[0]]
            if isinstance(x, dict) and isinstance(y, dict):
                fields = [k for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)]
                what = ", ".join(f"{k} {x.get(k)!r} -> {y.get(k)!r}" for k in fields[:3])
                named = f" of file {y['file']!r}" if "file" in y else ""
                where += f": {what}{named}"
                if "version" in fields and "size" not in fields:
                    where += (
                        " (the file was rewritten or touched since the build; a copy that "
                        "keeps modification times, cp -p or rsync -t, keeps the key)"
                    )
    raise SpecMismatchError(
        f"cache {first.key} was built over a different dataset: its dataset fingerprint is "
        f"{_digest(a)}, this dataset's is {_digest(b)} ({where}); build the cache for this "
        "dataset, or pass the dataset it was built from"
    )


def read_inputs(
    view: EnsembleView, dataset: ShardedDataset, index: int, *, verify: bool = True
) -> dict[str, np.ndarray]:
    """Read input shard ``index`` for joining to the cache, checked against what the
    teachers saw.

    When the teacher stage recorded the input shard's digest (file-backed datasets:
    ``input_digest`` in each shard's commit record) and ``verify`` is on, the shard is
    read with its digest (:func:`kdcache.data.base.read_shard_checked`) and compared with
    every entry's record, so that soft targets are never joined to inputs that changed
    after the cache was built (same ids, other pixels).

    Returns:
        The shard, as ``dataset.read_shard(index)`` returns it.

    Raises:
        InputChangedError: the digest differs from an entry's record (names the shard,
            the teacher and both digests, and what to do).
    """
    recorded: list[tuple[CacheEntry, str]] = []
    if verify:
        for e in view.entries:
            rec = e.manifest_record(index)
            if rec.input_digest is not None:
                recorded.append((e, rec.input_digest))
    if not recorded:
        return dataset.read_shard(index)
    shard, digest = read_shard_checked(dataset, index)
    for e, want in recorded:
        if digest is not None and digest != want:
            raise InputChangedError(
                f"input shard {index} is not the one teacher {e.teacher_name!r} saw when "
                f"cache {e.key} was built: its content digest is {digest}, the cache "
                f"recorded {want}; the input files changed since the build (same sizes "
                "and modification times, other bytes). Restore them, or rebuild the cache "
                "over the new files (a new key)"
            )
    return shard


def input_order(cache_ids_n: np.ndarray, input_ids_n: np.ndarray, where: str) -> np.ndarray | None:
    """The permutation that puts a cache shard's rows in its input shard's order.

    Returns:
        None when the orders already agree, else int64 [n] ``perm`` such that
        ``cache_rows[perm]`` lines up with the input rows.

    Raises:
        SampleIdMismatchError: the two hold different ids (a missing, an extra or a
            repeated id); names the shard and one offending id.
    """
    want = np.asarray(input_ids_n, dtype=np.int64)
    ids = np.asarray(cache_ids_n, dtype=np.int64)
    if np.array_equal(ids, want):
        return None
    missing = np.setdiff1d(want, ids)
    extra = np.setdiff1d(ids, want)
    if len(missing) or len(extra) or len(ids) != len(want) or len(np.unique(ids)) != len(ids):
        what = (
            f"sample_id {int(missing[0])} is missing from the cache"
            if len(missing)
            else f"the cache holds sample_id {int(extra[0])} that the input lacks"
            if len(extra)
            else "the cache repeats a sample_id"
        )
        raise SampleIdMismatchError(
            f"{where}: cache and input disagree on sample_id ({len(missing)} missing, "
            f"{len(extra)} extra): {what}. The cache was built from different data; rebuild it."
        )
    sort = np.argsort(ids)
    return sort[np.searchsorted(ids[sort], want)]


@dataclass
class TokenShard:
    """One token-level cache shard, checked against its input shard.

    Attributes:
        sample_ids: int64 [n], the input shard's sequences in order.
        row_offsets: int64 [n + 1]: sequence j owns target rows
            ``row_offsets[j]:row_offsets[j + 1]``.
        positions: int64 [N], the position t of each row (its target is token t + 1).
        targets: SparseTargets with N rows, or float32 numpy [N, V] scaled logits (dense).
    """

    sample_ids: np.ndarray
    row_offsets: np.ndarray
    positions: np.ndarray
    targets: SparseTargets | np.ndarray


def read_token_shard(
    entry: CacheEntry,
    index: int,
    dataset: ShardedDataset,
    *,
    verify: bool = True,
    inputs: dict[str, np.ndarray] | None = None,
) -> TokenShard:
    """Read token-level cache shard ``index`` and join it to input shard ``index``.

    Args:
        entry: A complete token-level entry (built over ``dataset``).
        index: Shard index.
        dataset: The input sequences (a ``"tokens"`` dataset).
        verify: Check the file's size and checksum against the manifest.
        inputs: Input shard ``index`` if already read (by :func:`read_inputs`, which
            checks its content digest); read here with :func:`read_inputs` otherwise.

    Returns:
        A :class:`TokenShard`.

    Raises:
        ConfigError: the entry is not token-level (no ``position`` column).
        SampleIdMismatchError: the shard's samples differ from the input shard's (order,
            a missing or extra sample), or a sample's positions differ from its target
            positions (a sequence of another length, or a shifted alignment); names the
            shard and the sample_id.
        CacheCorruptError: see :meth:`kdcache.stores.CacheEntry.read_columns`.
        InputChangedError: read here (``inputs`` None), the input shard's content digest
            differs from the one recorded when the entry was built.
    """
    cols = entry.read_columns(index, verify=verify)
    where = f"cache {entry.key} shard {index}"
    if inputs is None:  # read here: checked against the digest the teacher stage recorded
        inputs = read_inputs(as_view(entry), dataset, index, verify=verify)
    if schema.COL_POSITION not in cols.rows:
        raise ConfigError(
            f"{where} is not token-level (no {schema.COL_POSITION!r} column); it was built "
            "over a 'records' dataset, not a kdcache.data.TokenDataset"
        )
    rows_ids = np.asarray(cols.sample_ids_N, dtype=np.int64)
    positions = np.asarray(cols.rows[schema.COL_POSITION], dtype=np.int64)
    inp = dataset.read_shard(index) if inputs is None else inputs
    want_ids = np.asarray(inp["sample_id"], dtype=np.int64)
    lengths = np.diff(inp["token_offsets"])
    counts = lengths - np.maximum(inp["prompt_lengths"], 1)
    row_offsets = np.zeros(len(want_ids) + 1, np.int64)
    np.cumsum(counts, out=row_offsets[1:])
    if len(rows_ids) != int(row_offsets[-1]):
        raise SampleIdMismatchError(
            f"{where} holds {len(rows_ids)} token rows, input shard {index} has "
            f"{int(row_offsets[-1])} target positions over {len(want_ids)} sequences; the "
            "cache was built over other sequences: rebuild it for this dataset"
        )
    expected_ids = np.repeat(want_ids, counts)
    bad = np.flatnonzero(expected_ids != rows_ids)
    if len(bad):
        r = int(bad[0])
        raise SampleIdMismatchError(
            f"{where}: row {r} belongs to sample_id {int(rows_ids[r])}, input shard {index} "
            f"expects sample_id {int(expected_ids[r])} there (samples or lengths differ)"
        )
    expected_pos = np.concatenate(
        [
            target_positions(int(n), int(p))
            for n, p in zip(lengths, inp["prompt_lengths"], strict=True)
        ]
        or [np.zeros(0, np.int64)]
    )
    bad = np.flatnonzero(expected_pos != positions)
    if len(bad):
        r = int(bad[0])
        raise SampleIdMismatchError(
            f"{where}: sample_id {int(rows_ids[r])} has a target at position "
            f"{int(positions[r])} where position {int(expected_pos[r])} is expected "
            "(a shifted or re-prompted sequence); rebuild the cache"
        )
    tgt: SparseTargets | np.ndarray
    if entry.is_sparse:
        tgt = columns_to_sparse(cols, where)
    else:
        tgt = np.asarray(columns_to_dense(cols), dtype=np.float32)
    return TokenShard(want_ids, row_offsets, positions, tgt)


def check_student_vocabulary(
    cache: CacheEntry | EnsembleView,
    *,
    vocab_size: int,
    tokenizer_sha256: str | None = None,
) -> None:
    """Refuse a student whose vocabulary or tokenizer differs from the cache's teachers.

    Args:
        cache: The entry or ensemble the student distils from.
        vocab_size: The student's real vocabulary size V.
        tokenizer_sha256: SHA-256 of the student's tokenizer files
            (:func:`kdcache.data.tokens.tokenizer_files_sha256`), if known.

    Raises:
        ConfigError: V or the tokenizer differs (names every model).
    """
    sizes = {"student": int(vocab_size)}
    prints = {"student": tokenizer_sha256} if tokenizer_sha256 else {}
    for e in as_view(cache).entries:
        sizes[f"{e.teacher_name} ({e.key[:8]})"] = int(e.vocab_size)
        sha = (e.manifest.get("teacher", {}).get("config", {}) or {}).get("tokenizer_sha256")
        if sha and prints:
            prints[f"{e.teacher_name} ({e.key[:8]})"] = str(sha)
    check_vocabularies(sizes, fingerprints=prints or None)
