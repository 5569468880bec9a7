"""``kdcache build CONFIG [key=value ...]``: run the teacher stage from a config file."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "build",
        help="run the teacher stage described by a YAML/TOML/JSON config",
        description="Cache every teacher's soft targets over a dataset (see BuildConfig in "
        "kdcache/jobs/config.py). A rerun is a cache hit; an interrupted build resumes.",
    )
    c.add_argument("config", help="build config file (.yaml, .toml or .json)")
    c.add_argument(
        "overrides",
        nargs="*",
        help="dotted key=value overrides, e.g. targets.temperature=2.0 executor.num_actors=4",
    )
    c.add_argument("--address", default=None, help="Ray address (overrides executor.address)")
    c.add_argument(
        "--move-alias",
        action="store_true",
        help="re-point the config's alias when it names another key (refused otherwise)",
    )
    c.add_argument("--no-progress", action="store_true")
    # passthrough: overrides may also come after options (argparse stops a nargs="*"
    # positional at the first option).
    c.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.jobs import config as cfg
    from kdcache.jobs.build import build_from_config

    overrides = cfg.command_line_overrides(args.overrides, rest)
    if args.address:
        overrides.append(f"executor.address={args.address}")
    config = cfg.load(cfg.BuildConfig, args.config, overrides)
    cache = build_from_config(config, progress=not args.no_progress, move_alias=args.move_alias)
    report = cache.build_report  # type: ignore[union-attr]
    print(
        json.dumps(
            {
                "key": cache.key,
                "hit": report.hit,
                "computed": report.computed,
                "reused": report.reused,
                "num_shards": cache.num_shards,
                "bytes": cache.num_bytes,
                "wall_s": round(report.wall_s, 3),
                "alias": config.alias,
                "root": config.root,
            }
        )
    )
    return 0
