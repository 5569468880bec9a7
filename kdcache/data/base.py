"""Input datasets for the teacher stage: sharded records, each with a stable ``sample_id``.

A dataset is anything with ``num_shards``, ``read_shard(i)`` and ``fingerprint()``
(:class:`ShardedDataset`); it must be picklable, because it travels to Ray actors.
:class:`ArrayDataset` is the in-memory implementation; the file-backed datasets of
:mod:`kdcache.data.files` are plans (files, row groups, columns) that read a shard only
where it is used, batch by batch (:class:`StreamingDataset`), and report a digest of what
they read, which the teacher stage records with each output shard.
"""

from __future__ import annotations

import hashlib
import queue
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import numpy as np

from kdcache.errors import ConfigError

#: How a dataset's samples are laid out, declared by each dataset as ``layout``:
#: ``"records"``: one sample is one row (``inputs [N, ...]``, one cached row per sample);
#: ``"tokens"``: one sample is a token sequence (ragged ``tokens`` + ``token_offsets``),
#: cached as one row per target position (:mod:`kdcache.data.tokens`).
LAYOUTS = ("records", "tokens")


@runtime_checkable
class ShardedDataset(Protocol):
    """The interface the teacher stage and the student stream read inputs through.

    Attributes:
        layout: One of :data:`LAYOUTS`; says how samples are laid out, so that nothing
            has to guess it from the columns.
    """

    layout: str

    @property
    def num_shards(self) -> int: ...

    def read_shard(self, index: int) -> dict[str, np.ndarray]:
        """Return ``{"sample_id": int64 [N], "inputs": [N, ...], "labels": int64 [N]}``
        (``labels`` optional) for shard ``index``, in a fixed order."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the records' content (goes into cache keys)."""
        ...


def _hash_arrays(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


@dataclass
class ArrayDataset:
    """Records held in memory as arrays, cut into ``num_shards`` contiguous shards.

    Args:
        sample_ids: int64, shape [N], unique.
        inputs: Any dtype, shape [N, ...]: what teachers and students consume.
        labels: int64 class ids, shape [N], or None. A label of -100 means "no label".
        num_shards: Number of shards (1..N); shard sizes differ by at most one.
        preprocessing: JSON-able description of how ``inputs`` were made from the raw data
            (goes into the fingerprint, so a change of preprocessing changes cache keys).

    Raises:
        ConfigError: shapes disagree, ids are not unique, or num_shards is out of range.
    """

    #: One sample is one row (see :data:`LAYOUTS`).
    layout = "records"

    sample_ids: np.ndarray
    inputs: np.ndarray
    labels: np.ndarray | None = None
    num_shards: int = 8
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sample_ids = np.asarray(self.sample_ids, dtype=np.int64)
        n = len(self.sample_ids)
        if self.inputs.shape[0] != n or (self.labels is not None and len(self.labels) != n):
            raise ConfigError(
                f"sample_ids ({n}), inputs ({self.inputs.shape[0]}) and labels "
                f"({None if self.labels is None else len(self.labels)}) must have the same length"
            )
        if len(np.unique(self.sample_ids)) != n:
            raise ConfigError("sample_ids must be unique")
        if not 1 <= self.num_shards <= max(n, 1):
            raise ConfigError(f"num_shards must be in 1..{n}, got {self.num_shards}")
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
        bounds = np.linspace(0, n, self.num_shards + 1).round().astype(np.int64)
        self._bounds = bounds

    def __len__(self) -> int:
        return len(self.sample_ids)

    def shard_slice(self, index: int) -> slice:
        if not 0 <= index < self.num_shards:
            raise IndexError(f"shard {index} out of range 0..{self.num_shards - 1}")
        return slice(int(self._bounds[index]), int(self._bounds[index + 1]))

    def read_shard(self, index: int) -> dict[str, np.ndarray]:
        s = self.shard_slice(index)
        out = {"sample_id": self.sample_ids[s], "inputs": self.inputs[s]}
        if self.labels is not None:
            out["labels"] = self.labels[s]
        return out

    def fingerprint(self) -> dict[str, Any]:
        """Per shard: number of records and SHA-256 over ids and inputs; plus preprocessing.

        Labels are left out on purpose: they do not change what a teacher outputs, so a
        relabelled dataset reuses the same teacher cache.
        """
        if not hasattr(self, "_fingerprint"):
            shards = []
            for i in range(self.num_shards):
                s = self.shard_slice(i)
                shards.append(
                    {
                        "num_records": s.stop - s.start,
                        "sha256": _hash_arrays(self.sample_ids[s], self.inputs[s]),
                    }
                )
            self._fingerprint = {
                "num_records": len(self),
                "preprocessing": self.preprocessing,
                "shards": shards,
            }
        return self._fingerprint

    def subset(self, indices: np.ndarray, num_shards: int | None = None) -> ArrayDataset:
        """A new dataset over the rows at ``indices`` (ids kept), resharded."""
        return ArrayDataset(
            self.sample_ids[indices],
            self.inputs[indices],
            None if self.labels is None else self.labels[indices],
            num_shards=num_shards or self.num_shards,
            preprocessing=self.preprocessing,
        )


def dataset_layout(dataset: ShardedDataset) -> str:
    """The dataset's declared :data:`LAYOUTS` entry.

    Raises:
        ConfigError: the dataset declares no ``layout`` or an unknown one.
    """
    layout = getattr(dataset, "layout", None)
    if layout not in LAYOUTS:
        raise ConfigError(
            f"{type(dataset).__name__} declares layout={layout!r}; a ShardedDataset must set "
            f"the class attribute layout to one of {LAYOUTS} ('records': a sample is a row, "
            "'tokens': a sample is a token sequence)"
        )
    return str(layout)


class ShardBatches:
    """The batches of one input shard, read lazily, in the shard's fixed order.

    Iterate it once; each item is a batch ``{"sample_id": int64 [B], "inputs": [B, ...],
    "labels": int64 [B]}`` (``labels`` optional). After the last batch, :attr:`digest` is
    the hex SHA-256 of what was read (the shard's content fingerprint), or None when the
    dataset does not compute one.

    Attributes:
        index: The shard's index.
        num_records: Rows in the shard (known before reading, from the plan).
        digest: Set when iteration is complete.
    """

    def __init__(self, index: int, num_records: int, batches: Iterable[dict[str, Any]]) -> None:
        self.index = index
        self.num_records = num_records
        self.digest: str | None = None
        self._batches = batches

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self._batches)


