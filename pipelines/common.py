"""What both demos share: the teacher stage's executor options on their command lines."""

from __future__ import annotations

import argparse
from typing import Any

from kdcache import ExecutorConfig


def add_executor_args(p: argparse.ArgumentParser) -> None:
    """``--executor``, ``--address`` and ``--num-actors``: the demos' part of
    :class:`kdcache.ExecutorConfig` (its one definition; its checks apply)."""
    p.add_argument(
        "--executor",
        default="ray",
        choices=["ray", "local"],
        help="run the teacher stage on Ray actors or in this process",
    )
    p.add_argument(
        "--address",
        default=None,
        help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)",
    )
    p.add_argument("--num-actors", type=int, default=None, help="Ray actors (default: one per CPU)")


def executor_from_args(
    p: argparse.ArgumentParser, a: argparse.Namespace, **fixed: Any
) -> ExecutorConfig:
    """The :class:`kdcache.ExecutorConfig` of the parsed options (plus ``fixed`` settings);
    a bad value is a usage error naming the option."""
    from kdcache.errors import ConfigError

    try:
        return ExecutorConfig(kind=a.executor, address=a.address, num_actors=a.num_actors, **fixed)
    except ConfigError as exc:
        p.error(str(exc))
        raise  # p.error exits; this keeps type checkers content
