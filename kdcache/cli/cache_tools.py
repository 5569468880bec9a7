"""``kdcache inspect | verify | ls | alias | gc | combine``: tools over cache roots."""

from __future__ import annotations

import argparse
import json
from typing import Any


def _open(args: argparse.Namespace) -> Any:
    from kdcache.stores.catalog import open_cache

    return open_cache(args.uri, root=args.root)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def register(sub: argparse._SubParsersAction) -> None:
    for name, helptext, func in (
        ("inspect", "describe a cache entry or ensemble view", cmd_inspect),
        ("verify", "check every shard of a cache; exit 1 on a fault", cmd_verify),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("uri", help="entry dir, ensemble view .json, or a key/alias with --root")
        c.add_argument("--root", default=None, help="cache root, to resolve a key or alias")
        if name == "inspect":
            c.add_argument("--samples", type=int, default=3, help="decoded samples to show")
        else:
            c.add_argument(
                "--repair",
                action="store_true",
                help="uncommit the damaged shards, so rerunning the build recomputes them",
            )
        c.set_defaults(func=func)

    c = sub.add_parser("ls", help="list entries, ensembles and aliases under a cache root")
    c.add_argument("root")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_ls)

    c = sub.add_parser(
        "gc",
        help="remove staging files and unreferenced shards (never under a live lease)",
        description="Remove staging files (.tmp-*) and, in complete entries, shard files the "
        "manifest does not list. Entries under a live lease are left alone.",
    )
    c.add_argument("root")
    c.add_argument("--dry-run", action="store_true", help="list what would be removed")
    c.add_argument("--json", action="store_true")
    c.set_defaults(func=cmd_gc)

    c = sub.add_parser(
        "combine",
        help="store an ensemble view's combination at one temperature as one entry",
        description="Combine a dense ensemble view's teachers by its rule once, shard by "
        "shard, into one entry of log-probabilities at TEMPERATURE (default: the view's). "
        "Students streaming the view at that temperature then read it: one file per shard, "
        "no combination per epoch. A complete combination is a hit; an interrupted one "
        "resumes. See docs/format.md, 'Combined entry'.",
    )
    c.add_argument("uri", help="ensemble view .json, or a key/alias with --root")
    c.add_argument("--root", default=None, help="cache root, to resolve a key or alias")
    c.add_argument(
        "--temperature", type=float, default=None, help="tau of the combination (the student's)"
    )
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_combine)

    c = sub.add_parser("alias", help="point a human-readable name at a key")
    c.add_argument("root")
    c.add_argument("name")
    c.add_argument("key")
    c.set_defaults(func=cmd_alias)


