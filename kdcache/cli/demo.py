"""``kdcache demo NAME [OPTIONS]``: run an end-to-end job on real data."""

from __future__ import annotations

import argparse
import runpy
import sys

DEMOS = {"fashion-mnist": "pipelines.fashion_mnist", "fortunes-lm": "pipelines.lm_fortunes"}


def register(sub: argparse._SubParsersAction) -> None:
    d = sub.add_parser(
        "demo",
        help="run an end-to-end job on real data (options: kdcache demo NAME --help)",
        add_help=False,
    )
    d.add_argument("name", nargs="?", choices=sorted(DEMOS))
    d.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    if args.name is None:  # `kdcache demo`, `kdcache demo --help`: say what there is
        print("usage: kdcache demo NAME [OPTIONS]   (options: kdcache demo NAME --help)")
        print("demos: " + ", ".join(sorted(DEMOS)))
        return 0 if any(a in ("-h", "--help") for a in rest) else 2
    # Pipelines are recipes outside the library (as torchtune's `tune run` runs recipes):
    # the command runs one as __main__ and kdcache never imports it.
    sys.argv = [f"kdcache demo {args.name}", *rest]
    try:
        runpy.run_module(DEMOS[args.name], run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0
