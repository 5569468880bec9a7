"""K augmented views per sample: soft targets per view, cached once, replayed by the student.

:class:`AugmentedViews` wraps a ``"records"`` dataset. Each base record ``sample_id`` becomes
K records, one per view ``v`` in ``0..K-1``, with the id ``sample_id * K + v`` (int64;
ids that would overflow are refused) and the base record's inputs augmented with
parameters drawn from ``(seed, sample_id, v)`` by a counter-based generator
(:class:`ViewRandom`). The parameters depend on nothing else (not the shard, the batch
size, the worker or the reading order), so the teacher stage and the student stream,
each reading the same ``AugmentedViews``, see the same augmented input for a given id:
the stored soft target of a view is the teachers' output on exactly the input the
student trains on. The teachers run once; the student still trains with augmentation.
This is the stored-soft-labels-per-view idea of FKD (Shen and Xing, "A Fast Knowledge
Distillation Framework for Visual Recognition", ECCV 2022, sec. 3) and ReLabel (Yun et
al., "Re-labeling ImageNet", CVPR 2021, sec. 3), for any augmentation written as
``draw`` + ``apply``.

The augmentation is an :class:`Augmentation`, named by import path like a
:class:`kdcache.data.Transform`; its fingerprint (path, kwargs, source hash), K and the
seed go into every shard's fingerprint, hence into the cache key, and into the join's
dataset check (:func:`kdcache.stream.join.check_same_dataset`), which refuses a student
stream whose augmentation, K or seed differs from the cache's, naming the field.

Records (batches and shards): ``sample_id`` int64 [R] (the view's id), ``inputs``
[R, ...] (augmented), ``labels`` int64 [R] (the base record's, when it has them),
``view`` int64 [R], ``base_sample_id`` int64 [R], and ``augmentation`` int64 [R, P] (the
drawn parameters, so the plan is inspectable and replayable). Within a shard, rows are
sample-major: the K views of a base record are consecutive.

**One view per sample per epoch** (:func:`epoch_views`: epoch ``e`` uses view
``(e + h(sample_id)) mod K``) is the rule, but the student stream cannot express it
today: its order (:class:`kdcache.stream.order.EpochOrder`) permutes all rows of fixed
shard sizes as a function of (seed, epoch) and knows no sample ids, and the join needs a
cache shard's ids to be exactly its input shard's. Streaming every K views per epoch is
the default and the only choice of :class:`kdcache.SoftTargetDataset` here.

Shape legend: B base records in a batch, R = B * K view rows, P augmentation parameters.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.data.base import ShardBatches, ShardedDataset, dataset_layout, open_shard
from kdcache.errors import ConfigError, DataError
from kdcache.imports import import_object

_INT64_MAX = int(np.iinfo(np.int64).max)
_INT64_MIN = int(np.iinfo(np.int64).min)
#: SplitMix64's increment (the golden ratio in 64 bits) and its finaliser's multipliers.
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
#: Domain tags, so that the per-view draws and the epoch-view hash never share a stream.
_TAG_DRAW, _TAG_EPOCH = 1, 2


def _mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on uint64 arrays (a bijection of 64-bit words; wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * _M1
    x = x ^ (x >> np.uint64(27))
    x = x * _M2
    return x ^ (x >> np.uint64(31))


def _as_u64(values: Any) -> np.ndarray:
    """int64 (two's complement) or Python ints as uint64 words, as arrays."""
    return np.atleast_1d(np.asarray(values, dtype=np.int64)).view(np.uint64)


def _counter_hash(*words: Any) -> np.ndarray:
    """A 64-bit hash of a tuple of int64 words (arrays broadcast), chained SplitMix64."""
    h = np.zeros(1, np.uint64)
    for w in words:
        h = _mix64(h + _as_u64(w) + _GAMMA)
    return h


class ViewRandom:
    """Counter-based random numbers for R (sample, view) rows, for an augmentation's ``draw``.

    Draw ``j`` of row ``r`` is a function of ``(seed, sample_id[r], view[r], j)`` only:
    SplitMix64's finaliser chained over the four words (Steele, Lea and Flood, "Fast
    Splittable Pseudorandom Number Generators", OOPSLA 2014; the counter-based design of
    Salmon et al., "Parallel Random Numbers: As Easy as 1, 2, 3", SC 2011). So any worker,
    shard or batch size draws the same parameters for the same row. Each call to
    :meth:`bits`, :meth:`integers` or :meth:`random` uses the next ``j``.

    Args:
        seed: The views' seed, an int in ``0 .. 2**63 - 1``.
        sample_ids_R: int64 [R], the base records' ids.
        views_R: int64 [R], each row's view in ``0..K-1``.

    Attributes:
        num_rows: R.
    """

    def __init__(self, seed: int, sample_ids_R: np.ndarray, views_R: np.ndarray) -> None:
        self._ids = np.asarray(sample_ids_R, dtype=np.int64)
        self._views = np.asarray(views_R, dtype=np.int64)
        if self._ids.shape != self._views.shape or self._ids.ndim != 1:
            raise ConfigError(
                f"ViewRandom takes sample_ids [R] and views [R], got shapes "
                f"{self._ids.shape} and {self._views.shape}"
            )
        self._seed = int(seed)
        self._row_key = _counter_hash(_TAG_DRAW, self._seed, self._ids, self._views)
        self._next = 0
        self.num_rows = len(self._ids)

    def bits(self) -> np.ndarray:
        """The next draw: uint64 [R], uniform over 64-bit words."""
        j = self._next
        self._next += 1
        return _mix64(self._row_key + _as_u64(j) * _GAMMA + _GAMMA)

    def random(self) -> np.ndarray:
        """The next draw as float64 [R], uniform in [0, 1) (53 bits)."""
        return (self.bits() >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))

    def integers(self, low: int, high: int) -> np.ndarray:
        """The next draw as int64 [R], uniform in ``low .. high - 1`` (bias below 2**-40
        for ranges under 2**13, from the 53-bit uniform).

        Raises:
            ConfigError: ``high <= low``.
        """
        if high <= low:
            raise ConfigError(f"integers(low, high) needs high > low, got {low}, {high}")
        u = self.random()
        return np.minimum(low + np.floor(u * (high - low)).astype(np.int64), high - 1)


