"""``kdcache config show|schema``: the resolved config of a file, and the configs' schemas.

    kdcache config show train.yaml max_steps=200     # after overrides, defaults filled
    kdcache config show cfg.yaml --kind build        # when the keys do not tell
    kdcache config schema train                      # JSON Schema (all kinds without one)

``show`` prints YAML that ``kdcache build|train|sweep`` accepts as it is (the file's kind
is told by its keys: ``teachers`` and ``root`` make a build, ``student`` and ``cache`` a
train config); the config is validated, but nothing it names is imported or built.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser(
        "config",
        help="print a config resolved (show) or the JSON Schema of the configs (schema)",
        description="Inspect job configs (BuildConfig, TrainConfig, SweepConfig in kdcache/jobs/).",
    )
    actions = c.add_subparsers(dest="action", required=True)
    show = actions.add_parser(
        "show",
        help="print the resolved config as YAML (after overrides, with defaults filled)",
        description="Read CONFIG, apply the key=value overrides as `kdcache build|train` "
        "does, validate it and print it as YAML with every default filled in.",
    )
    show.add_argument("config", help="config file (.yaml, .toml or .json)")
    show.add_argument("overrides", nargs="*", help="dotted key=value overrides")
    show.add_argument(
        "--kind", default=None, help="build, train or sweep (default: told from the file's keys)"
    )
    show.set_defaults(func=run_show, passthrough=True)
    schema = actions.add_parser(
        "schema",
        help="print the JSON Schema of a kind of config (all kinds when none is named)",
        description="Print the JSON Schema (draft 2020-12) of a job config, for editors "
        "and validators; without KIND, one object mapping each kind to its schema.",
    )
    schema.add_argument("kind", nargs="?", default=None, help="build, train or sweep")
    schema.set_defaults(func=run_schema)


def _kind_class(kind: str) -> type:
    from kdcache.errors import ConfigError
    from kdcache.jobs.config import config_kinds

    kinds = config_kinds()
    if kind not in kinds:
        raise ConfigError(f"unknown kind of config {kind!r}; expected one of {', '.join(kinds)}")
    return kinds[kind]


def run_show(args: argparse.Namespace, rest: list[str]) -> int:
    import yaml

    from kdcache.jobs import config as cfg

    overrides = cfg.command_line_overrides(args.overrides, rest)
    kind = args.kind or cfg.detect_kind(cfg.read_file(args.config), args.config)
    config: Any = cfg.load(_kind_class(kind), args.config, overrides)
    print(f"# kdcache config show: {kind} config {args.config}, resolved")
    print(yaml.safe_dump(cfg.to_dict(config), sort_keys=False), end="")
    return 0


def run_schema(args: argparse.Namespace, rest: list[str]) -> int:
    from kdcache.jobs import config as cfg

    if args.kind is not None:
        out = cfg.json_schema(_kind_class(args.kind))
    else:
        out = {kind: cfg.json_schema(cls) for kind, cls in cfg.config_kinds().items()}
    print(json.dumps(out, indent=2))
    return 0
