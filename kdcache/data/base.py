"""Input datasets for the teacher stage: sharded records, each with a stable ``sample_id``.

A dataset is anything with ``num_shards``, ``read_shard(i)`` and ``fingerprint()``
(:class:`ShardedDataset`); it must be picklable, because it travels to Ray actors.
:class:`ArrayDataset` is the in-memory implementation; :func:`read_idx` reads the IDX
files MNIST-style datasets ship in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

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