def epoch_views(sample_ids_B: np.ndarray, epoch: int, num_views: int) -> np.ndarray:
    """The view each sample uses in ``epoch`` when a student takes one view per sample per
    epoch: ``(epoch + h(sample_id)) mod K``, with ``h`` a fixed 64-bit hash of the id.

    Over K consecutive epochs every sample uses each of its K views once, and the samples
    of one epoch are spread over all views.

    Args:
        sample_ids_B: int64 [B], base records' ids.
        epoch: Epoch number, >= 0.
        num_views: K >= 1.

    Returns:
        int64 [B] in ``0..K-1``.

    Raises:
        ConfigError: ``epoch`` < 0 or ``num_views`` < 1.
    """
    if epoch < 0 or num_views < 1:
        raise ConfigError(f"epoch must be >= 0 and num_views >= 1, got {epoch}, {num_views}")
    ids = np.asarray(sample_ids_B, dtype=np.int64)
    h = _counter_hash(_TAG_EPOCH, ids)
    return ((h % np.uint64(num_views)).astype(np.int64) + epoch) % num_views


@dataclass(frozen=True)
class Augmentation:
    """A random augmentation named by import path: ``draw`` its parameters, ``apply`` them.

    The path names an object (a module, a class or an instance) with two callables:

    * ``draw(rng, **kwargs) -> params_RP``: integer array [R, P], the parameters of each
      row, drawn only from ``rng`` (a :class:`ViewRandom` over R rows);
    * ``apply(inputs_R, params_RP, **kwargs) -> outputs_R``: the augmented inputs
      [R, ...] (inputs may be read-only; return a new array), a pure function of its
      arguments.

    It pickles as its path and kwargs (the object is imported where the batch is read).

    Args:
        path: ``"package.module:object"`` (or ``"package.module.object"``).
        kwargs: JSON-able keyword arguments for both ``draw`` and ``apply``.

    Raises:
        ConfigError: ``path`` is not a string, or ``kwargs`` is not a JSON-able dict.

    Example:
        >>> aug = Augmentation("pipelines.augment:shift_flip", {"max_shift": 2})
        >>> aug.kwargs
        {'max_shift': 2}
    """

    path: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path.strip():
            raise ConfigError(
                f"Augmentation(path=...) takes an import path like 'package.module:object', "
                f"got {self.path!r}"
            )
        if not isinstance(self.kwargs, dict):
            raise ConfigError(
                f"Augmentation {self.path!r}: kwargs must be a dict, got "
                f"{type(self.kwargs).__name__}"
            )
        try:
            json.dumps(self.kwargs, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"Augmentation {self.path!r}: kwargs must be JSON-able (they go into the "
                f"dataset fingerprint), got {self.kwargs!r}: {exc}"
            ) from None

    def __hash__(self) -> int:
        return hash((self.path, json.dumps(self.kwargs, sort_keys=True)))

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "kwargs": self.kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "path", state["path"])
        object.__setattr__(self, "kwargs", state["kwargs"])

    def resolve(self) -> Any:
        """The object, imported on first use and kept (never pickled).

        Raises:
            ConfigError: the path does not import, or the object lacks callable ``draw``
                and ``apply``.
        """
        cached = self.__dict__.get("_resolved")
        if cached is not None:
            return cached
        obj = import_object(self.path)
        missing = [n for n in ("draw", "apply") if not callable(getattr(obj, n, None))]
        if missing:
            raise ConfigError(
                f"augmentation {self.path!r} names a {type(obj).__name__} without callable "
                f"{' and '.join(missing)}; it must offer draw(rng, **kwargs) -> int [R, P] "
                "and apply(inputs, params, **kwargs) -> [R, ...]"
            )
        object.__setattr__(self, "_resolved", obj)
        return obj

    def draw(self, rng: ViewRandom, *, where: str) -> np.ndarray:
        """The parameters of ``rng.num_rows`` rows: int64 [R, P].

        Raises:
            DataError: ``draw`` raised, or returned other than an integer array [R, P].
        """
        obj = self.resolve()
        try:
            params = np.asarray(obj.draw(rng, **self.kwargs))
        except Exception as exc:
            raise DataError(
                f"augmentation {self.path!r} (kwargs {self.kwargs!r}) failed to draw "
                f"parameters on {where}: {type(exc).__name__}: {exc}"
            ) from exc
        if params.ndim != 2 or len(params) != rng.num_rows or params.dtype.kind not in "iu":
            raise DataError(
                f"augmentation {self.path!r}.draw returned {params.dtype} {params.shape} on "
                f"{where}; expected an integer array [R, P] with R = {rng.num_rows}"
            )
        return params.astype(np.int64, copy=False)

    def apply(self, inputs_R: Any, params_RP: np.ndarray, *, where: str) -> Any:
        """The augmented inputs [R, ...].

        Raises:
            DataError: ``apply`` raised, or returned other than R rows.
        """
        obj = self.resolve()
        try:
            out = obj.apply(inputs_R, params_RP, **self.kwargs)
        except Exception as exc:
            raise DataError(
                f"augmentation {self.path!r} (kwargs {self.kwargs!r}) failed to apply on "
                f"{where}, {len(params_RP)} rows: {type(exc).__name__}: {exc}"
            ) from exc
        shape = getattr(out, "shape", None)
        if shape is None or len(shape) == 0 or int(shape[0]) != len(params_RP):
            raise DataError(
                f"augmentation {self.path!r}.apply returned "
                f"{type(out).__name__} {None if shape is None else tuple(shape)} on {where}; "
                f"expected an array [R, ...] with R = {len(params_RP)}"
            )
        return out

    def fingerprint(self) -> dict[str, Any]:
        """``{"path", "kwargs", "source_sha256"}``; imports the object.

        ``source_sha256`` is the SHA-256 of the source of the module that defines the
        object (not only of ``draw`` and ``apply``: an edit of a helper they call must
        change the key too); None when there is no Python source.
        """
        obj = self.resolve()
        module_name = obj.__name__ if inspect.ismodule(obj) else None
        if module_name is None:
            owner = obj if inspect.isclass(obj) or inspect.isfunction(obj) else type(obj)
            module_name = getattr(owner, "__module__", None)
        module = sys.modules.get(module_name or "")
        try:
            source: str | None = inspect.getsource(module) if module is not None else None
        except (OSError, TypeError):
            source = None
        return {
            "path": self.path,
            "kwargs": self.kwargs,
            "source_sha256": None
            if source is None
            else hashlib.sha256(source.encode()).hexdigest(),
        }


