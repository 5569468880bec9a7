"""Finding caches under a root: ``open_cache`` by key, alias or URI, aliases, ``list_root``."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

from kdcache import schema
from kdcache.errors import (
    CacheCorruptError,
    CacheNotFoundError,
    ConfigError,
    KDCacheError,
)
from kdcache.stores.entry import CacheEntry, _dumps
from kdcache.stores.fs import Location, split_query
from kdcache.stores.view import EnsembleView, check_reader

log = logging.getLogger(__name__)


_ALIAS_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


_KEY_LIKE = re.compile(f"[0-9a-f]{{{schema.KEY_HEX_CHARS}}}")


def check_alias_name(name: str) -> None:
    """Refuse a name that cannot be an alias (checked before a build, not after it).

    Raises:
        ConfigError: not a plain name (letters, digits, ``.``, ``_``, ``-``; no path
            separators; at most 128 characters), or it looks like a key.
    """
    if not _ALIAS_NAME.fullmatch(name) or _KEY_LIKE.fullmatch(name):
        raise ConfigError(
            f"alias {name!r} must be a plain name (letters, digits, '.', '_', '-'; at most "
            f"128 characters) that does not look like a {schema.KEY_HEX_CHARS}-hex-digit key"
        )


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
    check_alias_name(name)
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


def _checked_key(key: Any, where: str) -> str:
    """A key read from a record: exactly the hex digits of a key, so that it names a folder
    inside ``entries/`` and can never climb out (``../x``, an absolute path).

    Raises:
        CacheCorruptError: anything else.
    """
    if not isinstance(key, str) or not _KEY_LIKE.fullmatch(key):
        raise CacheCorruptError(
            f"{where} names key {key!r}, which is not a cache key ({schema.KEY_HEX_CHARS} hex "
            "digits); the record was edited or damaged: point it again with 'kdcache alias'"
        )
    return key


def read_alias(aliases: Location, name: str) -> tuple[str, str]:
    """``(key, kind)`` of alias ``name``, checked (see :func:`_checked_key`).

    Raises:
        CacheCorruptError: the alias file is torn, or names no key or an unknown kind.
    """
    where = aliases.display(f"{name}.json")
    target = schema.read_json(aliases.read_bytes(f"{name}.json"), where, "alias")
    kind = target.get("kind", "entry")
    if kind not in ("entry", "ensemble"):
        raise CacheCorruptError(f"{where}: unknown kind {kind!r} (expected entry or ensemble)")
    return _checked_key(target.get("key"), where), str(kind)


def alias_target(root: str | Location, name: str) -> str | None:
    """The key the alias ``name`` names under ``root``; None when there is no such alias
    (or ``name`` cannot be one)."""
    if not _ALIAS_NAME.fullmatch(name) or _KEY_LIKE.fullmatch(name):
        return None
    loc = (root if isinstance(root, Location) else Location(root)).child(schema.ALIASES_DIR)
    if not loc.exists(f"{name}.json"):
        return None
    return read_alias(loc, name)[0]


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
    if root is not None and "/" not in uri:  # a key or an alias under the root
        r = Location(root)
        alias = r.child(schema.ALIASES_DIR)
        # A key is never shadowed by an alias; names with path separators are not aliases.
        if (
            _ALIAS_NAME.fullmatch(uri)
            and not _KEY_LIKE.fullmatch(uri)
            and alias.exists(f"{uri}.json")
        ):
            uri, kind = read_alias(alias, uri)
        elif not _KEY_LIKE.fullmatch(uri):
            raise CacheNotFoundError(
                f"no alias named {uri!r} under {r.display()}, and it is not a key "
                f"({schema.KEY_HEX_CHARS} hex digits); list what is there with: "
                f"kdcache ls {r.display()}"
            )
        else:
            kind = "ensemble" if r.child(schema.ENSEMBLES_DIR).exists(f"{uri}.json") else "entry"
        if kind == "ensemble":
            return _open_view(r.child(schema.ENSEMBLES_DIR), f"{uri}.json", check=check)
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
        return _open_view(Location(parent + query), name, check=check)
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


def _open_view(ensembles: Location, name: str, *, check: bool = True) -> EnsembleView:
    view, entries = _view_members(ensembles, name)
    if not check:  # the members, unchecked: a view whose members are damaged still lists them
        return _UncheckedView(entries)  # type: ignore[return-value]
    where = ensembles.display(name)
    try:
        return EnsembleView.from_json(entries, view)
    except ConfigError as exc:
        raise CacheCorruptError(f"{where}: {exc}") from None


class _UncheckedView:
    """A view's members without the view's checks (what ``verify`` needs to report)."""

    def __init__(self, entries: list[CacheEntry]) -> None:
        self.entries = entries


def _view_members(ensembles: Location, name: str) -> tuple[dict[str, Any], list[CacheEntry]]:
    where = ensembles.display(name)
    try:
        view = schema.read_json(ensembles.read_bytes(name), where, "ensemble view")
    except FileNotFoundError:
        raise CacheNotFoundError(f"no ensemble view at {where}") from None
    schema.check_format_version(view.get("format_version"), where)
    members = view.get("entries")
    if not isinstance(members, list) or not members:
        raise CacheCorruptError(f"{where}: 'entries' must be a non-empty list of keys")
    base, query = split_query(ensembles.uri) if not ensembles.is_local else (ensembles.uri, "")
    cache_root = base.rsplit("/", 1)[0] + query
    return view, [CacheEntry(cache_root, _checked_key(k, where)) for k in members]


def list_root(root: str) -> list[dict[str, Any]]:
    """Entries, ensemble views and aliases under a cache root, one dict each.

    A damaged record (torn manifest, edited spec, bad alias) does not stop the listing: its
    row has ``status="damaged"`` and the ``error``; the rest is listed as usual.
    """
    loc = Location(root)
    rows: list[dict[str, Any]] = []
    entries = loc.child(schema.ENTRIES_DIR)
    for key in entries.listdir():
        if not _KEY_LIKE.fullmatch(key):
            continue  # not kdcache's
        entry = CacheEntry(loc, key)
        row: dict[str, Any] = {"kind": "entry", "key": key}
        try:
            if entry.is_complete:
                m = entry.manifest
                spec = entry.target_spec
                row.update(
                    status="complete",
                    teacher=m.get("teacher_name"),
                    targets=spec.kind
                    + "".join(f" {k}={v}" for k, v in (spec.params or ()) if k != "seed")
                    + f" {spec.storage_dtype} {spec.backend}",
                    temperature=m["spec"]["targets"]["temperature"],
                    rows=m["num_rows"],
                    bytes=m["num_bytes"],
                    shards=m["num_shards"],
                )
            elif entry.location.exists(schema.LEASE_FILE):
                row.update(status="building")
            else:
                _ = entry.spec
                row.update(status="incomplete")
        except (KDCacheError, KeyError, TypeError) as exc:
            row.update(status="damaged", error=str(exc))
        rows.append(row)
    ensembles = loc.child(schema.ENSEMBLES_DIR)
    for name in ensembles.listdir():
        if name.endswith(".json") and not name.startswith("."):
            row = {"kind": "ensemble", "key": name[:-5]}
            try:
                view = _open_view(ensembles, name)
                row.update(rule=view.rule, entries=[e.key for e in view.entries])
            except KDCacheError as exc:
                row.update(status="damaged", error=str(exc))
            rows.append(row)
    aliases = loc.child(schema.ALIASES_DIR)
    for name in aliases.listdir():
        if name.endswith(".json") and not name.startswith("."):
            row = {"kind": "alias", "name": name[:-5]}
            try:
                row["key"] = read_alias(aliases, name[:-5])[0]
            except KDCacheError as exc:
                row.update(status="damaged", error=str(exc))
            rows.append(row)
    return rows


def resolve_entries(uri: str, *, root: str | None = None) -> list[CacheEntry]:
    """The entries ``uri`` names (one, or an ensemble view's members) without reading their
    manifests, for tools that must look at damaged or unfinished entries (``verify``).

    Raises:
        CacheNotFoundError: nothing at ``uri``.
    """
    found = _open(uri, root, check=False)
    return [found] if isinstance(found, CacheEntry) else list(found.entries)
