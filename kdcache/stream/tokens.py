"""The student side for language models: token-level soft targets joined to sequences.

:func:`read_token_shard` reads one token-level cache shard (one row per target position,
``docs/format.md``, "Token-level entries") and checks it against its input shard: same
samples in the same order, and exactly the target positions each sequence should have
(:func:`kdcache.text.target_positions`). Any difference raises; nothing is zero-filled.

:class:`TokenSoftTargetDataset` streams batches for a causal-LM student: right-padded
``inputs`` [B, T], a ``mask`` of the positions with targets, the shifted ``labels`` and
the teachers' per-token targets laid out on the B * T grid, ready for
:func:`kdcache.losses.token_kd_loss` (see :func:`token_distill_loss`).

Shape legend: B sequences, T padded length, V vocabulary, S kept entries per token,
N target rows in a shard, K teachers, M target positions in a batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache import losses, schema
from kdcache import targets as _targets
from kdcache.data.tokens import TokenDataset, pad_batch, target_positions
from kdcache.errors import ConfigError, SampleIdMismatchError
from kdcache.stores.codec import bfloat16_bits_to_float32, columns_to_sparse
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView, as_view
from kdcache.targets.sparse import PAD_ID, SparseTargets


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
    entry: CacheEntry, index: int, dataset: TokenDataset, *, verify: bool = True
) -> TokenShard:
    """Read token-level cache shard ``index`` and join it to input shard ``index``.

    Args:
        entry: A complete token-level entry (built over ``dataset``).
        index: Shard index.
        dataset: The input sequences.
        verify: Check the file's size and SHA-256 against the manifest.

    Returns:
        A :class:`TokenShard`.

    Raises:
        ConfigError: the entry is not token-level (no ``position`` column).
        SampleIdMismatchError: the shard's samples differ from the input shard's (order,
            a missing or extra sample), or a sample's positions differ from its target
            positions (a sequence of another length, or a shifted alignment); names the
            shard and the sample_id.
        CacheCorruptError: see :meth:`kdcache.cache.CacheEntry.read_columns`.
    """
    cols = entry.read_columns(index, verify=verify)
    where = f"cache {entry.key} shard {index}"
    if schema.COL_POSITION not in cols.rows:
        raise ConfigError(
            f"{where} is not token-level (no {schema.COL_POSITION!r} column); read it with "
            "kdcache.SoftTargetDataset, or rebuild it over a kdcache.text.TokenDataset"
        )
    rows_ids = np.asarray(cols.sample_ids_N, dtype=np.int64)
    positions = np.asarray(cols.rows[schema.COL_POSITION], dtype=np.int64)
    inp = dataset.read_shard(index)
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
        values = cols.rows[schema.COL_SCALED_LOGITS]
        if cols.meta.get("storage_dtype") == "bfloat16":
            values = bfloat16_bits_to_float32(values)
        tgt = np.asarray(values, dtype=np.float32)
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
            (:func:`kdcache.text.tokenizer_files_sha256`), if known.

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
    _targets.check_vocabularies(sizes, fingerprints=prints or None)


def _scatter_sparse(sel: SparseTargets, flat_M: torch.Tensor, num_rows: int) -> SparseTargets:
    """Place M rows of targets at rows ``flat_M`` of a B * T grid; other rows are empty
    (all pads, tail -inf): they are masked out of every loss."""
    s = sel.num_slots
    ids = torch.full((num_rows, s), PAD_ID, dtype=torch.int64)
    ids[flat_M] = sel.ids_BS
    values = torch.full((num_rows, s), float("-inf"), dtype=sel.values_BS.dtype)
    values[flat_M] = sel.values_BS
    log_z = torch.zeros(num_rows)
    log_z[flat_M] = sel.log_partition_B.float()
    counts = None
    if sel.counts_BS is not None:
        counts = torch.zeros((num_rows, s), dtype=torch.int64)
        counts[flat_M] = sel.counts_BS
    grid = None
    if sel.log_partition_grid_BG is not None:
        grid = torch.zeros((num_rows, sel.log_partition_grid_BG.shape[1]))
        grid[flat_M] = sel.log_partition_grid_BG.float()
    tail = None
    if sel.tail_log_mass_B is not None:
        tail = torch.full((num_rows,), float("-inf"))
        tail[flat_M] = sel.tail_log_mass_B.float()
    return SparseTargets(ids, values, log_z, sel.kind, counts, sel.grid_temperatures, grid, tail)


class TokenSoftTargetDataset(torch.utils.data.IterableDataset):
    """Batches of sequences with their teachers' per-token soft targets, joined by sample_id.

    Order: each epoch visits the shards in an order drawn from (seed, epoch), and the
    sequences of each shard in an order drawn from (seed, epoch, shard); consecutive
    ``batch_size * world_size`` sequences form a global batch, of which rank r takes the
    r-th slice, so the order is a function of (seed, epoch) and every rank makes the same
    number of steps (the last incomplete global batch is dropped). Only the shards of the
    current batch are held in memory.

    Each batch is a dict:

    * ``sample_id``: int64 [B].
    * ``inputs``: int64 [B, T], right-padded with ``dataset.pad_token_id``.
    * ``lengths``: int64 [B].
    * ``mask``: bool [B, T], True at positions with a target (not prompt, not padding,
      not the last token).
    * ``labels``: int64 [B, T], the next token where ``mask``, else -100.
    * ``targets`` (with a cache): the teachers' targets at tau on the B * T grid
      (row-major): one :class:`kdcache.targets.SparseTargets` with B * T rows (empty rows
      where ``mask`` is False) when the entry is sparse and K = 1 or the teachers were
      combined (top-k / top-p, ``combine=True``: :func:`kdcache.targets.combine_sparse_ensemble`,
      mean of probabilities); a list of K of them otherwise (sampled teachers do not
      combine: their losses are summed, see :func:`token_distill_loss`); or float32
      log-probabilities [B, T, V] for dense entries (combined by the ensemble's rule).

    Args:
        cache: A token-level entry or ensemble view built over ``dataset``, or None for a
            hard-label stream (no ``targets``).
        dataset: The sequences the cache was built over.
        batch_size: Sequences per rank per step.
        seed: Order seed.
        combine: Combine K sparse top-k/top-p teachers into one mixture per batch.
        rank, world_size: This rank and the number of ranks (default: from
            ``torch.distributed`` when initialised, else 0 and 1).
        verify: Check each shard's SHA-256 when it is read.

    Raises:
        ConfigError: batch_size < 1, or cache and dataset have different numbers of shards.
        SampleIdMismatchError: raised while iterating, by :func:`read_token_shard`.
    """

    def __init__(
        self,
        cache: CacheEntry | EnsembleView | None,
        dataset: TokenDataset,
        *,
        batch_size: int,
        seed: int = 0,
        combine: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        verify: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        self.view = None if cache is None else as_view(cache)
        self.dataset = dataset
        if self.view is not None and self.view.num_shards != dataset.num_shards:
            raise ConfigError(
                f"the cache has {self.view.num_shards} shards, the dataset "
                f"{dataset.num_shards}; a cache joins only the dataset it was built over"
            )
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.combine = combine
        if rank is None or world_size is None:
            dist = torch.distributed
            ready = dist.is_available() and dist.is_initialized()
            rank, world_size = (dist.get_rank(), dist.get_world_size()) if ready else (0, 1)
        self.rank, self.world_size = int(rank), int(world_size)
        self.verify = verify
        self.epoch = 0
        self._skip = 0  # batches of self.epoch already consumed (resume)
        self._step = 0

    # -- order -------------------------------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[tuple[int, int]]:
        """``[(shard, index in shard)]`` of every sequence, in this epoch's order."""
        rng = np.random.default_rng([self.seed, epoch])
        order: list[tuple[int, int]] = []
        for shard in rng.permutation(self.dataset.num_shards).tolist():
            s = self.dataset.shard_slice(shard)
            sub = np.random.default_rng([self.seed, epoch, shard]).permutation(s.stop - s.start)
            order.extend((shard, int(j)) for j in sub)
        return order

    @property
    def steps_per_epoch(self) -> int:
        return len(self.dataset) // (self.batch_size * self.world_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """Where the stream is: ``{"epoch", "step"}`` (batches of the epoch consumed)."""
        return {"epoch": self.epoch, "step": self._step, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume after the batch ``state`` was taken at (the same sequence of batches).

        Raises:
            ConfigError: the state was saved with another seed.
        """
        if int(state.get("seed", self.seed)) != self.seed:
            raise ConfigError(f"state has seed {state['seed']}, this stream {self.seed}")
        self.epoch, self._skip = int(state["epoch"]), int(state["step"])

    # -- batches -----------------------------------------------------------------------------
    def _load(self, shard: int) -> dict[str, Any]:
        inp = self.dataset.read_shard(shard)
        out: dict[str, Any] = {"input": inp, "teachers": []}
        if self.view is not None:
            out["teachers"] = [
                read_token_shard(e, shard, self.dataset, verify=self.verify)
                for e in self.view.entries
            ]
        return out

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = self.epoch_order(self.epoch)
        gb = self.batch_size * self.world_size
        loaded: dict[int, dict[str, Any]] = {}
        for step in range(self._skip, self.steps_per_epoch):
            chunk = order[step * gb : (step + 1) * gb]
            mine = chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
            needed = {s for s, _ in mine}
            for s in [s for s in loaded if s not in needed]:
                del loaded[s]
            for s in sorted(needed - set(loaded)):
                loaded[s] = self._load(s)
            self._step = step + 1
            yield self._batch(mine, loaded)
        self.epoch += 1
        self._skip = self._step = 0

    def _batch(
        self, mine: list[tuple[int, int]], loaded: dict[int, dict[str, Any]]
    ) -> dict[str, Any]:
        seqs, sids, b_idx, t_idx = [], [], [], []
        for b, (s, j) in enumerate(mine):
            inp = loaded[s]["input"]
            off = inp["token_offsets"]
            seq = inp["tokens"][off[j] : off[j + 1]]
            seqs.append(seq)
            sids.append(int(inp["sample_id"][j]))
            pos = target_positions(len(seq), int(inp["prompt_lengths"][j]))
            b_idx.append(np.full(len(pos), b))
            t_idx.append(pos)
        inputs = pad_batch(seqs, self.dataset.pad_token_id)
        num_b, width = inputs.shape
        bb = torch.from_numpy(np.concatenate(b_idx))
        tt = torch.from_numpy(np.concatenate(t_idx))
        mask = torch.zeros((num_b, width), dtype=torch.bool)
        mask[bb, tt] = True
        labels = torch.full((num_b, width), losses.IGNORE_INDEX, dtype=torch.int64)
        labels[bb, tt] = inputs[bb, tt + 1]
        batch: dict[str, Any] = {
            "sample_id": torch.tensor(sids, dtype=torch.int64),
            "inputs": inputs,
            "lengths": torch.tensor([len(x) for x in seqs], dtype=torch.int64),
            "mask": mask,
            "labels": labels,
        }
        if self.view is None:
            return batch
        flat_M = bb * width + tt
        per_teacher = []
        for k in range(len(self.view.entries)):
            # Rows in batch order; a batch may span two shards, so gather per shard run.
            parts: list[Any] = []
            run: list[np.ndarray] = []
            run_shard = mine[0][0]
            for s, j in [*mine, (-1, -1)]:
                if s != run_shard:
                    tgt = loaded[run_shard]["teachers"][k].targets
                    parts.append(_take(tgt, torch.from_numpy(np.concatenate(run))))
                    run, run_shard = [], s
                if s >= 0:
                    ts: TokenShard = loaded[s]["teachers"][k]
                    run.append(np.arange(ts.row_offsets[j], ts.row_offsets[j + 1]))
            per_teacher.append(parts[0] if len(parts) == 1 else _concat(parts))
        batch["targets"] = self._combine(per_teacher, flat_M, num_b, width)
        return batch

    def _combine(self, per_teacher: list[Any], flat_M: torch.Tensor, num_b: int, width: int) -> Any:
        assert self.view is not None
        num_rows = num_b * width
        if isinstance(per_teacher[0], torch.Tensor):  # dense: scaled logits [M, V]
            lp = torch.stack([torch.log_softmax(t.float(), dim=-1) for t in per_teacher])
            comb = _targets.combine_ensemble(lp, rule=self.view.rule, weights=self.view.weights)
            full = torch.zeros((num_rows, comb.shape[-1]))
            full[flat_M] = comb
            return full.reshape(num_b, width, -1)
        if len(per_teacher) == 1:
            return _scatter_sparse(per_teacher[0], flat_M, num_rows)
        if self.combine and all(t.kind != "sampled" for t in per_teacher):
            mix = _targets.combine_sparse_ensemble(
                per_teacher, rule=self.view.rule, weights=self.view.weights
            )
            return _scatter_sparse(mix, flat_M, num_rows)
        return [_scatter_sparse(t, flat_M, num_rows) for t in per_teacher]


def _take(tgt: SparseTargets | np.ndarray, idx: torch.Tensor) -> Any:
    if isinstance(tgt, SparseTargets):
        return tgt.rows(idx)
    return torch.from_numpy(np.asarray(tgt)[idx.numpy()])


def _concat(parts: Sequence[Any]) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(list(parts))
    from kdcache.targets.sparse import concat_sparse

    return concat_sparse(parts)