class Identity:
    """The augmentation that changes nothing (P = 0): K identical views, for examples and
    for checking that a view cache equals the plain one."""

    def draw(self, rng: ViewRandom) -> np.ndarray:
        """int64 [R, 0]."""
        return np.zeros((rng.num_rows, 0), np.int64)

    def apply(self, inputs_R: Any, params_RP: np.ndarray) -> Any:
        """A copy of ``inputs_R``."""
        return np.array(inputs_R, copy=True)


#: ``Augmentation("kdcache.data.views:identity")``.
identity = Identity()


class AugmentedViews:
    """K augmented views of each record of a ``"records"`` dataset (see the module docstring).

    A :class:`kdcache.data.StreamingDataset`: the teacher stage reads it batch by batch
    (through the base dataset's own lazy reader, whose content digest it reports), and
    the student stream reads it whole shard by shard; both get identical rows.

    Args:
        dataset: The base dataset (``layout = "records"``), any ShardedDataset.
        augmentation: An :class:`Augmentation` or its import path.
        num_views: K >= 1, views per record.
        seed: Seed of the parameters, ``0 .. 2**63 - 1``.

    Raises:
        ConfigError: a token dataset, K < 1, a bad seed or augmentation.
        DataError: (while reading) a ``sample_id`` for which ``sample_id * K + K - 1``
            overflows int64 (names the id and the range), or an augmentation that fails.

    Example:
        >>> from kdcache.data.base import ArrayDataset
        >>> base = ArrayDataset(np.arange(3), np.zeros((3, 4, 4), np.uint8), num_shards=1)
        >>> views = AugmentedViews(base, "kdcache.data.views:identity", num_views=2)
        >>> views.read_shard(0)["sample_id"].tolist()
        [0, 1, 2, 3, 4, 5]
    """

    #: One view is one row.
    layout = "records"

    def __init__(
        self,
        dataset: ShardedDataset,
        augmentation: Augmentation | str,
        *,
        num_views: int,
        seed: int = 0,
    ) -> None:
        if dataset_layout(dataset) != "records":
            raise ConfigError(
                f"AugmentedViews takes a 'records' dataset (one sample per row), got "
                f"{type(dataset).__name__} with layout {dataset.layout!r}"
            )
        if isinstance(num_views, bool) or not isinstance(num_views, int) or num_views < 1:
            raise ConfigError(f"num_views must be an int >= 1, got {num_views!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= _INT64_MAX:
            raise ConfigError(f"seed must be an int in 0..2**63-1, got {seed!r}")
        if isinstance(augmentation, str):
            augmentation = Augmentation(augmentation)
        if not isinstance(augmentation, Augmentation):
            raise ConfigError(
                "augmentation must be an Augmentation or an import path string, got "
                f"{type(augmentation).__name__}"
            )
        self.dataset = dataset
        self.augmentation = augmentation
        self.num_views = num_views
        self.seed = seed

    @property
    def num_shards(self) -> int:
        return int(self.dataset.num_shards)

    def view_fields(self) -> dict[str, Any]:
        """What every shard's fingerprint adds: ``augmentation`` (path),
        ``augmentation_kwargs``, ``augmentation_sha256``, ``num_views``, ``view_seed``."""
        fp = self.augmentation.fingerprint()
        return {
            "augmentation": fp["path"],
            "augmentation_kwargs": fp["kwargs"],
            "augmentation_sha256": fp["source_sha256"],
            "num_views": self.num_views,
            "view_seed": self.seed,
        }

    def fingerprint(self) -> dict[str, Any]:
        """The base fingerprint with K times the records and :meth:`view_fields` in each
        shard (so the join's per-shard check names a differing field) and at the top
        level (``views``)."""
        if not hasattr(self, "_fingerprint"):
            base = self.dataset.fingerprint()
            extra = self.view_fields()
            shards = []
            for s in base.get("shards") or []:
                s = dict(s)
                if isinstance(s.get("num_records"), int):
                    s["num_records"] = s["num_records"] * self.num_views
                shards.append({**s, **extra})
            out = {**base, "shards": shards, "views": extra}
            if isinstance(base.get("num_records"), int):
                out["num_records"] = base["num_records"] * self.num_views
            self._fingerprint = out
        return self._fingerprint

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_fingerprint", None)
        return state

    # -- reading -------------------------------------------------------------------------------
    def expand(self, batch: dict[str, Any], *, where: str) -> dict[str, Any]:
        """The K views of a batch of base records (see the module docstring for columns).

        Raises:
            DataError: an id overflows, or the augmentation fails.
        """
        k = self.num_views
        base_ids = np.asarray(batch["sample_id"], dtype=np.int64)
        lo, hi = -(-_INT64_MIN // k), (_INT64_MAX - (k - 1)) // k
        bad = np.flatnonzero((base_ids < lo) | (base_ids > hi))
        if len(bad):
            raise DataError(
                f"{where}: sample_id {int(base_ids[bad[0]])} has no view ids: "
                f"sample_id * {k} + view overflows int64; with num_views={k} the ids must lie "
                f"in {lo}..{hi} (renumber the dataset's ids, or use fewer views)"
            )
        rows = np.repeat(np.arange(len(base_ids)), k)
        views = np.tile(np.arange(k, dtype=np.int64), len(base_ids))
        ids = base_ids[rows]
        rng = ViewRandom(self.seed, ids, views)
        params = self.augmentation.draw(rng, where=where)
        inputs = self.augmentation.apply(np.asarray(batch["inputs"])[rows], params, where=where)
        out: dict[str, Any] = {"sample_id": ids * k + views, "inputs": inputs}
        if batch.get("labels") is not None:
            out["labels"] = np.asarray(batch["labels"], dtype=np.int64)[rows]
        out.update({"view": views, "base_sample_id": ids, "augmentation": params})
        return out

    def open_shard(self, index: int, batch_size: int) -> ShardBatches:
        """The views of shard ``index``, at most ``batch_size`` rows a batch.

        The base shard is read with ``max(1, batch_size // K)`` records a batch; after the
        last batch ``digest`` is the base reader's (the augmentation is in the
        fingerprint, not the digest).

        Raises:
            ConfigError: ``batch_size`` < 1.
        """
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        base = open_shard(self.dataset, index, max(1, batch_size // self.num_views))
        holder: list[ShardBatches] = []
        reader = ShardBatches(
            index, base.num_records * self.num_views, self._iter(base, batch_size, holder)
        )
        holder.append(reader)
        return reader

    def _iter(
        self, base: ShardBatches, batch_size: int, holder: list[ShardBatches]
    ) -> Iterator[dict[str, Any]]:
        where = f"shard {base.index} of {type(self.dataset).__name__} (views)"
        for batch in base:
            views = self.expand(batch, where=where)
            n = len(views["sample_id"])
            for lo in range(0, n, batch_size):
                yield {key: v[lo : lo + batch_size] for key, v in views.items()}
        holder[0].digest = base.digest

    def read_shard(self, index: int) -> dict[str, Any]:
        """All views of shard ``index`` (see the module docstring for columns)."""
        parts = list(self.open_shard(index, 1 << 62))
        if len(parts) == 1:
            return parts[0]
        if not parts:
            raise DataError(f"shard {index} of {type(self.dataset).__name__} read no records")
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
