"""The kdcache exception tree.

One root, :class:`KDCacheError`; each subclass also inherits the builtin that a caller
would otherwise catch (as zarr-python does), so ``except FileNotFoundError`` still works.

Failures are sorted into *fatal* (a bug or bad data: retrying gives the same answer) and
*retriable* (infrastructure: an actor died, a node was lost, a transient I/O error).
Only :class:`RetriableError` is ever retried by the teacher stage.
"""

from __future__ import annotations

import re


class KDCacheError(Exception):
    """Root of every error kdcache raises on purpose."""


class ConfigError(KDCacheError, ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


class DataError(KDCacheError, ValueError):
    """Input data is missing, malformed, or inconsistent (fatal, never retried)."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """An input data file does not exist."""


class InputChangedError(DataError):
    """Input files changed after they were planned or cached (sizes, versions or content
    differ from what was recorded)."""


class TeacherOutputError(KDCacheError, ValueError):
    """A teacher produced an output that cannot be cached (NaN/inf, wrong shape). Fatal."""


class SampleIdMismatchError(KDCacheError, ValueError):
    """Cached rows and input rows disagree on ``sample_id`` (missing, extra or reordered)."""


class CacheNotFoundError(KDCacheError, FileNotFoundError):
    """No cache entry, ensemble view or alias exists at the given location."""


class CacheIncompleteError(KDCacheError, FileNotFoundError):
    """A cache entry exists but has no manifest yet: it is being built or was interrupted."""


class CacheCorruptError(KDCacheError, OSError):
    """A committed file does not match its recorded size or checksum."""


class CacheReadOnlyError(KDCacheError, PermissionError):
    """A cache root that must be written to (a combination to store) is not writable."""


class FormatVersionError(KDCacheError, ValueError):
    """The cache was written by a newer, unknown format version."""


class SpecMismatchError(KDCacheError, ValueError):
    """A reader asked for a temperature, vocabulary or teacher set the cache does not hold."""


class LeaseHeldError(KDCacheError, TimeoutError):
    """Another live job holds the build lease on this key and did not finish in time."""


class MissingDependencyError(KDCacheError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""


class RetriableError(KDCacheError, RuntimeError):
    """An infrastructure failure (actor died, node lost, transient I/O); safe to retry."""


class JobServerError(RetriableError, ConnectionError):
    """The Ray job server cannot be reached or refused a request."""


class JobNotFoundError(KDCacheError, LookupError):
    """No job with the given submission id exists on the cluster."""


def require(module: str, extra: str):
    """Import an optional dependency or raise :class:`MissingDependencyError`.

    Args:
        module: Module to import, e.g. ``"ray"``.
        extra: The kdcache extra that provides it, e.g. ``"ray"``.

    Returns:
        The imported module.

    Raises:
        MissingDependencyError: The module is not installed.
    """
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is required for this feature but is not installed; "
            f"install it with: pip install 'kdcache[{extra}]'"
        ) from exc


_USERINFO = re.compile(r"(://)[^/@\s'\"]*@")
_SECRET_QUERY = re.compile(
    r"((?:secret_key|access_key|session_token|token|sig|password)=)[^&\s'\"]+", re.I
)


def redact(text: str) -> str:
    """``text`` with credentials in URIs masked (``s3://KEY:SECRET@b/p`` ->
    ``s3://***@b/p``; ``?secret_key=...`` -> ``?secret_key=***``), for messages."""
    return _SECRET_QUERY.sub(r"\1***", _USERINFO.sub(r"\1***@", text))
