"""The student-side stream: one dataset class for every layout.

:class:`ShardedStream` reads inputs alone (hard labels); :class:`SoftTargetDataset` joins
them to cached soft targets by ``sample_id``. Both share one order
(:class:`kdcache.stream.order.EpochOrder`: a function of (seed, epoch), never of the
world size, cut into lanes and global batches), one reading loop (shards prefetched in a
background thread, dropped after their last use; DataLoader workers), one resume state
and one set of join checks (:mod:`kdcache.stream.join`). Only collation differs by
layout (:mod:`kdcache.stream.collate`): records with dense, sparse or feature targets,
and token sequences. The dataset declares its layout (``dataset.layout``); nothing is
guessed from its columns.

**Workers.** With ``num_workers = k`` (or inside a ``DataLoader`` with k workers), worker
``w`` builds this rank's steps ``w, w + k, w + 2k, ...`` of the epoch (counted from the
resume point); the DataLoader's in-order round robin hands them back as steps 0, 1, 2,
..., so the order does not depend on k. Each worker reads the shards its steps touch.
Each worker also prefetches shards in a background thread, which alone keeps the
student fed when the store keeps up, so ``num_workers=0`` is the default.

**Threads.** The prefetch thread reads with numpy and pyarrow; a shard's torch work (the
layout's ``finish``: re-tempering, the ensemble combination) runs there only where torch
runs one thread there, else once per shard in the consuming thread at the shard's first
need. With several torch threads the training thread already keeps every core busy, and
a second torch thread team in the prefetch thread would oversubscribe them.

**Resume.** The stream position is a count of global positions, so a run resumed from
``state_dict()`` (even on another world size, with the same global batch and lanes)
continues with exactly the samples an uninterrupted run would have seen.
"""

from __future__ import annotations

import bisect
import concurrent.futures as cf
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kdcache.data.base import ShardedDataset, dataset_layout, declared_shard_records
from kdcache.errors import CacheReadOnlyError, ConfigError
from kdcache.stores.combined import combinable
from kdcache.stores.entry import CacheEntry
from kdcache.stores.view import EnsembleView, as_view, check_reader
from kdcache.stream.collate import (
    DenseLayout,
    FeatureLayout,
    Layout,
    RecordLayout,
    SparseLayout,
    TokenLayout,
)
from kdcache.stream.join import check_same_dataset
from kdcache.stream.order import EpochOrder

log = logging.getLogger(__name__)


