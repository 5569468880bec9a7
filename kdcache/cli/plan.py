"""``kdcache plan CONFIG [key=value ...]``: shards, rows, cache bytes, teacher-stage time
and actor memory of a build config, before it runs (nothing is written)."""

from __future__ import annotations

import argparse
import json


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "plan",
        help="estimate a build config's cache bytes, teacher time and actor memory",
        description="Plan the teacher stage of a build config: the dataset's shards, rows "
        "and bytes (from file metadata), the cache bytes per target kind and dtype "
        "(measured on a calibration batch), each teacher's stage time and an estimate of "
        "the memory of one of its actors. Nothing is built or written.",
    )
    c.add_argument("config", help="build config file (.yaml, .toml or .json)")
    c.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    c.add_argument(
        "--calibration-rows", type=int, default=256, help="rows of shard 0 each teacher runs"
    )
    c.add_argument(
        "--max-cache-bytes",
        type=float,
        default=None,
        help="warn when a dense float32 cache of one teacher exceeds this many bytes",
    )
    c.add_argument("--json", action="store_true", help="print the plan as JSON")
    c.set_defaults(func=run, passthrough=True)


def run(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.errors import ConfigError
    from kdcache.jobs import config as cfg
    from kdcache.jobs.plan import format_plan, plan_build

    if args.calibration_rows < 1:
        raise ConfigError(f"--calibration-rows must be >= 1, got {args.calibration_rows}")
    config = cfg.load(
        cfg.BuildConfig, args.config, cfg.command_line_overrides(args.overrides, rest)
    )
    plan = plan_build(
        config,
        calibration_rows=args.calibration_rows,
        max_cache_bytes=None if args.max_cache_bytes is None else int(args.max_cache_bytes),
    )
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0
