"""The ``kdcache`` command.

    kdcache demo fashion-mnist [OPTIONS]   run the main job (see --help)
    kdcache inspect URI                    spec, teachers, shards, bytes, a few samples
    kdcache verify URI                     checksums, ids, finiteness; exit 1 on a fault
    kdcache ls ROOT                        entries, ensembles and aliases under a root
    kdcache alias ROOT NAME KEY            name a key

URI is an entry directory (ROOT/entries/KEY), an ensemble view (ROOT/ensembles/KEY.json),
or a key or alias with --root ROOT.
"""

from __future__ import annotations

import argparse
import json
import logging
import runpy
import sys
from typing import Any

from kdcache.errors import KDCacheError

DEMOS = {"fashion-mnist": "pipelines.fashion_mnist"}


def _open(args: argparse.Namespace):
    from kdcache.cache import open_cache

    return open_cache(args.uri, root=args.root)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False))


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    module = DEMOS[args.name]
    # Pipelines are recipes outside the library (as torchtune's `tune run` runs recipes):
    # the CLI runs one as __main__ and never imports it into kdcache.
    sys.argv = [f"kdcache demo {args.name}", *rest]
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from kdcache.admin import describe

    _print_json(describe(_open(args), num_samples=args.samples))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from kdcache.admin import verify

    result = verify(_open(args))
    for p in result.problems:
        print(f"FAULT {p}")
    status = "ok" if result.ok else f"{len(result.problems)} fault(s)"
    print(f"verified {result.checked_shards} shard(s), {result.checked_rows} row(s): {status}")
    return 0 if result.ok else 1


def cmd_ls(args: argparse.Namespace) -> int:
    from kdcache.admin import list_root

    rows = list_root(args.root)
    if args.json:
        _print_json(rows)
        return 0
    for r in rows:
        if r["kind"] == "entry":
            extra = (
                f"{r.get('teacher')}  tau={r.get('temperature')}  rows={r.get('rows')}  "
                f"bytes={r.get('bytes')}"
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


def cmd_alias(args: argparse.Namespace) -> int:
    from kdcache.cache import open_cache, write_alias

    cache = open_cache(args.key, root=args.root)
    kind = "entry" if type(cache).__name__ == "CacheEntry" else "ensemble"
    write_alias(args.root, args.name, cache.key, kind)
    print(f"{args.name} -> {cache.key} ({kind})")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdcache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("demo", help="run an end-to-end job on real data", add_help=False)
    d.add_argument("name", choices=sorted(DEMOS))

    for name, helptext in (
        ("inspect", "describe a cache entry or ensemble view"),
        ("verify", "check every shard of a cache; exit 1 on a fault"),
    ):
        c = sub.add_parser(name, help=helptext)
        c.add_argument("uri", help="entry dir, ensemble view .json, or a key/alias with --root")
        c.add_argument("--root", default=None, help="cache root, to resolve a key or alias")
        if name == "inspect":
            c.add_argument("--samples", type=int, default=3, help="decoded samples to show")

    c = sub.add_parser("ls", help="list entries, ensembles and aliases under a cache root")
    c.add_argument("root")
    c.add_argument("--json", action="store_true")

    c = sub.add_parser("alias", help="point a human-readable name at a key")
    c.add_argument("root")
    c.add_argument("name")
    c.add_argument("key")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if args.command != "demo" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command == "demo":
            return cmd_demo(args, rest)
        return {"inspect": cmd_inspect, "verify": cmd_verify, "ls": cmd_ls, "alias": cmd_alias}[
            args.command
        ](args)
    except KDCacheError as exc:
        print(f"kdcache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