def _dist_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardedStream(torch.utils.data.IterableDataset):
    """Deterministic, resumable batches of a dataset's inputs (and labels).

    Args:
        dataset: A :class:`kdcache.data.ShardedDataset` of any layout.
        batch_size: Samples (records or sequences) per batch on each rank (the global
            batch is ``batch_size * world_size``).
        seed: Seed of the order; the order is a function of (seed, epoch) only.
        shuffle: Permute shards and samples within shards (False keeps dataset order).
        rank: This rank; default from ``torch.distributed`` or 0.
        world_size: Number of ranks; default from ``torch.distributed`` or 1.
        drop_last: Cut the epoch to whole global batches (required when world_size > 1,
            so every rank runs the same number of steps).
        shuffle_window: Permute samples within consecutive windows of this many positions
            of the shard-major sequence (0 or 1: off). Mixes neighbouring shards; costs
            holding the shards a window spans.
        num_lanes: Contiguous lanes of the epoch's sequence that each global batch draws
            from equally (see :mod:`kdcache.stream.order`). Must divide the global batch;
            keep it fixed across resumes.
        num_workers: Loader worker processes (0: read in this process, with a background
            prefetch thread). The order does not depend on it.
        prefetch_shards: Shards read ahead of need by the background thread.

    Yields:
        Batches as :mod:`kdcache.stream.collate` describes for the dataset's layout.

    Raises:
        ConfigError: bad batch size, rank, lanes, window or workers, drop_last=False with
            several ranks or lanes, or a dataset that declares no known layout.
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
        if num_workers < 0 or prefetch_shards < 0:
            raise ConfigError(
                "num_workers and prefetch_shards must be >= 0, got "
                f"{num_workers}, {prefetch_shards}"
            )
        self.dataset = dataset
        self.layout_name = dataset_layout(dataset)
        sizes = self._shard_sizes()
        self.order = EpochOrder(
            np.array(sizes, dtype=np.int64),
            batch_size=batch_size,
            world_size=w if world_size is None else world_size,
            rank=r if rank is None else rank,
            seed=seed,
            shuffle=shuffle,
            shuffle_window=shuffle_window,
            num_lanes=num_lanes,
            drop_last=drop_last,
        )
        self.num_workers = num_workers
        self.prefetch_shards = prefetch_shards
        self.epoch = 0
        self.consumed = 0  # global positions consumed in the current epoch
        self.layout: Layout = self._make_layout()
        if self.order.global_length() // self.global_batch_size < 1:
            log.warning(
                "%d samples make no global batch of %d: the stream is empty",
                self.num_samples,
                self.global_batch_size,
            )
        elif drop_last and self.order.global_length() < self.num_samples:
            log.info(
                "each epoch streams %d of %d samples in whole global batches of %d "
                "(drop_last=True; with shuffle, which samples are left out changes every epoch)",
                self.order.global_length(),
                self.num_samples,
                self.global_batch_size,
            )

    def _make_layout(self) -> Layout:
        if self.layout_name == "tokens":
            return TokenLayout(self.dataset, None)
        return RecordLayout(self.dataset)

    def _shard_sizes(self) -> list[int]:
        """Samples per shard, which the order is made of: the dataset fingerprint's
        ``num_records``; for a plan that declares none (text read in byte ranges), the
        dataset's own count (:meth:`kdcache.TextDataset.shard_counts`, one scan).

        Raises:
            ConfigError: neither is there.
        """
        declared = declared_shard_records(self.dataset.fingerprint())
        if declared is not None:
            return declared
        count = getattr(self.dataset, "shard_counts", None)
        if count is None:
            raise ConfigError(
                f"{type(self.dataset).__name__} declares no records per shard (no "
                "num_records in its fingerprint, no shard_counts()); the stream cannot order "
                "its samples"
            )
        return [int(n) for n in count()]

    # -- order (see kdcache.stream.order) -----------------------------------------------
    @property
    def rank(self) -> int:
        return self.order.rank

    @property
    def world_size(self) -> int:
        return self.order.world_size

    @property
    def batch_size(self) -> int:
        return self.order.batch_size

    @property
    def seed(self) -> int:
        return self.order.seed

    @property
    def num_samples(self) -> int:
        return self.order.num_samples

    @property
    def global_batch_size(self) -> int:
        """G: samples per step over all ranks."""
        return self.order.global_batch_size

    def global_length(self) -> int:
        """Global positions used per epoch (whole global batches when drop_last)."""
        return self.order.global_length()

    def steps_per_epoch(self) -> int:
        """Global steps (= batches per rank) in a full epoch."""
        return self.order.steps_per_epoch()

    def __len__(self) -> int:
        """Batches this rank yields in a full epoch."""
        return self.order.steps_per_epoch()

    def epoch_sequence(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`kdcache.stream.order.EpochOrder.epoch_sequence`."""
        return self.order.epoch_sequence(epoch)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Position of the stream: seed, epoch, consumed global positions, and the order
        settings a resume must share (global batch, lanes, window, shuffle, samples)."""
        o = self.order
        return {
            "seed": o.seed,
            "epoch": self.epoch,
            "consumed": self.consumed,
            "global_batch_size": o.global_batch_size,
            "num_lanes": o.num_lanes,
            "shuffle_window": o.shuffle_window,
            "shuffle": o.shuffle,
            "num_samples": o.num_samples,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (possibly saved on another world size).

        Raises:
            ConfigError: the seed, lanes, window, shuffle or number of samples differ (the
                order would differ), or the global batch differs (the state's
                ``global_batch_size``; for a state without it, a position that is not at
                a global-batch boundary of this stream).
        """
        if int(state["seed"]) != self.seed:
            raise ConfigError(f"state was saved with seed {state['seed']}, stream has {self.seed}")
        saved_batch = state.get("global_batch_size")
        if saved_batch is not None and int(saved_batch) != self.global_batch_size:
            raise ConfigError(
                f"the stream state was saved with a global batch of {int(saved_batch)} "
                f"samples per step (batch_size x world_size), this stream has "
                f"{self.global_batch_size} ({self.batch_size} x {self.world_size}); resume "
                f"with a global batch of {int(saved_batch)} (any world size that divides "
                "it), or start a new run instead of resuming this one"
            )
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
    def _load(self, shard: int) -> Any:
        return self.layout.load(shard)

    def _load_ahead(self, shard: int) -> tuple[bool, Any]:
        """In the prefetch thread: ``(True, finished shard)`` where torch runs one thread
        here, else ``(False, loaded shard)`` for the consumer to finish (a torch thread
        team of this thread's own would fight the training thread's for the cores)."""
        raw = self._load(shard)
        if torch.get_num_threads() == 1:
            return True, self.layout.finish(raw)
        return False, raw

    def _start(self) -> tuple[int, int]:
        """(epoch, first step) to read from, rolling over a finished epoch."""
        if self.consumed >= self.global_length() and self.consumed:
            self.epoch += 1
            self.consumed = 0
        g = self.global_batch_size
        return self.epoch, -(-self.consumed // g)

    def __iter__(self) -> Iterator[Any]:
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

    def _iter_with_workers(self) -> Iterator[Any]:
        epoch, _ = self._start()
        loader = torch.utils.data.DataLoader(
            self, batch_size=None, num_workers=self.num_workers, in_order=True
        )
        for batch in loader:
            self.consumed = min(self.consumed + self.global_batch_size, self.global_length())
            yield batch
        self.epoch = epoch + 1
        self.consumed = 0

    def _read_steps(self, epoch: int, first: int, every: int) -> Iterator[Any]:
        """Steps ``first, first + every, ...`` of this rank in ``epoch``, shards prefetched
        in order of first need and dropped after their last need."""
        steps, load_order, last_use = self.order.schedule(epoch, first, every)
        if not steps:
            return
        first_need = [t for _, t in load_order]  # non-decreasing
        futures: dict[int, cf.Future] = {}
        ready: dict[int, Any] = {}  # finished shards, until their last use
        submitted = 0
        with cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kdcache-prefetch") as pool:
            for t, (shard_B, row_B) in enumerate(steps):
                # every shard step t needs, plus prefetch_shards more ahead of need
                target = bisect.bisect_right(first_need, t) + self.prefetch_shards
                while submitted < min(target, len(load_order)):
                    s = load_order[submitted][0]
                    futures[s] = pool.submit(self._load_ahead, s)
                    submitted += 1
                here = dict.fromkeys(shard_B.tolist())
                for s in here:
                    if s not in ready:  # first need: finish it here if the thread did not
                        finished, value = futures.pop(s).result()
                        ready[s] = value if finished else self.layout.finish(value)
                loaded = {s: ready[s] for s in here}
                yield self.layout.collate(loaded, shard_B, row_B)
                for s in here:
                    if last_use[s] == t:
                        del ready[s]  # free the shard


class SoftTargetDataset(ShardedStream):
    """Batches of inputs joined to cached soft targets by ``sample_id``, for every layout.

    Args:
        cache: A :class:`kdcache.CacheEntry` or :class:`kdcache.EnsembleView` built over
            ``dataset`` (same fingerprint, so the same shards and ids).
        dataset: The input dataset the cache was built from (labels may differ).
        temperature: The tau the loss will use; must equal the cache's unless
            ``retemper=True`` (dense targets re-temper exactly; sparse top-k/top-p targets
            at their stored grid temperatures).
        retemper: Allow a temperature different from the cache's.
        verify: Check each cache shard's size and checksum against the manifest.
        output: ``"log_probs"`` (soft targets) or ``"features"`` (entries of feature
            teachers, see :meth:`kdcache.Teacher.feature`: the raw features).
        combine: Combine K sparse top-k/top-p teachers into one mixture per batch
            (:func:`kdcache.targets.combine_sparse_ensemble`); False keeps a list of K.
            Sampled teachers are never combined: their losses are summed.
        combined: For a dense view of K >= 2 teachers whose rule reads only their outputs
            (:mod:`kdcache.stores.combined`): read its combined entry at ``temperature``
            (one file per shard, no arithmetic; the same floats as combining here).
            None (default): when that entry exists; True: make it first if it does not
            (:meth:`kdcache.EnsembleView.materialize`, a pass over the view; call it on
            one process before starting several ranks; on a read-only cache root it warns
            and combines at read time); False: combine at read time. Ignored where it
            does not apply. :attr:`combined_entry` says what is read.
        **kwargs: Order and sharding options of :class:`ShardedStream`.

    Yields:
        Batches as :mod:`kdcache.stream.collate` describes: ``teacher_log_probs`` [B, V]
        for dense records, ``targets`` (SparseTargets or a list) for sparse records and
        for token sequences, ``teacher_features`` for feature entries.

    Raises:
        SpecMismatchError: the cache was built over another dataset (names both
            fingerprints), or at another temperature without ``retemper=True``, or it is a
            combined entry and another temperature was asked (it cannot re-temper).
        ConfigError: features asked of a token or sparse cache, or a bad option.
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
        combine: bool = True,
        combined: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if output not in ("log_probs", "features"):
            raise ConfigError(f"output must be 'log_probs' or 'features', got {output!r}")
        if combined is not None and not isinstance(combined, bool):
            raise ConfigError(f"combined must be None, True or False, got {combined!r}")
        self.output = output
        self.view = as_view(cache)
        check_same_dataset(self.view, dataset)
        self.cache_temperature = self.view.temperature
        self.temperature = self.cache_temperature if temperature is None else float(temperature)
        check_reader(self.view, temperature=self.temperature, retemper=retemper)
        self.verify = verify
        self.combine = combine
        #: The combined entry this stream reads in place of the view, or None.
        self.combined_entry: CacheEntry | None = None
        super().__init__(dataset, **kwargs)  # every option checked before anything is written
        if combined is not False and output == "log_probs" and combinable(self.view) is None:
            self._use_combined(make=bool(combined))

    def _use_combined(self, *, make: bool) -> None:
        """Read the view's combined entry at the stream's temperature, if it exists (made
        first with ``make``; a read-only cache root falls back to combining per shard)."""
        try:
            entry = (
                self.view.materialize(self.temperature, verify=self.verify)
                if make
                else self.view.combined_entry(self.temperature)
            )
        except CacheReadOnlyError as exc:
            log.warning("%s; combining at read time", exc)
            return
        if not entry.is_complete:
            return
        log.info(
            "reading the combined entry %s of view %s at temperature %g",
            entry.key,
            self.view.key,
            self.temperature,
        )
        self.combined_entry = entry
        self.view = as_view(entry)
        self.cache_temperature = self.temperature
        self.layout = self._make_layout()

    def _shard_sizes(self) -> list[int]:
        """As :meth:`ShardedStream._shard_sizes`, except that a plan without counts takes
        them from the cache: each shard's commit record holds the samples its teacher read
        (sequences of a token-level entry), so nothing is scanned on the driver."""
        declared = declared_shard_records(self.dataset.fingerprint())
        if declared is not None:
            return declared
        entry = self.view.entries[0]
        return [entry.shard_samples(i) for i in range(entry.num_shards)]

    def _make_layout(self) -> Layout:
        view, tau = self.view, self.temperature
        if self.layout_name == "tokens":
            if self.output == "features" or tau != self.cache_temperature:
                raise ConfigError(
                    "a token-level cache streams soft targets at its own temperature "
                    f"({self.cache_temperature}); output='features' and re-tempering are "
                    "for record caches"
                )
            return TokenLayout(self.dataset, view, verify=self.verify, combine=self.combine)
        if self.output == "features":
            if view.is_combined:
                raise ConfigError(
                    "output='features' needs a feature entry; this is an ensemble's combined "
                    "soft targets"
                )
            if view.is_sparse:
                raise ConfigError("output='features' needs a dense feature entry")
            return FeatureLayout(self.dataset, view, temperature=tau, verify=self.verify)
        if view.is_sparse:
            return SparseLayout(
                self.dataset, view, temperature=tau, verify=self.verify, combine=self.combine
            )
        return DenseLayout(self.dataset, view, temperature=tau, verify=self.verify)
