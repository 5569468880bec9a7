"""The student-side stream: batches of inputs joined to cached soft targets by ``sample_id``.

Order is a function of (seed, epoch) only: a permutation of the shards, then of the rows
within each shard, gives one global sequence per epoch. Rank ``r`` of ``W`` takes global
positions ``r, r + W, r + 2W, ...``, and the sequence is cut to a whole number of global
batches (``batch_size * W``), so every rank yields the same number of batches and the
samples of global step ``i`` are the same for any W with the same global batch size.
The stream position is a count of global positions, so a run resumed from
``state_dict()`` (even on another world size) continues with exactly the samples an
uninterrupted run would have seen.

Shape legend: B batch, V classes, K teachers.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdcache import targets
from kdcache.cache import CacheEntry, EnsembleView, as_view
from kdcache.data import ShardedDataset
from kdcache.errors import ConfigError, SampleIdMismatchError, SpecMismatchError

log = logging.getLogger(__name__)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedStream(torch.utils.data.IterableDataset):
    """Deterministic, resumable batches of ``inputs`` (and ``labels``) from a dataset.

    Args:
        dataset: A :class:`kdcache.data.ShardedDataset`.
        batch_size: Rows per batch on each rank.
        seed: Seed of the order; the order is a function of (seed, epoch) only.
        shuffle: Permute shards and rows within shards (False keeps dataset order).
        rank: This rank; default from ``torch.distributed`` or 0.
        world_size: Number of ranks; default from ``torch.distributed`` or 1.
        drop_last: Cut the epoch to whole global batches (required when world_size > 1,
            so every rank runs the same number of steps).

    Yields:
        dicts with ``sample_id`` int64 [B], ``inputs`` [B, ...] and, when the dataset has
        them, ``labels`` int64 [B] (-100 = unlabelled).

    Raises:
        ConfigError: bad batch size, rank, or drop_last=False with several ranks, or use
            with DataLoader workers (prefetching is built in; use ``num_workers=0``).
    """

    def __init__(
        self,
        dataset: ShardedDataset,
        *,
        batch_size: int,
        seed: int = 0,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        drop_last: bool = True,
    ) -> None:
        super().__init__()
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        if not drop_last and self.world_size > 1:
            raise ConfigError(
                "drop_last=False would give ranks different step counts; "
                "use drop_last=True with more than one rank"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self.consumed = 0  # global positions consumed in the current epoch
        self._shard_sizes = [int(s["num_records"]) for s in dataset.fingerprint()["shards"]]

    # -- order ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return sum(self._shard_sizes)

    def global_length(self) -> int:
        """Global positions used per epoch (whole global batches when drop_last)."""
        n = self.num_samples
        if self.drop_last:
            g = self.batch_size * self.world_size
            return n // g * g
        return n

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        n = self.global_length() // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's global sequence as ``[(shard, row indices in that shard), ...]``."""
        rng = np.random.default_rng([self.seed, epoch])
        num_shards = len(self._shard_sizes)
        shard_order = rng.permutation(num_shards) if self.shuffle else np.arange(num_shards)
        out = []
        for s in shard_order:
            size = self._shard_sizes[int(s)]
            rows = rng.permutation(size) if self.shuffle else np.arange(size)
            out.append((int(s), rows))
        return out

    def _my_rows(self, epoch: int, start: int) -> list[tuple[int, np.ndarray]]:
        """This rank's rows from global position ``start`` on, grouped by shard."""
        end = self.global_length()
        out = []
        offset = 0
        for shard, rows in self.epoch_order(epoch):
            lo, hi = offset, offset + len(rows)
            offset = hi
            first = max(lo, start)
            # positions p in [first, min(hi, end)) with p % W == rank
            first += (self.rank - first) % self.world_size
            positions = np.arange(first, min(hi, end), self.world_size)
            if len(positions):
                out.append((shard, rows[positions - lo]))
        return out

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position of the stream: ``{"seed", "epoch", "consumed"}`` (global positions)."""
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; the seed must match (a different seed is another order).

        Raises:
            ConfigError: the seed differs.
        """
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"state was saved with seed {state['seed']}, stream has {self.seed}")
        self.epoch = int(state["epoch"])
        self.consumed = int(state["consumed"])

    # -- reading -----------------------------------------------------------------------------
    def _load(self, shard: int) -> dict[str, np.ndarray]:
        return self.dataset.read_shard(shard)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise ConfigError(
                f"{type(self).__name__} prefetches in a background thread; "
                "use DataLoader(num_workers=0, batch_size=None)"
            )
        epoch = self.epoch
        plan = self._my_rows(epoch, self.consumed)
        step = self.batch_size * self.world_size
        buffers: list[dict[str, np.ndarray]] = []
        buffered = 0
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-prefetch") as pool:
            futures = [pool.submit(self._load, s) for s, _ in plan[:2]]
            for i, (_, rows) in enumerate(plan):
                loaded = futures[i].result()
                if i + 2 < len(plan):
                    futures.append(pool.submit(self._load, plan[i + 2][0]))
                futures[i] = None  # type: ignore[call-overload]  # free the shard
                buffers.append({k: v[rows] for k, v in loaded.items()})
                buffered += len(rows)
                while buffered >= self.batch_size:
                    batch, buffers, buffered = _take(buffers, self.batch_size)
                    self.consumed += step
                    yield _to_torch(batch)
            if buffered and not self.drop_last:
                batch, buffers, buffered = _take(buffers, buffered)
                self.consumed = self.global_length()
                yield _to_torch(batch)
        self.epoch = epoch + 1
        self.consumed = 0


