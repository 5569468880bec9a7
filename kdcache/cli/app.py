"""kdcache: offline knowledge distillation through a cache of teacher soft targets.

    kdcache demo fashion-mnist|fortunes-lm [OPTIONS]   an end-to-end job on real data
    kdcache plan CONFIG [key=value ...]    shards, cache bytes, teacher time and memory
    kdcache build CONFIG [key=value ...]   the teacher stage (Ray), from a config file
    kdcache train CONFIG [key=value ...]   the student stage (DeepSpeed), from a config
    kdcache sweep CONFIG [key=value ...]   many students from one cache, as Ray Tune trials
    kdcache submit build|train CONFIG --address URL    either stage as a Ray job
    kdcache status JOB | kdcache logs JOB  follow a submitted job
    kdcache inspect URI                    spec, teachers, shards, bytes, a few samples
    kdcache verify URI                     checksums, ids, finiteness; exit 1 on a fault
    kdcache ls ROOT                        entries, ensembles and aliases under a root
    kdcache gc ROOT [--dry-run]            remove staging files and unreferenced shards
    kdcache alias ROOT NAME KEY            name a key
    kdcache config show CONFIG | config schema [KIND]   resolved config, JSON Schema

URI is an entry directory (ROOT/entries/KEY), an ensemble view (ROOT/ensembles/KEY.json),
or a key or alias with --root ROOT. Each command has --help.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from kdcache._version import __version__
from kdcache.errors import KDCacheError

#: The modules that define the subcommands, in help order. Each defines
#: ``register(subparsers)``, which adds its parsers and sets ``func=handler`` on each; a
#: handler takes ``(args, rest)`` and returns an exit code. ``rest`` holds unparsed
#: arguments and is non-empty only for parsers that set ``passthrough=True`` (``demo``
#: forwards them to the job).
COMMAND_MODULES = (
    "kdcache.cli.demo",
    "kdcache.cli.plan",
    "kdcache.cli.build",
    "kdcache.cli.train",
    "kdcache.cli.sweep",
    "kdcache.cli.cache_tools",
    "kdcache.cli.submit",
    "kdcache.cli.config",
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kdcache", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"kdcache {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args, rest))
    except KDCacheError as exc:
        print(f"kdcache: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "kdcache: interrupted; everything committed so far is kept: rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        return 130
    except BrokenPipeError:  # e.g. `kdcache inspect ... | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
