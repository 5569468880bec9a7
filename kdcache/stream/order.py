"""The student stream's sample order: a function of (seed, epoch), never of the world size.

**Order.** Each epoch has one global sequence of samples: the shards are permuted, the
samples within each shard are permuted, and (with ``shuffle_window > 1``) samples are
permuted again within consecutive windows of that many positions, so a window that
straddles a shard boundary mixes neighbouring shards. This is a shuffle buffer without
state: the window's permutation is drawn from (seed, epoch), so the memory bound is that
of a buffer of that size and a resume needs no buffer contents. A *sample* is one record
of a ``"records"`` dataset or one sequence of a ``"tokens"`` dataset; the order is the
same code for both.

**Global batches.** The sequence is cut to a whole number of global batches
``G = batch_size * world_size`` and into ``num_lanes`` equal, contiguous *lanes*. Global
batch ``i`` takes ``G / num_lanes`` consecutive positions from each lane, lane after lane;
rank ``r`` takes the contiguous slice ``[r * batch_size, (r + 1) * batch_size)`` of it. So
the samples of global step ``i`` depend on (seed, epoch, G, num_lanes) and never on the
world size, every rank runs the same number of steps, and with ``num_lanes`` a multiple
of the world size a rank reads only the shards of its own lanes (about
``num_shards / world_size`` of them plus the lane edges). ``num_lanes`` plays the part of
mosaicml/streaming's "canonical nodes": pick it once (a divisor of G, e.g. the largest
world size you plan for) and keep it for the life of a run.

Shape legend: N samples in an epoch, G global batch, B batch on one rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcache.errors import ConfigError


@dataclass
class EpochOrder:
    """Which samples each rank reads at each step.

    Args:
        shard_sizes: int64 [num_shards], samples per shard (from the dataset fingerprint).
        batch_size: Samples per step on each rank.
        world_size: Number of ranks; rank: this rank.
        seed: Seed of the order.
        shuffle: Permute shards and samples within shards (False keeps dataset order).
        shuffle_window: Stateless shuffle window (0 or 1: off).
        num_lanes: Lanes each global batch draws from equally; must divide G.
        drop_last: Cut the epoch to whole global batches (required with several ranks or
            lanes, so every rank runs the same number of steps).

    Raises:
        ConfigError: bad batch size, rank, lanes or window, or ``drop_last=False`` with
            several ranks or lanes.
    """

    shard_sizes: np.ndarray
    batch_size: int
    world_size: int = 1
    rank: int = 0
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 0
    num_lanes: int = 1
    drop_last: bool = True

    def __post_init__(self) -> None:
        self.shard_sizes = np.asarray(self.shard_sizes, dtype=np.int64)
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank {self.rank} is not in 0..{self.world_size - 1}")
        if not self.drop_last and (self.world_size > 1 or self.num_lanes > 1):
            raise ConfigError(
                "drop_last=False would give ranks different step counts; "
                "use drop_last=True with more than one rank or lane"
            )
        g = self.global_batch_size
        if self.num_lanes < 1 or g % self.num_lanes:
            raise ConfigError(
                f"num_lanes must be >= 1 and divide the global batch (batch_size "
                f"{self.batch_size} x world_size {self.world_size} = {g}), got "
                f"{self.num_lanes}; pick a divisor of the global batch"
            )
        if self.shuffle_window < 0:
            raise ConfigError(f"shuffle_window must be >= 0, got {self.shuffle_window}")

    @property
    def num_samples(self) -> int:
        return int(self.shard_sizes.sum())

    @property
    def global_batch_size(self) -> int:
        """G: samples per step over all ranks."""
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

    def epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The epoch's global sequence of samples.

        Returns:
            ``(shard_N, row_N)``: int64 arrays [N]; position p is sample ``row_N[p]`` of
            shard ``shard_N[p]``. A function of (seed, epoch, shuffle, shuffle_window).
        """
        rng = np.random.default_rng([self.seed, epoch])
        sizes = self.shard_sizes
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

    def rank_positions(self) -> tuple[np.ndarray, np.ndarray]:
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

    def schedule(
        self, epoch: int, first: int, every: int
    ) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[int, int]], dict[int, int]]:
        """Steps ``first, first + every, ...`` of this rank, and when their shards are needed.

        Returns:
            ``(steps, load_order, last_use)``: the (shard_B, row_B) of each step; the
            ``(shard, first step)`` pairs in order of first need; for each shard, the index
            (into ``steps``) of the last step that reads it, after which it can be dropped.
        """
        shard_N, row_N = self.epoch_sequence(epoch)
        positions, bounds = self.rank_positions()
        picked = np.arange(first, len(bounds) - 1, every)
        steps = [
            (shard_N[positions[lo:hi]], row_N[positions[lo:hi]])
            for lo, hi in zip(bounds[picked].tolist(), bounds[picked + 1].tolist(), strict=True)
        ]
        load_order: list[tuple[int, int]] = []
        last_use: dict[int, int] = {}
        for t, (shard_B, _) in enumerate(steps):
            for s in dict.fromkeys(shard_B.tolist()):
                if s not in last_use:
                    load_order.append((s, t))
                last_use[s] = t
        return steps, load_order, last_use