def cmd_inspect(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.stores.admin import describe

    _print_json(describe(_open(args), num_samples=args.samples))
    return 0


def cmd_verify(args: argparse.Namespace, rest: list[str]) -> int:
    """Exit 0: sound (or, with --repair, everything found was repaired); 1: a fault."""
    from kdcache.stores.admin import repair, verify
    from kdcache.stores.catalog import resolve_entries

    # Entries are resolved without trusting their records, so that a torn manifest or an
    # edited spec is a fault verify reports (exit 1), not an error that stops it.
    result = verify(resolve_entries(args.uri, root=args.root))
    for p in result.problems:
        print(f"FAULT {p}")
    status = "ok" if result.ok else f"{len(result.problems)} fault(s)"
    print(f"verified {result.checked_shards} shard(s), {result.checked_rows} row(s): {status}")
    if result.ok:
        return 0
    if not args.repair:
        unfinished = [e for e in result.broken if not e.is_complete]
        if result.damaged or len(unfinished) < len(result.broken):
            print("to repair: add --repair, then rerun the build")
        elif unfinished:
            print("rerun the same build to finish the unfinished entries")
        return 1
    done, left = repair(result)
    for line in done:
        print(line)
    for line in left:
        print(f"NOT REPAIRED {line}")
    unrepairable = len(result.problems) - len(result.damaged) - len(result.broken)
    if done:
        touched = {e.key: e for e, _ in result.damaged} | {e.key: e for e in result.broken}
        combined = sorted(k for k, e in touched.items() if _is_combined(e))
        if combined:
            print(
                "rerun 'kdcache combine VIEW' to recompute what was uncommitted in the "
                f"combined entries ({', '.join(combined)})"
            )
        if len(combined) < len(touched):
            print("rerun the same build to recompute what was uncommitted (kdcache build CONFIG)")
    return 0 if not left and unrepairable == 0 else 1


def _is_combined(entry: Any) -> bool:
    """Whether an entry's (readable) spec says it holds a combination."""
    from kdcache.errors import KDCacheError

    try:
        return bool(entry.is_combined)
    except (KDCacheError, OSError, ValueError):  # a torn spec: verify reported it
        return False


def cmd_ls(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.errors import CacheNotFoundError
    from kdcache.stores.catalog import list_root
    from kdcache.stores.fs import Location

    if not Location(args.root).is_dir():
        raise CacheNotFoundError(f"cache root {args.root} does not exist or is not a directory")
    rows = list_root(args.root)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        if r.get("status") == "damaged":
            name = r.get("key") or r.get("name")
            print(f"{r['kind']:<9} {name}  DAMAGED     {r['error']}")
        elif r["kind"] == "entry":
            extra = (
                f"{r.get('teacher')}  {r.get('targets')}  tau={r.get('temperature')}  "
                f"rows={r.get('rows')}  bytes={r.get('bytes')}"
                if r["status"] == "complete"
                else ""
            )
            print(f"entry     {r['key']}  {r['status']:<10}  {extra}")
        elif r["kind"] == "ensemble":
            print(f"ensemble  {r['key']}  {r['rule']}  {len(r['entries'])} teachers")
        else:
            print(f"alias     {r['name']} -> {r['key']}")
    if not rows:
        print(f"no cache entries under {args.root}")
    return 0


def cmd_alias(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.stores.catalog import open_cache, write_alias
    from kdcache.stores.view import EnsembleView

    cache = open_cache(args.key, root=args.root)
    kind = "ensemble" if isinstance(cache, EnsembleView) else "entry"
    write_alias(args.root, args.name, cache.key, kind)
    print(f"{args.name} -> {cache.key} ({kind})")
    return 0


def cmd_gc(args: argparse.Namespace, rest: list[str]) -> int:
    from dataclasses import asdict

    from kdcache.errors import CacheNotFoundError
    from kdcache.stores.admin import gc
    from kdcache.stores.fs import Location

    if not Location(args.root).is_dir():  # a mistyped root is an error, never "cleaned"
        raise CacheNotFoundError(f"cache root {args.root} does not exist or is not a directory")
    result = gc(args.root, dry_run=args.dry_run)
    if args.json:
        _print_json(asdict(result))
        return 0
    verb = "would remove" if result.dry_run else "removed"
    for path in result.removed:
        print(f"{verb} {path}")
    for key in result.skipped_leased:
        print(f"skipped   {key} (live lease: a build is running)")
    print(f"{verb} {len(result.removed)} file(s), {result.num_bytes} bytes")
    return 0


def cmd_combine(args: argparse.Namespace, rest: list[str]) -> int:
    import time

    from kdcache.errors import ConfigError
    from kdcache.stores.entry import CacheEntry
    from kdcache.stores.view import as_view

    cache = _open(args)
    if isinstance(cache, CacheEntry):
        raise ConfigError(
            f"{args.uri} is one entry ({cache.teacher_name!r}), not an ensemble view: there "
            "is nothing to combine. Give the view's key (kdcache ls ROOT lists them)"
        )
    view = as_view(cache)
    started = time.perf_counter()
    was_complete = view.combined_entry(args.temperature).is_complete
    entry = view.materialize(args.temperature, progress=not args.no_progress)
    what = "exists (a hit)" if was_complete else f"complete in {time.perf_counter() - started:.1f}s"
    print(
        f"combined {view.rule} of {len(view.entries)} teachers at temperature "
        f"{entry.temperature:g}: entry {entry.key} {what}, {entry.num_rows} rows, "
        f"{entry.num_bytes} bytes ({entry.location.uri})"
    )
    return 0
