"""The student-side stream: batches of inputs joined to cached soft targets by ``sample_id``.

**Order.** Each epoch has one global sequence of samples, a function of (seed, epoch)
only: the shards are permuted, the rows within each shard are permuted, and (with
``shuffle_window > 1``) rows are permuted again within consecutive windows of that many
positions, so a window that straddles a shard boundary mixes neighbouring shards. This is
a shuffle buffer without state: the window's permutation is drawn from (seed, epoch), so
the memory bound is the same as a buffer of that size and a resume needs no buffer
contents.

**Global batches.** The sequence is cut to a whole number of global batches
``G = batch_size * world_size`` and into ``num_lanes`` equal, contiguous *lanes*. Global
batch ``i`` takes ``G / num_lanes`` consecutive positions from each lane, lane after lane;
rank ``r`` takes the contiguous slice ``[r * batch_size, (r + 1) * batch_size)`` of it. So
the samples of global step ``i`` depend on (seed, epoch, G, num_lanes) and never on the
world size, every rank runs the same number of steps, and with ``num_lanes`` a multiple
of the world size a rank reads only the shards of its own lanes (about
``num_shards / world_size`` of them plus the lane edges) instead of every shard for a
``1 / world_size`` share of its rows. ``num_lanes`` plays the part of mosaicml/streaming's
"canonical nodes": pick it once (a divisor of G, e.g. the largest world size you plan
for) and keep it for the life of a run.

**Workers.** With ``num_workers = k`` (or inside a ``DataLoader`` with k workers), worker
``w`` builds this rank's steps ``w, w + k, w + 2k, ...`` of the epoch (counted from the
resume point); the DataLoader's in-order round robin hands them back as steps 0, 1, 2,
..., so the order does not depend on k. Each worker reads the shards its steps touch,
which in shard-major order are most of the rank's shards: k workers buy k-way parallel
decoding with k times the reads. Each worker also prefetches shards in a background
thread, which alone keeps the student fed when the store keeps up, so ``num_workers=0``
is the default.

**Resume.** The stream position is a count of global positions, so a run resumed from
``state_dict()`` (even on another world size, with the same G and lanes) continues with
exactly the samples an uninterrupted run would have seen.

Shape legend: B batch, V classes, K teachers, N samples in an epoch, G global batch.
"""

from __future__ import annotations

import concurrent.futures as cf
import itertools
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdcache import targets
from kdcache.data.base import ShardedDataset
from kdcache.errors import ConfigError, SampleIdMismatchError, SpecMismatchError
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView, as_view

