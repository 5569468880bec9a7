"""Transforms of input batches, named by import path so that they pickle and fingerprint.

A :class:`Transform` is ``fn(inputs_B, **kwargs) -> outputs_B``: a function found by its
import path (``"package.module:function"``, resolved with
:func:`kdcache.imports.import_object`), applied to each batch a file-backed dataset reads
(:mod:`kdcache.data.files`), in the reading thread. It pickles as its path and kwargs, so
the function itself is imported where the batch is read (a Ray actor), never shipped.

A list of transforms is a chain: each one's output is the next one's input.

Its fingerprint is the import path, the kwargs and the SHA-256 of the function's source
(:func:`inspect.getsource`), so editing the function changes the cache key; for a
function without Python source (a builtin, a numpy ufunc) the source hash is None and
the version of its top-level package stands in.

Shape legend: B rows in a batch.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kdcache.errors import ConfigError, DataError
from kdcache.imports import import_object


@dataclass(frozen=True)
class Transform:
    """A batch transform named by import path.

    Args:
        fn: Import path of the callable, ``"package.module:function"`` (or
            ``"package.module.function"``); called as ``fn(inputs_B, **kwargs)`` with
            ``inputs_B`` the decoded inputs of a batch, shape [B, ...] (a read-only numpy
            array; an object array for variable-length columns), and must return an
            ndarray or torch tensor with the same leading dimension B.
        kwargs: Keyword arguments for ``fn``; JSON-able (they go into the fingerprint).

    Raises:
        ConfigError: ``fn`` is not a string import path, or ``kwargs`` is not a JSON-able
            dict.

    Example:
        >>> t = Transform("numpy:multiply", {"x2": 2.0})
        >>> t.kwargs
        {'x2': 2.0}
    """

    fn: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.fn, str) or not self.fn.strip():
            raise ConfigError(
                f"Transform(fn=...) takes an import path like 'package.module:function', got "
                f"{self.fn!r}; a function defined in a module is named by "
                "Transform.of(function)"
            )
        if not isinstance(self.kwargs, dict):
            raise ConfigError(
                f"Transform {self.fn!r}: kwargs must be a dict, got {type(self.kwargs).__name__}"
            )
        try:
            json.dumps(self.kwargs, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"Transform {self.fn!r}: kwargs must be JSON-able (they go into the dataset "
                f"fingerprint), got {self.kwargs!r}: {exc}; pass numbers, strings, lists "
                "and dicts"
            ) from None

    @classmethod
    def of(cls, fn: Any, **kwargs: Any) -> Transform:
        """The transform naming ``fn`` by its module and qualified name.

        Raises:
            ConfigError: ``fn`` is a lambda or a local function (it has no import path).
        """
        module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
        if not module or not qualname or "<" in qualname or module == "__main__":
            raise ConfigError(
                f"{fn!r} has no import path (a lambda, a local function or one defined in "
                "__main__); define it at the top level of a module and name it as "
                "'package.module:function'"
            )
        return cls(f"{module}:{qualname}", dict(kwargs))

    def resolve(self) -> Any:
        """The callable, imported on first use and kept (never pickled).

        Raises:
            ConfigError: the path does not import, or names something not callable.
        """
        cached = self.__dict__.get("_resolved")
        if cached is not None:
            return cached
        obj = import_object(self.fn)
        if not callable(obj):
            raise ConfigError(f"transform {self.fn!r} names a {type(obj).__name__}, not a callable")
        object.__setattr__(self, "_resolved", obj)
        return obj

    def __hash__(self) -> int:
        return hash((self.fn, json.dumps(self.kwargs, sort_keys=True)))

    def __getstate__(self) -> dict[str, Any]:
        return {"fn": self.fn, "kwargs": self.kwargs}

    def __setstate__(self, state: dict[str, Any]) -> None:
        object.__setattr__(self, "fn", state["fn"])
        object.__setattr__(self, "kwargs", state["kwargs"])

    def fingerprint(self) -> dict[str, Any]:
        """``{"fn", "kwargs", "source_sha256", "version"}``; imports the function.

        ``source_sha256`` is the hex SHA-256 of ``inspect.getsource(fn)`` (None when the
        function has no Python source); ``version`` is its top-level package's
        ``__version__`` when there is no source (else None).
        """
        obj = self.resolve()
        try:
            source_sha256: str | None = hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()
        except (OSError, TypeError):
            source_sha256 = None
        version = None
        if source_sha256 is None:
            top = (getattr(obj, "__module__", None) or self.fn.partition(":")[0]).split(".")[0]
            version = getattr(sys.modules.get(top), "__version__", None)
        return {
            "fn": self.fn,
            "kwargs": self.kwargs,
            "source_sha256": source_sha256,
            "version": None if version is None else str(version),
        }


#: What ``transform=`` accepts: one transform, its import path, a chain, or None.
TransformLike = Transform | str | Sequence[Transform | str] | None


def as_chain(transform: TransformLike) -> tuple[Transform, ...]:
    """Normalise ``transform=`` to a tuple of :class:`Transform` (empty for None).

    Raises:
        ConfigError: an item is neither a Transform nor an import path string.
    """
    if transform is None:
        return ()
    items = [transform] if isinstance(transform, Transform | str) else list(transform)
    chain = []
    for item in items:
        if isinstance(item, str):
            item = Transform(item)
        if not isinstance(item, Transform):
            raise ConfigError(
                f"transform must be a Transform, an import path string or a list of them, "
                f"got {type(item).__name__}; wrap a module-level function as Transform.of(fn)"
            )
        chain.append(item)
    return tuple(chain)


def chain_fingerprint(chain: Sequence[Transform]) -> list[dict[str, Any]] | None:
    """Fingerprints of a chain in order, or None for an empty chain."""
    return [t.fingerprint() for t in chain] or None


def _batch_len(out: Any) -> int | None:
    shape = getattr(out, "shape", None)
    if shape is not None and len(shape) > 0:
        return int(shape[0])
    return None


def apply_chain(chain: Sequence[Transform], inputs_B: Any, *, where: str) -> Any:
    """Apply ``chain`` to one batch.

    Args:
        chain: Transforms, applied in order.
        inputs_B: The decoded inputs, shape [B, ...].
        where: What is being read, for messages (``"shard 3 (file a.parquet)"``).

    Returns:
        The last transform's output, shape [B, ...] (``inputs_B`` for an empty chain).

    Raises:
        DataError: a transform raised (chained to its exception), or returned something
            that is not an array or tensor of B rows.
    """
    num_rows = len(inputs_B)
    out = inputs_B
    for t in chain:
        fn = t.resolve()
        try:
            out = fn(out, **t.kwargs)
        except Exception as exc:
            raise DataError(
                f"transform {t.fn!r} (kwargs {t.kwargs!r}) failed on {where}, batch of "
                f"{num_rows} rows: {type(exc).__name__}: {exc}; fix the transform or its "
                "kwargs (it receives read-only inputs [B, ...])"
            ) from exc
        got = _batch_len(out)
        if got != num_rows:
            what = (
                f"{type(out).__name__} of shape {tuple(out.shape)}"
                if getattr(out, "shape", None) is not None
                else type(out).__name__
            )
            raise DataError(
                f"transform {t.fn!r} returned {what} for a batch of {num_rows} rows on "
                f"{where}; expected an ndarray or tensor [B, ...] with B = {num_rows} (one "
                "output row per input row)"
            )
    return out
