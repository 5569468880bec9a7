"""Finding caches under a root: ``open_cache`` by key, alias or URI, aliases, ``list_root``."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from typing import Any

from kdcache import schema
from kdcache.errors import (
    CacheNotFoundError,
    ConfigError,
)
from kdcache.stores.entry import CacheEntry, _dumps
from kdcache.stores.fs import Location, split_query
from kdcache.stores.view import EnsembleView, check_reader

log = logging.getLogger(__name__)


_ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


_KEY_LIKE = re.compile(f"[0-9a-f]{{{schema.KEY_HEX_CHARS}}}")


def write_alias(root: str | Location, name: str, key: str, kind: str, *, move: bool = True) -> None:
    """Point the human-readable ``name`` at an entry or ensemble ``key``.

    Args:
        root: The cache root.
        name: The alias.
        key: The entry or ensemble key it names.
        kind: ``"entry"`` or ``"ensemble"``.
        move: Re-point an alias that names another key (logged); False refuses to.

    Raises:
        ConfigError: ``name`` is not a plain name (letters, digits, ``.``, ``_``, ``-``;
            no path separators), or looks like a key (keys always win over aliases); or,
            with ``move=False``, the alias already names another key (the message names
            both keys).
    """
    if not _ALIAS_NAME.fullmatch(name) or _KEY_LIKE.fullmatch(name):
        raise ConfigError(
            f"alias {name!r} must be a plain name (letters, digits, '.', '_', '-'; at most "
            f"128 characters) that does not look like a {schema.KEY_HEX_CHARS}-hex-digit key"
        )
    loc = (root if isinstance(root, Location) else Location(root)).child(schema.ALIASES_DIR)
    old = alias_target(root, name)
    if old is not None and old != key:
        if not move:
            raise ConfigError(
                f"alias {name!r} points at key {old}, not at {key}; re-point it explicitly "
                "(move=True) or choose another name"
            )
        log.warning("alias %s now points to %s (was %s)", name, key, old)
    loc.write_atomic(f"{name}.json", _dumps({"key": key, "kind": kind}))


def alias_target(root: str | Location, name: str) -> str | None:
    """The key the alias ``name`` names under ``root``; None when there is no such alias
    (or ``name`` cannot be one)."""
    if not _ALIAS_NAME.fullmatch(name) or _KEY_LIKE.fullmatch(name):
        return None
    loc = (root if isinstance(root, Location) else Location(root)).child(schema.ALIASES_DIR)
    if not loc.exists(f"{name}.json"):
        return None
    key = json.loads(loc.read_bytes(f"{name}.json")).get("key")
    return str(key) if key is not None else None


def open_cache(
    uri: str,
    *,
    root: str | None = None,
    temperature: float | None = None,
    vocab_size: int | None = None,
    teachers: Sequence[str] | None = None,
    retemper: bool = False,
) -> CacheEntry | EnsembleView:
    """Open a complete cache entry or ensemble view for reading.

    Args:
        uri: An entry directory (``<root>/entries/<key>``), an ensemble view file
            (``<root>/ensembles/<key>.json``), or, with ``root``, a key or an alias name.
            Remote URIs keep their pyarrow query options
            (``s3://b/p/entries/<key>?endpoint_override=...``).
        root: The cache root, needed only to resolve a bare key or alias.
        temperature, vocab_size, teachers, retemper: What the reader expects; checked by
            :func:`check_reader` when given.

    Returns:
        A :class:`CacheEntry` or an :class:`EnsembleView` whose manifests were checked.

    Raises:
        CacheNotFoundError: nothing at ``uri`` (or no such key or alias under ``root``).
        CacheIncompleteError: the entry exists but was never committed.
        FormatVersionError: written by a newer format version.
        SpecMismatchError: see :func:`check_reader`.
    """
    cache = _open(uri, root)
    check_reader(
        cache,
        temperature=temperature,
        vocab_size=vocab_size,
        teachers=teachers,
        retemper=retemper,
    )
    return cache


def _open(uri: str, root: str | None, *, check: bool = True) -> CacheEntry | EnsembleView:
    if root is not None:
        r = Location(root)
        alias = r.child(schema.ALIASES_DIR)
        # A key is never shadowed by an alias; names with path separators are not aliases.
        if (
            _ALIAS_NAME.fullmatch(uri)
            and not _KEY_LIKE.fullmatch(uri)
            and alias.exists(f"{uri}.json")
        ):
            target = json.loads(alias.read_bytes(f"{uri}.json"))
            uri, kind = target["key"], target["kind"]
        else:
            kind = "ensemble" if r.child(schema.ENSEMBLES_DIR).exists(f"{uri}.json") else "entry"
        if kind == "ensemble":
            return _open_view(r.child(schema.ENSEMBLES_DIR), f"{uri}.json")
        entry = CacheEntry(r, uri)
        if not entry.location.exists(schema.SPEC_FILE):
            raise CacheNotFoundError(
                f"no entry, ensemble view or alias named {uri!r} under {r.display()}; "
                f"list what is there with: kdcache ls {r.display()}"
            )
        if check:
            _ = entry.manifest
        return entry
    loc = Location(uri)
    base, query = split_query(loc.uri) if not loc.is_local else (loc.uri, "")
    if base.endswith(".json"):
        parent, _, name = base.rpartition("/")
        return _open_view(Location(parent + query), name)
    parent, _, key = base.rstrip("/").rpartition("/")
    if not parent.endswith(schema.ENTRIES_DIR):
        raise CacheNotFoundError(
            f"{loc.display()} is not a cache entry (<root>/{schema.ENTRIES_DIR}/<key>) or an "
            "ensemble view (<root>/ensembles/<key>.json); for a key or alias give the root "
            "(root=... in Python, --root ROOT on the command line)"
        )
    entry = CacheEntry(parent.rsplit("/", 1)[0] + query, key)
    if check:
        _ = entry.manifest
    return entry


def _open_view(ensembles: Location, name: str) -> EnsembleView:
    try:
        view = json.loads(ensembles.read_bytes(name))
    except FileNotFoundError:
        raise CacheNotFoundError(f"no ensemble view at {ensembles.display(name)}") from None
    schema.check_format_version(view.get("format_version"), ensembles.display(name))
    base, query = split_query(ensembles.uri) if not ensembles.is_local else (ensembles.uri, "")
    cache_root = base.rsplit("/", 1)[0] + query
    entries = [CacheEntry(cache_root, k) for k in view["entries"]]
    return EnsembleView(entries, view["rule"], view["weights"])


def list_root(root: str) -> list[dict[str, Any]]:
    """Entries, ensemble views and aliases under a cache root, one dict each."""
    loc = Location(root)
    rows: list[dict[str, Any]] = []
    entries = loc.child(schema.ENTRIES_DIR)
    for key in entries.listdir():
        entry = CacheEntry(loc, key)
        row: dict[str, Any] = {"kind": "entry", "key": key}
        if entry.is_complete:
            m = entry.manifest
            row.update(
                status="complete",
                teacher=m.get("teacher_name"),
                temperature=m["spec"]["targets"]["temperature"],
                rows=m["num_rows"],
                bytes=m["num_bytes"],
                shards=m["num_shards"],
            )
        elif entry.location.exists(schema.LEASE_FILE):
            row.update(status="building")
        else:
            row.update(status="incomplete")
        rows.append(row)
    for name in loc.child(schema.ENSEMBLES_DIR).listdir():
        if name.endswith(".json"):
            view = json.loads(loc.child(schema.ENSEMBLES_DIR).read_bytes(name))
            rows.append(
                {
                    "kind": "ensemble",
                    "key": name[:-5],
                    "rule": view["rule"],
                    "entries": view["entries"],
                }
            )
    for name in loc.child(schema.ALIASES_DIR).listdir():
        if name.endswith(".json"):
            target = json.loads(loc.child(schema.ALIASES_DIR).read_bytes(name))
            rows.append({"kind": "alias", "name": name[:-5], "key": target["key"]})
    return rows


def resolve_entries(uri: str, *, root: str | None = None) -> list[CacheEntry]:
    """The entries ``uri`` names (one, or an ensemble view's members) without reading their
    manifests, for tools that must look at damaged or unfinished entries (``verify``).

    Raises:
        CacheNotFoundError: nothing at ``uri``.
    """
    found = _open(uri, root, check=False)
    return found.entries if isinstance(found, EnsembleView) else [found]