log = logging.getLogger(__name__)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedStream(torch.utils.data.IterableDataset):
    """Deterministic, resumable batches of ``inputs`` (and ``labels``) from a dataset.

    Args:
        dataset: A :class:`kdcache.data.ShardedDataset`.
        batch_size: Rows per batch on each rank (the global batch is
            ``batch_size * world_size``).
        seed: Seed of the order; the order is a function of (seed, epoch) only.
        shuffle: Permute shards and rows within shards (False keeps dataset order).
        rank: This rank; default from ``torch.distributed`` or 0.
        world_size: Number of ranks; default from ``torch.distributed`` or 1.
        drop_last: Cut the epoch to whole global batches (required when world_size > 1,
            so every rank runs the same number of steps).
        shuffle_window: Permute rows within consecutive windows of this many positions of
            the shard-major sequence (0 or 1: off). Mixes neighbouring shards; costs
            holding the shards a window spans.
        num_lanes: Contiguous lanes of the epoch's sequence that each global batch draws
            from equally (see the module docstring). Must divide the global batch; keep it
            fixed across resumes.
        num_workers: Loader worker processes (0: read in this process, with a background
            prefetch thread). The order does not depend on it.
        prefetch_shards: Shards read ahead of need by the background thread.

    Yields:
        dicts with ``sample_id`` int64 [B], ``inputs`` [B, ...] and, when the dataset has
        them, ``labels`` int64 [B] (-100 = unlabelled).

    Raises:
        ConfigError: bad batch size, rank, lanes, window or workers, or drop_last=False
            with several ranks or lanes.
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
        shuffle_window: int = 0,
        num_lanes: int = 1,
        num_workers: int = 0,
        prefetch_shards: int = 2,
    ) -> None:
        super().__init__()
        r, w = _dist_rank_world()
        self.rank = r if rank is None else rank
        self.world_size = w if world_size is None else world_size
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        if not drop_last and (self.world_size > 1 or num_lanes > 1):
            raise ConfigError(
                "drop_last=False would give ranks different step counts; "
                "use drop_last=True with more than one rank or lane"
            )
        global_batch = batch_size * self.world_size
        if num_lanes < 1 or global_batch % num_lanes:
            raise ConfigError(
                f"num_lanes must be >= 1 and divide the global batch "
                f"(batch_size {batch_size} x world_size {self.world_size} = {global_batch}), "
                f"got {num_lanes}; pick a divisor of the global batch"
            )
        if shuffle_window < 0 or num_workers < 0 or prefetch_shards < 0:
            raise ConfigError(
                "shuffle_window, num_workers and prefetch_shards must be >= 0, got "
                f"{shuffle_window}, {num_workers}, {prefetch_shards}"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.shuffle_window = shuffle_window
        self.num_lanes = num_lanes
        self.num_workers = num_workers
        self.prefetch_shards = prefetch_shards
        self.epoch = 0
        self.consumed = 0  # global positions consumed in the current epoch
        self._shard_sizes = np.array(
            [int(s["num_records"]) for s in dataset.fingerprint()["shards"]], dtype=np.int64
        )
        if self.global_length() // self.global_batch_size < 1:
            log.warning(
                "%d samples make no global batch of %d: the stream is empty",
                self.num_samples,
                self.global_batch_size,
            )

    # -- order ---------------------------------------------------------------------------
    @property
    def num_samples(self) -> int:
        return int(self._shard_sizes.sum())

    @property
    def global_batch_size(self) -> int:
        """G: rows per step over all ranks."""
        return self.batch_size * self.world_size

    def global_length(self) -> int:
        """Global positions used per epoch (whole global batches when drop_last)."""
        n = self.num_samples
        if self.drop_last:
            g = self.global_batch_size
            return n // g * g
        return n

    def steps_per_epoch(self) -> int:
        """Global steps (= batches per rank) in a full epoch."""
        n, g = self.global_length(), self.global_batch_size
        return n // g if self.drop_last else -(-n // g)

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        return self.steps_per_epoch()

    def epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global sequence of samples.

        Returns:
            ``(shard_N, row_N)``: int64 arrays [N]; position p is row ``row_N[p]`` of
            shard ``shard_N[p]``. A function of (seed, epoch, shuffle, shuffle_window).
        """
        rng = np.random.default_rng([self.seed, epoch])
        sizes = self._shard_sizes
        num_shards = len(sizes)
        shard_order = rng.permutation(num_shards) if self.shuffle else np.arange(num_shards)
        rows = [
            rng.permutation(int(sizes[s])) if self.shuffle else np.arange(int(sizes[s]))
            for s in shard_order
        ]
        shard_N = np.repeat(shard_order.astype(np.int64), sizes[shard_order])
        row_N = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
        if self.shuffle and self.shuffle_window > 1:
            window = np.arange(len(shard_N)) // self.shuffle_window
            perm = np.lexsort((rng.random(len(shard_N)), window))
            shard_N, row_N = shard_N[perm], row_N[perm]
        return shard_N, row_N

    def epoch_order(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """The epoch's sequence as runs ``[(shard, row indices), ...]`` (for inspection)."""
        shard_N, row_N = self.epoch_sequence(epoch)
        if not len(shard_N):
            return []
        cuts = np.flatnonzero(np.diff(shard_N)) + 1
        return [
            (int(s[0]), r)
            for s, r in zip(np.split(shard_N, cuts), np.split(row_N, cuts), strict=True)
        ]

    def _rank_positions(self) -> tuple[np.ndarray, np.ndarray]:
        """This rank's positions in the epoch sequence, and step bounds into them.

        Returns:
            ``(positions, bounds)``: step ``i`` is ``positions[bounds[i]:bounds[i + 1]]``.
        """
        n, g, b = self.global_length(), self.global_batch_size, self.batch_size
        steps = self.steps_per_epoch()
        if not self.drop_last:  # one rank, one lane: plain consecutive batches
            positions = np.arange(n, dtype=np.int64)
            bounds = np.minimum(np.arange(steps + 1, dtype=np.int64) * g, n)
            return positions, bounds
        per_lane = g // self.num_lanes
        lane_len = n // self.num_lanes
        slot = np.arange(self.rank * b, (self.rank + 1) * b, dtype=np.int64)
        lane, within = slot // per_lane, slot % per_lane
        positions = (
            lane[None, :] * lane_len
            + np.arange(steps, dtype=np.int64)[:, None] * per_lane
            + within[None, :]
        )
        return positions.reshape(-1), np.arange(steps + 1, dtype=np.int64) * b

    def step_sample_positions(self, epoch: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """``[(shard_B, row_B), ...]``: what this rank reads at each step of ``epoch``."""
        shard_N, row_N = self.epoch_sequence(epoch)
        positions, bounds = self._rank_positions()
        return [
            (shard_N[positions[lo:hi]], row_N[positions[lo:hi]])
            for lo, hi in itertools.pairwise(bounds.tolist())
        ]

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position of the stream: seed, epoch, consumed global positions, and the order
        settings a resume must share (global batch, lanes, window, shuffle, samples)."""
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "global_batch_size": self.global_batch_size,
            "num_lanes": self.num_lanes,
            "shuffle_window": self.shuffle_window,
            "shuffle": self.shuffle,
            "num_samples": self.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (possibly saved on another world size).

        Raises:
            ConfigError: the seed, lanes, window, shuffle or number of samples differ (the
                order would differ), or the position is not at a global-batch boundary of
                this stream (the global batch changed).
        """
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"state was saved with seed {state['seed']}, stream has {self.seed}")
        mine = self.state_dict()
        for key in ("num_lanes", "shuffle_window", "shuffle", "num_samples"):
            if key in state and state[key] != mine[key]:
                raise ConfigError(
                    f"state was saved with {key}={state[key]!r}, this stream has "
                    f"{mine[key]!r}; resume with the settings of the saved run"
                )
        consumed = int(state["consumed"])
        if consumed % self.global_batch_size and consumed != self.global_length():
            raise ConfigError(
                f"state is {consumed} samples into epoch {state['epoch']}, not a multiple of "
                f"this stream's global batch {self.global_batch_size} (it was saved with "
                f"{state.get('global_batch_size', '?')}); keep batch_size x world_size fixed "
                "across a resume"
            )
        self.epoch = int(state["epoch"])
        self.consumed = consumed

    # -- reading -----------------------------------------------------------------------------
    def _load(self, shard: int) -> dict[str, np.ndarray]:
        return self.dataset.read_shard(shard)

    def _start(self) -> tuple[int, int]:
        """(epoch, first step) to read from, rolling over a finished epoch."""
        if self.consumed >= self.global_length() and self.consumed:
            self.epoch += 1
            self.consumed = 0
        g = self.global_batch_size
        return self.epoch, -(-self.consumed // g)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None:  # inside a DataLoader worker: this worker's steps only
            epoch, first = self._start()
            yield from self._read_steps(epoch, first + info.id, info.num_workers)
            return
        if self.num_workers > 0:
            yield from self._iter_with_workers()
            return
        epoch, first = self._start()
        for batch in self._read_steps(epoch, first, 1):
            self.consumed = min(self.consumed + self.global_batch_size, self.global_length())
            yield batch
        self.epoch = epoch + 1
        self.consumed = 0

    def _iter_with_workers(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch, _ = self._start()
        loader = torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=self.num_workers, in_order=True
        )
        for batch in loader:
            self.consumed = min(self.consumed + self.global_batch_size, self.global_length())
            yield batch
        self.epoch = epoch + 1
        self.consumed = 0

    def _read_steps(self, epoch: int, first: int, every: int) -> Iterator[dict[str, torch.Tensor]]:
        """Steps ``first, first + every, ...`` of this rank in ``epoch``, shards prefetched."""
        shard_N, row_N = self.epoch_sequence(epoch)
        positions, bounds = self._rank_positions()
        steps = np.arange(first, len(bounds) - 1, every)
        if not len(steps):
            return
        lo, hi = bounds[steps], bounds[steps + 1]
        sizes = hi - lo
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        mine = positions[np.arange(offsets[-1]) + np.repeat(lo - offsets[:-1], sizes)]
        shard_M, row_M = shard_N[mine], row_N[mine]
        local_step = np.repeat(np.arange(len(steps)), sizes)
        # load schedule: shards in order of first need, each dropped after its last need
        uniq, first_idx = np.unique(shard_M, return_index=True)
        _, last_rev = np.unique(shard_M[::-1], return_index=True)
        first_use = local_step[first_idx]
        last_steps = local_step[len(shard_M) - 1 - last_rev].tolist()
        last_use = dict(zip(uniq.tolist(), last_steps, strict=True))
        order = np.argsort(first_use, kind="stable")
        schedule = uniq[order].tolist()
        first_sorted = first_use[order]
        futures: dict[int, cf.Future] = {}
        submitted = 0
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-prefetch") as pool:
            for t in range(len(steps)):
                target = int(np.searchsorted(first_sorted, t, side="right")) + self.prefetch_shards
                while submitted < min(target, len(schedule)):
                    s = schedule[submitted]
                    futures[s] = pool.submit(self._load, s)
                    submitted += 1
                sh, rows = shard_M[offsets[t] : offsets[t + 1]], row_M[offsets[t] : offsets[t + 1]]
                yield _to_torch(_gather({s: futures[s].result() for s in np.unique(sh)}, sh, rows))
                for s in np.unique(sh).tolist():
                    if last_use[s] == t:
                        del futures[s]  # free the shard


def _gather(
    loaded: dict[int, dict[str, np.ndarray]], shard_B: np.ndarray, row_B: np.ndarray
) -> dict[str, np.ndarray]:
    """Rows ``row_B[i]`` of shards ``shard_B[i]``, in that order, for every column."""
    if len(loaded) == 1:
        (cols,) = loaded.values()
        return {k: v[row_B] for k, v in cols.items()}
    first = next(iter(loaded.values()))
    out = {k: np.empty((len(row_B), *v.shape[1:]), dtype=v.dtype) for k, v in first.items()}
    for s, cols in loaded.items():
        where = shard_B == s
        for k, v in cols.items():
            out[k][where] = v[row_B[where]]
    return out


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
        output: ``"log_probs"`` (soft targets) or ``"features"`` (entries of feature
            teachers, see :meth:`kdcache.Teacher.feature`: the stored values times the
            cache's temperature, i.e. the raw features).
        **kwargs: Order and sharding options of :class:`ShardedStream`.

    Yields:
        dicts with ``sample_id`` [B], ``inputs`` [B, ...], ``labels`` [B] (if any) and
        either ``teacher_log_probs`` float32 [B, V]: the (ensemble-combined) log soft
        targets at ``temperature``, or ``teacher_features`` float32 [B, D] (one entry) or
        [B, K, D] (K entries).

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
        output: str = "log_probs",
        **kwargs: Any,
    ) -> None:
        if output not in ("log_probs", "features"):
            raise ConfigError(f"output must be 'log_probs' or 'features', got {output!r}")
        self.output = output
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
        if self.output == "features":
            feats = np.asarray(scaled_KNV, dtype=np.float32) * np.float32(self.cache_temperature)
            feats = feats[0] if len(feats) == 1 else np.ascontiguousarray(feats.transpose(1, 0, 2))
            return {**inputs, "teacher_features": feats}
        scaled = torch.from_numpy(scaled_KNV)
        if self.temperature != self.cache_temperature:
            scaled = targets.retemper(scaled, self.cache_temperature, self.temperature)
        log_probs = targets.combine_ensemble(scaled, rule=self.view.rule, weights=self.view.weights)
        return {**inputs, "teacher_log_probs": log_probs.numpy()}