@runtime_checkable
class StreamingDataset(ShardedDataset, Protocol):
    """A :class:`ShardedDataset` that reads a shard batch by batch and fingerprints what it
    read (the file-backed datasets of :mod:`kdcache.data.files`)."""

    def open_shard(self, index: int, batch_size: int) -> ShardBatches:
        """The batches of shard ``index``, at most ``batch_size`` rows each, read lazily."""
        ...


def declared_shard_records(fingerprint: Any) -> list[int] | None:
    """Records per shard as a fingerprint declares them (``shards[i]["num_records"]``),
    or None when it declares none for some shard (a plan that knows its records only once
    a shard is read, such as text cut in byte ranges)."""
    shards = fingerprint.get("shards") if isinstance(fingerprint, dict) else None
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("num_records"), int) for s in shards
    ):
        return None
    return [int(s["num_records"]) for s in shards]


def open_shard(dataset: ShardedDataset, index: int, batch_size: int) -> ShardBatches:
    """Batches of shard ``index`` of any dataset: the dataset's own lazy reader when it has
    one (:class:`StreamingDataset`), else ``read_shard`` cut into batches (digest None).

    Raises:
        ConfigError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(dataset, StreamingDataset):
        return dataset.open_shard(index, batch_size)
    shard = dataset.read_shard(index)
    n = len(shard["sample_id"])
    batches = (
        {k: v[lo : lo + batch_size] for k, v in shard.items()} for lo in range(0, n, batch_size)
    )
    return ShardBatches(index, n, batches)


def read_shard_checked(dataset: ShardedDataset, index: int) -> tuple[dict[str, Any], str | None]:
    """Read a whole shard and its content digest (None for datasets without one).

    Returns:
        ``(shard, digest)``: the shard as :meth:`ShardedDataset.read_shard` returns it.
    """
    if not isinstance(dataset, StreamingDataset):
        return dataset.read_shard(index), None
    reader = dataset.open_shard(index, 1 << 62)
    parts = list(reader)
    if len(parts) == 1:
        return parts[0], reader.digest
    if not parts:
        return dataset.read_shard(index), reader.digest
    keys = parts[0].keys()
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}, reader.digest


_T = TypeVar("_T")
_DONE = object()


def prefetch(items: Iterable[_T], depth: int = 2) -> Iterator[_T]:
    """Iterate ``items`` on a background thread, at most ``depth`` items ahead.

    Reading and decoding (pyarrow, numpy: they release the GIL) then overlap with the
    consumer's work (a teacher's forward pass), with memory bounded by ``depth`` items.
    An exception in the producer is raised in the consumer, at the item where it happened;
    closing the returned generator early stops the producer.

    Raises:
        ConfigError: ``depth`` < 1.
    """
    if depth < 1:
        raise ConfigError(f"prefetch depth must be >= 1, got {depth}")
    q: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                while not stop.is_set():
                    try:
                        q.put((item, None), timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            q.put((_DONE, None))
        except BaseException as exc:  # handed to the consumer, raised there
            q.put((_DONE, exc))

    thread = threading.Thread(target=produce, name="kdcache-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, exc = q.get()
            if item is _DONE:
                if exc is not None:
                    raise exc
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)
