"""The ``kdcache`` command: one module per group of subcommands (see :mod:`kdcache.cli.app`)."""

from __future__ import annotations

from kdcache.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