def _take(buffers: list[dict[str, np.ndarray]], n: int):
    merged = {k: np.concatenate([b[k] for b in buffers]) for k in buffers[0]}
    head = {k: v[:n] for k, v in merged.items()}
    tail = {k: v[n:] for k, v in merged.items()}
    rest = len(next(iter(tail.values())))
    return head, ([tail] if rest else []), rest


def _to_torch(batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


class SoftTargetDataset(ShardedStream):
    """Batches of inputs joined to cached soft targets by ``sample_id``.

    Args:
        cache: A :class:`kdcache.CacheEntry` or :class:`kdcache.EnsembleView` built over
            ``dataset`` (same fingerprint, so the same shards and ids).
        dataset: The input dataset the cache was built from (labels may differ).
        temperature: The tau the loss will use; must equal the cache's unless
            ``retemper=True`` (dense targets re-temper exactly).
        retemper: Allow a temperature different from the cache's.
        verify: Check each shard's SHA-256 against the manifest when reading.
        **kwargs: Order and sharding options of :class:`ShardedStream`.

    Yields:
        dicts with ``sample_id`` [B], ``inputs`` [B, ...], ``labels`` [B] (if any) and
        ``teacher_log_probs`` float32 [B, V]: the (ensemble-combined) log soft targets at
        ``temperature``.

    Raises:
        SpecMismatchError: the cache was built over another dataset, or at another
            temperature without ``retemper=True``.
        SampleIdMismatchError: (while iterating) a cache shard's ids differ from its input
            shard's; the message names the shard and a missing id. Nothing is zero-filled.
    """

    def __init__(
        self,
        cache: CacheEntry | EnsembleView,
        dataset: ShardedDataset,
        *,
        temperature: float | None = None,
        retemper: bool = False,
        verify: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, **kwargs)
        self.view = as_view(cache)
        first = self.view.entries[0]
        if first.dataset_fingerprint.get("shards") != dataset.fingerprint().get("shards"):
            raise SpecMismatchError(
                f"cache {first.key} was built over a different dataset (fingerprints differ); "
                "build the cache for this dataset, or pass the dataset it was built from"
            )
        self.cache_temperature = self.view.temperature
        self.temperature = self.cache_temperature if temperature is None else float(temperature)
        if self.temperature != self.cache_temperature and not retemper:
            raise SpecMismatchError(
                f"cache holds soft targets at temperature {self.cache_temperature}, "
                f"{self.temperature} was asked; pass retemper=True to re-temper exactly"
            )
        self.verify = verify

    def _load(self, shard: int) -> dict[str, np.ndarray]:
        inputs = self.dataset.read_shard(shard)
        ids, scaled_KNV = self.view.read_shard(shard, verify=self.verify)
        want = np.asarray(inputs["sample_id"], dtype=np.int64)
        if not np.array_equal(ids, want):
            missing = np.setdiff1d(want, ids)
            extra = np.setdiff1d(ids, want)
            if len(missing) or len(extra) or len(ids) != len(want):
                what = (
                    f"sample_id {int(missing[0])} is missing from the cache"
                    if len(missing)
                    else f"the cache holds sample_id {int(extra[0])} that the input lacks"
                    if len(extra)
                    else "the cache repeats a sample_id"
                )
                raise SampleIdMismatchError(
                    f"shard {shard}: cache and input disagree on sample_id ({len(missing)} "
                    f"missing, {len(extra)} extra): {what}. The cache was built from "
                    "different data; rebuild it."
                )
            order = np.argsort(ids)[np.searchsorted(ids[np.argsort(ids)], want)]
            scaled_KNV = scaled_KNV[:, order]
        scaled = torch.from_numpy(scaled_KNV)
        if self.temperature != self.cache_temperature:
            scaled = targets.retemper(scaled, self.cache_temperature, self.temperature)
        log_probs = targets.combine_ensemble(scaled, rule=self.view.rule, weights=self.view.weights)
        return {**inputs, "teacher_log_probs": log_probs.numpy()}
